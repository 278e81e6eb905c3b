"""Images from the network: http(s) downloads, and the readers that accept every kind of source.

Decoding stays in :mod:`agman_milvus.core.images` (the one door for image bytes); this module
only adds the transport. Downloads are streamed and cut off past ``max_bytes`` and after
``timeout`` seconds in all; HTTP 5xx/429/408 and connection trouble are ``transient`` errors
(worth a retry), everything else is bad input.
"""

from __future__ import annotations

import os
import threading
import time

import httpx
from PIL import Image

from agman_milvus.core import images as local
from agman_milvus.core.config import Settings
from agman_milvus.core.images import (
    EmptyImageError,
    ImageFetchError,
    ImageLimits,
    ImageSource,
    UnsupportedSourceError,
    check_size,
    decode_image_bytes,
    redact_uri,
    resolve_limits,
    short_error,
)

__all__ = ["fetch_bytes", "is_http_uri", "load_image", "read_image_bytes"]

_USER_AGENT = "agman-milvus (image fetch)"


def is_http_uri(source: object) -> bool:
    """True for an ``http://`` or ``https://`` string."""
    return isinstance(source, str) and source[:8].lower().startswith(("http://", "https://"))


def read_image_bytes(
    source: ImageSource,
    *,
    max_bytes: int | None = None,
    timeout: float | None = None,
    settings: Settings | None = None,
    http_client: httpx.Client | None = None,
) -> bytes:
    """The raw bytes of any source: http(s) downloaded here, the rest read by core."""
    if not is_http_uri(source):
        return local.read_image_bytes(source, max_bytes=max_bytes, timeout=timeout, settings=settings)
    limits = resolve_limits(settings, max_bytes, None, timeout)
    data = fetch_bytes(str(source), limits, http_client)
    if not data:
        label = redact_uri(str(source))
        raise EmptyImageError(f"image is empty: {label} holds zero bytes", source=label)
    return data


def load_image(
    source: ImageSource,
    *,
    max_bytes: int | None = None,
    max_pixels: int | None = None,
    timeout: float | None = None,
    settings: Settings | None = None,
    http_client: httpx.Client | None = None,
) -> Image.Image:
    """Read and decode any source (see :func:`agman_milvus.core.images.load_image`)."""
    if not is_http_uri(source):
        return local.load_image(source, max_bytes=max_bytes, max_pixels=max_pixels,
                                timeout=timeout, settings=settings)
    data = read_image_bytes(source, max_bytes=max_bytes, timeout=timeout, settings=settings,
                            http_client=http_client)
    return decode_image_bytes(data, max_pixels=max_pixels, max_bytes=max_bytes, settings=settings,
                              source=redact_uri(str(source)))


_thread_clients = threading.local()


def _shared_client() -> httpx.Client:
    """One httpx.Client per thread and process (reuses connections; safe after fork)."""
    client = getattr(_thread_clients, "client", None)
    if client is None or getattr(_thread_clients, "pid", None) != os.getpid():
        client = httpx.Client(
            follow_redirects=True, max_redirects=5, headers={"User-Agent": _USER_AGENT}
        )
        _thread_clients.client, _thread_clients.pid = client, os.getpid()
    return client


def fetch_bytes(uri: str, limits: ImageLimits, client: httpx.Client | None = None) -> bytes:
    """GET ``uri`` streamed, stopping past ``max_bytes`` and after ``timeout`` seconds in all."""
    label = redact_uri(uri)
    client = client or _shared_client()
    timeout = limits.timeout
    deadline = time.monotonic() + timeout
    try:
        with client.stream("GET", uri, timeout=httpx.Timeout(timeout)) as response:
            if response.status_code >= 400 or response.status_code < 200:
                code = response.status_code
                phrase = response.reason_phrase or ""
                raise ImageFetchError(
                    f"could not download {label}: the server answered HTTP {code} "
                    f"{phrase}".rstrip(),
                    reason="http_status", status_code=code, source=label,
                    transient=code >= 500 or code in (408, 429),
                )
            declared = response.headers.get("content-length")
            if declared and declared.isdigit():
                check_size(int(declared), limits.max_bytes, label)
            buf = bytearray()
            for chunk in response.iter_bytes():
                buf += chunk
                check_size(len(buf), limits.max_bytes, label, partial=True)
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout("download exceeded the total time limit")
            return bytes(buf)
    except httpx.TimeoutException:
        raise ImageFetchError(
            f"could not download {label}: no complete answer within {timeout:g} s",
            reason="timeout", source=label, transient=True,
        ) from None
    except httpx.TooManyRedirects:
        raise ImageFetchError(
            f"could not download {label}: too many redirects", reason="http_status", source=label,
        ) from None
    except httpx.UnsupportedProtocol as exc:
        raise UnsupportedSourceError(
            f"could not download {label}: {exc}", reason="unsupported_scheme", source=label
        ) from None
    except httpx.InvalidURL as exc:
        raise UnsupportedSourceError(
            f"invalid URL {label}: {exc}", reason="invalid_uri", source=label
        ) from None
    except httpx.DecodingError as exc:
        raise ImageFetchError(
            f"could not download {label}: the response could not be decoded ({exc})",
            reason="bad_response", source=label,
        ) from None
    except httpx.ConnectError as exc:
        raise ImageFetchError(
            f"could not download {label}: cannot connect to the server ({short_error(exc)})",
            reason="unreachable", source=label, transient=True,
        ) from None
    except httpx.TransportError as exc:
        raise ImageFetchError(
            f"could not download {label}: the connection failed ({short_error(exc)})",
            reason="unreachable", source=label, transient=True,
        ) from None
