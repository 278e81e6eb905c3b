"""The only door for image bytes: read, check and decode untrusted images safely.

Every image that enters agman_milvus (ingest, search queries, training data) is decoded here.
:func:`load_image` accepts a path, a ``file://`` URI, raw bytes or a PIL image and returns a
fully decoded RGB :class:`PIL.Image.Image` with the EXIF orientation applied; http(s) images
are downloaded by :mod:`agman_milvus.services.fetch` and decoded by :func:`decode_image_bytes`.
Everything that can go wrong is an :class:`ImageError` (a ``ValueError``) with a short
machine-readable ``reason`` and a message a person understands.

Safety rules:

* byte limit (``max_bytes``) enforced while reading — files are never read past it;
* pixel limit (``max_pixels``) and shape limit (``max_aspect_ratio``, long side / short side)
  checked on the header's declared size *before* decoding (``Image.open`` is lazy), per call;
  a 1x200000 PNG is a few hundred bytes and few pixels, but resizing its short side to the
  model's input size would need gigabytes, so it is refused here. PIL's global
  ``Image.MAX_IMAGE_PIXELS`` is neither relied on nor changed (its own bomb error, raised above
  twice that global, is mapped too);
* local paths and ``file://`` URIs are resolved (symlinks included) and checked *before*
  anything is opened: only regular files, never under ``/proc``, ``/sys`` or ``/dev``, and
  only inside ``roots`` when roots are configured (``allowed_roots``);
* only a fixed set of raster formats is tried (:data:`ALLOWED_FORMATS`; no EPS/PostScript,
  which PIL would hand to Ghostscript, and no header-less formats such as TGA that random
  bytes could be mistaken for);
* truncated data raises (``ImageFile.LOAD_TRUNCATED_IMAGES`` is not touched); JPEG marker
  structure is checked, because libjpeg only *warns* about a broken marker in the compressed
  data and would hand back a half-grey picture. Corruption that keeps the marker structure
  intact (flipped bits inside the entropy-coded data) still decodes to garbled pixels — no
  decoder exposes that, and it is not detected here;
* no global state is modified, so calls are safe from several threads at once.

Limits default to :class:`agman_milvus.core.config.Settings` (``max_image_bytes``,
``max_image_pixels``, ``max_aspect_ratio``, ``allowed_roots``, ``fetch_timeout``), read from the
environment once and cached. :func:`probe_image_bytes` runs every check that needs no pixel
decoding (format, declared size, shape, JPEG structure): ingest uses it before it stores bytes.
"""

from __future__ import annotations

import errno
import functools
import io
import logging
import os
import re
import stat
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from agman_milvus.core.errors import AgmanError

if TYPE_CHECKING:
    from agman_milvus.core.config import Settings

logger = logging.getLogger(__name__)

__all__ = [
    "ALLOWED_FORMATS",
    "DecompressionBombError",
    "EmptyImageError",
    "ExtremeAspectRatioError",
    "ForbiddenSourceError",
    "ImageError",
    "ImageFetchError",
    "ImageLimits",
    "ImageNotFoundError",
    "ImageSource",
    "ImageTooLargeError",
    "NotAnImageError",
    "TruncatedImageError",
    "CorruptImageError",
    "UnsupportedModeError",
    "UnsupportedSourceError",
    "check_local_path",
    "check_size",
    "decode_image_bytes",
    "default_limits",
    "load_image",
    "probe_image_bytes",
    "read_image_bytes",
    "redact_uri",
    "resolve_limits",
    "short_error",
    "to_rgb",
]

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image]
"""Anything :func:`load_image` accepts."""

#: Raster formats PIL may try. Deliberately excludes EPS (runs Ghostscript), PDF-like and
#: header-less formats (TGA) that arbitrary bytes could be misread as.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF", "PPM")

_URI_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class ImageError(AgmanError, ValueError):
    """An image could not be read or decoded. ``reason`` is a short code for storage/metrics.

    ``transient`` is True when retrying later may succeed (network trouble, HTTP 5xx/429);
    bad input is never transient.
    """

    default_reason = "invalid_image"

    def __init__(
        self, message: str, *, reason: str | None = None, source: str | None = None,
        transient: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.source = source
        self.transient = transient

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # keep subclasses picklable (Celery ships exceptions between processes)
        return (_rebuild_error, (type(self), self.message, dict(self.__dict__)))


def _rebuild_error(cls: type[ImageError], message: str, state: dict) -> ImageError:
    err = cls.__new__(cls)
    ValueError.__init__(err, message)
    err.__dict__.update(state)
    return err


class EmptyImageError(ImageError):
    """The source holds zero bytes."""

    default_reason = "empty"


class TruncatedImageError(ImageError):
    """The image data ends before the picture is complete."""

    default_reason = "truncated"


class NotAnImageError(ImageError):
    """The bytes are not a supported raster image (text, HTML, SVG, PDF, garbage...)."""

    default_reason = "not_an_image"


class CorruptImageError(ImageError):
    """The data looks like an image but is damaged inside."""

    default_reason = "corrupt"


class UnsupportedModeError(ImageError):
    """The pixels are in a colour mode that cannot be turned into RGB."""

    default_reason = "unsupported_mode"


class ImageTooLargeError(ImageError):
    """The source is larger than ``max_bytes``."""

    default_reason = "too_large_bytes"


class DecompressionBombError(ImageError):
    """The declared width x height exceeds ``max_pixels`` (possible decompression bomb)."""

    default_reason = "too_many_pixels"


class ExtremeAspectRatioError(ImageError):
    """Long side / short side exceeds ``max_aspect_ratio`` (a banner or a 1-pixel line: the
    model's centre crop would see almost none of it, and resizing it is unbounded work)."""

    default_reason = "extreme_aspect_ratio"


class ForbiddenSourceError(ImageError):
    """A local path the source policy refuses: it resolves (symlinks followed) under ``/proc``,
    ``/sys`` or ``/dev``, or outside the configured ``allowed_roots``."""

    default_reason = "forbidden_path"


class ImageNotFoundError(ImageError):
    """A local path does not exist (``not_found``), is no regular file (``not_a_file``) or
    cannot be read (``unreadable``)."""

    default_reason = "not_found"


class ImageFetchError(ImageError):
    """Downloading failed: ``unreachable``, ``timeout``, ``http_status`` or ``bad_response``."""

    default_reason = "unreachable"

    def __init__(self, message: str, *, status_code: int | None = None, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.status_code = status_code


class UnsupportedSourceError(ImageError):
    """The source is of a kind load_image does not read (``unsupported_scheme``,
    ``invalid_uri``, ``unsupported_type``)."""

    default_reason = "unsupported_scheme"


# --------------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------------


#: Default of the ``max_aspect_ratio`` setting: past 20:1 the model's centre crop keeps under 5 %
#: of the picture, and the resized image (short side 224) would be over 224 x 4480.
DEFAULT_MAX_ASPECT_RATIO = 20.0

#: Pseudo-filesystems no image is ever read from (their "regular" files are process state,
#: kernel knobs or devices); refused whatever ``allowed_roots`` says.
FORBIDDEN_PREFIXES: tuple[str, ...] = ("/proc", "/sys", "/dev")


@dataclass(frozen=True)
class ImageLimits:
    """Limits applied to one read/decode, and the source policy for local files
    (``roots``: resolved paths must lie inside one of them; None = anywhere but
    :data:`FORBIDDEN_PREFIXES`)."""

    max_bytes: int
    max_pixels: int
    timeout: float
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO
    roots: tuple[Path, ...] | None = None

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1 or self.timeout <= 0 or self.max_aspect_ratio < 1:
            raise ValueError(f"image limits must be positive, got {self}")


@functools.lru_cache(maxsize=1)
def default_limits() -> ImageLimits:
    """Limits from the environment's :class:`Settings`, read once (``cache_clear()`` to reread)."""
    from agman_milvus.core.config import get_settings

    return _limits_from_settings(get_settings())


def _limits_from_settings(settings: Settings) -> ImageLimits:
    roots = None if settings.allowed_roots is None else tuple(settings.allowed_roots)
    return ImageLimits(settings.max_image_bytes, settings.max_image_pixels, settings.fetch_timeout,
                       settings.max_aspect_ratio, roots)


def resolve_limits(
    settings: Settings | None, max_bytes: int | None, max_pixels: int | None,
    timeout: float | None,
) -> ImageLimits:
    """Explicit values, else ``settings``, else the cached environment defaults (the shape
    limit and the source policy always come from ``settings`` or the environment)."""
    base = _limits_from_settings(settings) if settings is not None else default_limits()
    return ImageLimits(
        max_bytes=base.max_bytes if max_bytes is None else max_bytes,
        max_pixels=base.max_pixels if max_pixels is None else max_pixels,
        timeout=base.timeout if timeout is None else timeout,
        max_aspect_ratio=base.max_aspect_ratio, roots=base.roots,
    )


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def load_image(
    source: ImageSource,
    *,
    max_bytes: int | None = None,
    max_pixels: int | None = None,
    timeout: float | None = None,
    settings: Settings | None = None,
) -> Image.Image:
    """Read and decode ``source`` into a fully loaded RGB image, EXIF orientation applied.

    Explicit keyword limits win over ``settings``, which win over the environment's defaults.
    Raises an :class:`ImageError` subclass on any problem with the source or its bytes.
    """
    limits = resolve_limits(settings, max_bytes, max_pixels, timeout)
    if isinstance(source, Image.Image):
        return _from_pil(source, limits)
    data = _read(source, limits)
    return _decode(data, limits, _describe(source))


def read_image_bytes(
    source: ImageSource,
    *,
    max_bytes: int | None = None,
    timeout: float | None = None,
    settings: Settings | None = None,
) -> bytes:
    """The raw bytes of ``source`` (at most ``max_bytes``), without decoding them.

    A PIL image is encoded as PNG (after conversion to RGB). Empty sources raise
    :class:`EmptyImageError`.
    """
    limits = resolve_limits(settings, max_bytes, None, timeout)
    if isinstance(source, Image.Image):
        buf = io.BytesIO()
        _from_pil(source, limits).save(buf, "PNG")
        data = buf.getvalue()
        check_size(len(data), limits.max_bytes, "the encoded image")
        return data
    return _read(source, limits)


def decode_image_bytes(
    data: bytes | bytearray | memoryview,
    *,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
    settings: Settings | None = None,
    source: str | None = None,
) -> Image.Image:
    """Decode in-memory image bytes into a fully loaded RGB image (EXIF orientation applied).

    ``source`` only names the origin in error messages.
    """
    limits = resolve_limits(settings, max_bytes, max_pixels, 1.0)
    data, label = _sized_bytes(data, limits, source)
    return _decode(data, limits, label)


def probe_image_bytes(
    data: bytes | bytearray | memoryview,
    *,
    settings: Settings | None = None,
    source: str | None = None,
) -> tuple[str, int, int]:
    """``(format, width, height)`` of image bytes, after every check that needs no pixel
    decoding: size, a supported format, declared pixels, shape and the JPEG marker structure.

    Cheap (the header only); raises the same :class:`ImageError` as a full decode would for
    those problems. Damage inside the compressed pixel data is found only by decoding.
    """
    limits = resolve_limits(settings, None, None, None)
    data, label = _sized_bytes(data, limits, source)
    im = _open_checked(data, limits, label)
    try:
        return im.format or "image", im.width, im.height
    finally:
        im.close()


# --------------------------------------------------------------------------------------------
# Reading sources
# --------------------------------------------------------------------------------------------


def _sized_bytes(data: bytes | bytearray | memoryview, limits: ImageLimits, source: str | None
                 ) -> tuple[bytes, str]:
    """In-memory image bytes under the byte limit, and the label that names them in messages."""
    label = source or "the given bytes"
    data = bytes(data)
    check_size(len(data), limits.max_bytes, label)
    return data, label


def _describe(source: object) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "the given bytes"
    if isinstance(source, str) and _URI_RE.match(source):
        return redact_uri(source)
    return str(source)


def redact_uri(uri: str) -> str:
    """Drop user:password from a URI before it goes into a message or log."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urllib.parse.urlunsplit(parts._replace(netloc=host))
    return uri


def check_size(size: int, max_bytes: int, label: str, *, partial: bool = False) -> None:
    """Raise ImageTooLargeError past max_bytes (``partial``: size is what was read so far)."""
    if size > max_bytes:
        amount = f"more than {max_bytes:,} bytes" if partial else f"{size:,} bytes"
        raise ImageTooLargeError(
            f"image is too large: {label} has {amount}, the limit is {max_bytes:,} bytes",
            source=label,
        )


def _read(source: object, limits: ImageLimits) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = _describe(source)
        check_size(len(data), limits.max_bytes, "the given bytes")
    elif isinstance(source, str) and _URI_RE.match(source):
        data, label = _read_uri(source, limits)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        data, label = _read_file(path, limits), str(path)
    else:
        raise UnsupportedSourceError(
            f"cannot read an image from a {type(source).__name__}; pass a path, a file:// or "
            "http(s):// URI, bytes or a PIL image",
            reason="unsupported_type",
        )
    if not data:
        raise EmptyImageError(f"image is empty: {label} holds zero bytes", source=label)
    return data


def _read_uri(uri: str, limits: ImageLimits) -> tuple[bytes, str]:
    scheme = uri.split("://", 1)[0].lower()
    label = redact_uri(uri)
    if scheme == "file":
        parts = urllib.parse.urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise UnsupportedSourceError(
                f"file:// URI names another host ({parts.netloc!r}); only local files can be read: "
                f"{label}", reason="invalid_uri", source=label,
            )
        path = Path(urllib.request.url2pathname(parts.path))
        return _read_file(path, limits, label=label), label
    if scheme in ("http", "https"):
        raise UnsupportedSourceError(
            f"{label} is an http(s) URI: core reads local sources only; download it with "
            "agman_milvus.services.fetch", source=label,
        )
    hint = " (blob:// URIs are read with BlobStore.open_uri)" if scheme == "blob" else ""
    raise UnsupportedSourceError(
        f"unsupported URI scheme {scheme!r} in {label}: only file://, http:// and https:// "
        f"are read{hint}", source=label,
    )


def check_local_path(path: Path, roots: tuple[Path, ...] | None, *, label: str | None = None
                     ) -> tuple[Path, os.stat_result]:
    """The source policy for a local file, applied before anything is opened.

    Resolves ``path`` (symlinks followed); refuses paths under :data:`FORBIDDEN_PREFIXES`,
    outside ``roots`` (when given) and anything but a regular file. Returns the resolved path
    and its ``stat``.
    """
    label = label or str(path)
    try:
        resolved = Path(os.path.realpath(path))
    except (OSError, ValueError) as exc:  # symlink loops, NUL bytes
        raise ImageNotFoundError(f"cannot resolve {label}: {exc}", reason="unreadable",
                                 source=label) from None
    if any(_inside(resolved, Path(prefix)) for prefix in FORBIDDEN_PREFIXES):
        raise ForbiddenSourceError(
            f"{label} resolves to {resolved}, under a system pseudo-filesystem "
            f"({', '.join(FORBIDDEN_PREFIXES)}); images are never read from there", source=label,
        )
    if roots is not None and not any(_inside(resolved, Path(os.path.realpath(r))) for r in roots):
        raise ForbiddenSourceError(
            f"{label} resolves to {resolved}, outside the allowed roots "
            f"({', '.join(str(r) for r in roots) or 'none'}); set AGMAN_ALLOWED_ROOTS to allow it",
            source=label,
        )
    try:
        st = os.stat(resolved)
    except FileNotFoundError:
        raise ImageNotFoundError(f"image file not found: {label}", source=label) from None
    except PermissionError:
        raise ImageNotFoundError(
            f"permission denied reading {label}", reason="unreadable", source=label
        ) from None
    except OSError as exc:
        reason = "not_found" if exc.errno in (errno.ENOTDIR, errno.ENAMETOOLONG) else "unreadable"
        raise ImageNotFoundError(
            f"cannot open {label}: {exc.strerror or exc}", reason=reason, source=label
        ) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageNotFoundError(
            f"{label} is a directory, not an image file", reason="not_a_file", source=label
        )
    if not stat.S_ISREG(st.st_mode):
        raise ImageNotFoundError(
            f"{label} is not a regular file (a pipe, socket or device)",
            reason="not_a_file", source=label,
        )
    return resolved, st


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _read_file(path: Path, limits: ImageLimits, *, label: str | None = None) -> bytes:
    """Read a file the source policy allows (:func:`check_local_path`), never past max_bytes.

    The resolved path is opened without following links, and the opened file must be the one
    that was checked (same device and inode), so a path swapped in between is refused.
    """
    label = label or str(path)
    max_bytes = limits.max_bytes
    resolved, checked = check_local_path(path, limits.roots, label=label)
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0) \
        | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(resolved, flags)
    except OSError as exc:
        raise ImageNotFoundError(
            f"cannot open {label}: {exc.strerror or exc}", reason="unreadable", source=label
        ) from None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (checked.st_dev, checked.st_ino) or not stat.S_ISREG(st.st_mode):
            raise ImageNotFoundError(
                f"{label} changed while it was being opened", reason="unreadable", source=label
            )
        check_size(st.st_size, max_bytes, label)  # the opened file's size, before reading it
        with os.fdopen(fd, "rb", closefd=True) as fh:
            fd = -1
            data = fh.read(max_bytes + 1)  # the file may have grown since fstat
    except OSError as exc:
        raise ImageNotFoundError(
            f"cannot read {label}: {exc.strerror or exc}", reason="unreadable", source=label
        ) from None
    finally:
        if fd >= 0:
            os.close(fd)
    check_size(len(data), max_bytes, label, partial=True)
    return data


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _open_checked(data: bytes, limits: ImageLimits, label: str) -> Image.Image:
    """Open ``data`` lazily and run every check the header allows (nothing decoded yet)."""
    if not data:
        raise EmptyImageError(f"image is empty: {label} holds zero bytes", source=label)
    try:
        im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise _unidentified(data, label) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecompressionBombError(
            f"image is too large to decode safely: {label} ({short_error(exc)})", source=label
        ) from None
    except Exception as exc:  # noqa: BLE001 - PIL plugins raise many types on bad headers
        raise _decode_failure(exc, data, label, fmt=None) from None

    fmt = im.format or "image"
    width, height = im.size
    if width < 1 or height < 1:
        raise CorruptImageError(
            f"image is corrupt: {label} declares a {width}x{height} size", source=label
        )
    _check_shape(width, height, limits, label, "declares")
    if fmt == "JPEG" or fmt == "MPO":
        problem = _jpeg_structure_problem(data)
        if problem:
            raise CorruptImageError(f"image is corrupt: {label} — {problem}", source=label)
    return im


def _check_shape(width: int, height: int, limits: ImageLimits, label: str, verb: str) -> None:
    """The pixel limit and the aspect-ratio limit, on a declared or actual size."""
    if width * height > limits.max_pixels:
        raise DecompressionBombError(
            f"image is too large: {label} {verb} {width:,}x{height:,} = {width * height:,} "
            f"pixels, the limit is {limits.max_pixels:,} (possible decompression bomb)",
            source=label,
        )
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise ExtremeAspectRatioError(
            f"image shape is too extreme: {label} {verb} {width:,}x{height:,} (aspect ratio "
            f"{ratio:,.1f}:1), the limit is {limits.max_aspect_ratio:g}:1", source=label,
        )


def _decode(data: bytes, limits: ImageLimits, label: str) -> Image.Image:
    im = _open_checked(data, limits, label)
    fmt = im.format or "image"
    try:
        im.load()  # first frame only for animated GIF/WebP/APNG and multi-page TIFF
        im = _apply_orientation(im, label)
        return to_rgb(im, label=label)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecompressionBombError(
            f"image is too large to decode safely: {label} ({short_error(exc)})", source=label
        ) from None
    except Exception as exc:  # noqa: BLE001
        raise _decode_failure(exc, data, label, fmt=fmt) from None


def _decode_failure(exc: Exception, data: bytes, label: str, fmt: str | None) -> ImageError:
    """Map whatever PIL raised while opening/decoding to a typed error."""
    text = short_error(exc)
    if fmt is None and _magic_format(data) is None:
        description = _non_image_description(data)
        if description:  # e.g. text starting with "BM" that PIL took for a BMP header
            return NotAnImageError(f"not an image ({description}): {label}", source=label)
    kind = f"the {fmt} data" if fmt else "the image data"
    if isinstance(exc, EOFError) or "truncated" in text.lower():
        return TruncatedImageError(
            f"image is truncated: {kind} ends early ({len(data):,} bytes; decoder: {text}) "
            f"— {label}", source=label,
        )
    if isinstance(exc, MemoryError):
        return DecompressionBombError(
            f"image is too large to decode: ran out of memory — {label}", source=label
        )
    return CorruptImageError(
        f"image is corrupt: {kind} cannot be decoded ({text}) — {label}", source=label
    )


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"),
          (b"GIF89a", "GIF"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
_SHORT_HEADER = 64  # bytes; a file this short with an image signature was cut off


def _magic_format(data: bytes) -> str | None:
    """The format named by a strong file signature, if any (BMP's "BM" is too weak)."""
    fmt = next((name for magic, name in _MAGIC if data.startswith(magic)), None)
    if fmt is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        fmt = "WEBP"
    return fmt


def _unidentified(data: bytes, label: str) -> ImageError:
    """Error for bytes PIL could not identify: a damaged image or something else entirely."""
    fmt = _magic_format(data)
    if fmt is None:
        description = _non_image_description(data) or (
            f"no supported image format: {', '.join(ALLOWED_FORMATS)}"
        )
        return NotAnImageError(f"not an image ({description}): {label}", source=label)
    if len(data) <= _SHORT_HEADER:
        return TruncatedImageError(
            f"image is truncated: it starts like a {fmt} file but holds only {len(data):,} "
            f"bytes — {label}", source=label,
        )
    return CorruptImageError(
        f"image is corrupt: it starts like a {fmt} file but its header cannot be read "
        f"— {label}", source=label,
    )


def _non_image_description(data: bytes) -> str | None:
    """What well-known non-image content ``data`` is (PDF, SVG, HTML, text...), if any."""
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"%pdf"):
        return "a PDF document"
    if b"<svg" in head:
        return "an SVG vector drawing; only raster images are supported"
    if head.startswith(b"<!doctype html") or b"<html" in head:
        return "an HTML page, not the image itself"
    if head.startswith(b"<"):
        return "an XML/markup document"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1"):
        return "a HEIC/HEIF image, which is not supported"
    if head.startswith(b"%!ps") or head.startswith(b"\xc5\xd0\xd3\xc6"):
        return "a PostScript/EPS file, which is not supported"
    try:
        text = data[:512].decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text and all(c.isprintable() or c in "\r\n\t" for c in text):
        return "plain text"
    return None


def _apply_orientation(im: Image.Image, label: str) -> Image.Image:
    """Rotate/flip according to the EXIF orientation tag; a broken EXIF block is ignored."""
    try:
        orientation = im.getexif().get(0x0112)
    except Exception as exc:  # noqa: BLE001 - unreadable EXIF must not reject good pixels
        logger.warning("ignoring unreadable EXIF data in %s: %s", label, short_error(exc))
        return im
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(im)
    return im


# --------------------------------------------------------------------------------------------
# Colour modes
# --------------------------------------------------------------------------------------------

_WHITE = (255, 255, 255)


def to_rgb(im: Image.Image, *, label: str = "image") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Transparency is composited on white; 16-bit data is scaled (not clipped) to 8 bits;
    32-bit integer and float images are scaled by their range (see :func:`_scale_to_uint8`);
    CMYK with an embedded ICC profile is colour-managed to sRGB.
    """
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode == "CMYK":
        return _cmyk_to_rgb(im, label)
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(im), mode), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGB", im.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise UnsupportedModeError(
            f"cannot convert {label} from colour mode {mode!r} to RGB ({short_error(exc)})",
            source=label,
        ) from None


def _cmyk_to_rgb(im: Image.Image, label: str) -> Image.Image:
    icc = im.info.get("icc_profile")
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(
                im, src, ImageCms.createProfile("sRGB"), outputMode="RGB"
            )
        except (ImageCms.PyCMSError, OSError, ValueError) as exc:
            logger.debug("ICC conversion of %s failed (%s); using plain CMYK->RGB", label, exc)
    return im.convert("RGB")


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Map high-bit-depth grey levels onto 0..255.

    ``I;16*``: the full 0..65535 range (x * 255 / 65535, rounded). ``I`` (32-bit int): values
    within 0..255 are kept, within 0..65535 scaled as 16-bit, otherwise stretched min..max.
    ``F``: within 0..1 scaled by 255, within 0..255 kept, otherwise stretched; NaN becomes 0.
    """
    if mode.startswith("I;16"):
        wide = arr.astype(np.uint32)
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)
    values = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = values * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        scaled = values
    elif mode == "I" and lo >= 0.0 and hi <= 65535.0:
        scaled = values * (255.0 / 65535.0)
    else:
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _from_pil(im: Image.Image, limits: ImageLimits) -> Image.Image:
    """Check, load, orient and convert an image the caller already opened (never mutated)."""
    label = f"the given {im.format or 'PIL'} image"
    width, height = im.size
    if width < 1 or height < 1:
        raise CorruptImageError(f"image is empty: {label} is {width}x{height}", source=label)
    _check_shape(width, height, limits, label, "is")
    try:
        im.load()
        oriented = _apply_orientation(im, label)
        rgb = to_rgb(oriented, label=label)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001
        text = short_error(exc)
        cls = TruncatedImageError if "truncated" in text.lower() else CorruptImageError
        raise cls(f"cannot decode {label}: {text}", source=label) from None
    return rgb.copy() if rgb is im else rgb


# --------------------------------------------------------------------------------------------
# JPEG marker structure
# --------------------------------------------------------------------------------------------

# Markers allowed between scans of a (progressive or multi-scan) JPEG.
_BETWEEN_SCANS = {0xC4, 0xCC, 0xDB, 0xDD, 0xDA, 0xDC, 0xFE} | set(range(0xE0, 0xF0))
# Frame markers (SOFn): C0-CF except DHT (C4), JPG (C8), DAC (CC).
_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_structure_problem(data: bytes) -> str | None:
    """Walk the JPEG marker structure; a description of the first defect, or None.

    Running out of data returns None: the decoder reports truncation itself. Trailing bytes
    after EOI are allowed (camera trailers, MPO pictures).
    """
    n = len(data)
    if not data.startswith(b"\xff\xd8"):
        return "the JPEG start marker is missing"
    pos, restart_interval, seen_frame = 2, 0, False
    while pos < n:
        if data[pos] != 0xFF:
            return f"expected a JPEG marker at byte {pos:,}, found data instead"
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            return None
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            return None
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue
        if marker == 0xD8 or marker < 0xC0:
            return f"invalid JPEG marker 0xFF{marker:02X} at byte {pos - 2:,}"
        if pos + 2 > n:
            return None
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2:
            return f"JPEG segment 0xFF{marker:02X} at byte {pos - 2:,} has an invalid length"
        if marker == 0xDD and pos + 4 <= n:
            restart_interval = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _SOF:
            seen_frame = True
        pos += length
        if marker != 0xDA:
            continue
        if not seen_frame:
            return "a JPEG scan starts before the frame header"
        pos, problem = _skip_scan(data, pos, restart_interval)
        if problem:
            return problem
        if pos >= n:
            return None
        follower = data[pos + 1] if pos + 1 < n else None
        if follower is not None and follower != 0xD9 and follower not in _BETWEEN_SCANS:
            return (
                f"the compressed JPEG data is broken at byte {pos:,} (unexpected marker "
                f"0xFF{follower:02X} inside the picture data)"
            )
    return None


def _skip_scan(data: bytes, pos: int, restart_interval: int) -> tuple[int, str | None]:
    """Skip entropy-coded data; return the position of the marker that ends it."""
    n = len(data)
    expected_rst = 0
    while True:
        i = data.find(b"\xff", pos)
        if i < 0 or i + 1 >= n:
            return n, None
        nxt = data[i + 1]
        if nxt == 0x00 or nxt == 0xFF:  # stuffed byte / fill byte
            pos = i + 1 if nxt == 0xFF else i + 2
            continue
        if 0xD0 <= nxt <= 0xD7:
            if restart_interval == 0 or nxt - 0xD0 != expected_rst:
                return i, (
                    f"the compressed JPEG data is broken at byte {i:,} (restart marker "
                    f"RST{nxt - 0xD0} out of sequence)"
                )
            expected_rst = (expected_rst + 1) % 8
            pos = i + 2
            continue
        return i, None
