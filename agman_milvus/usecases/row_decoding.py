"""The read/decode stage: one catalog image row in, a model-ready tensor (or a failure) out.

Bytes come from the content-addressed blob store when the image's SHA-256 is stored there,
otherwise from the row's source URI (http(s) images are fetched here, in the worker). All
decoding goes through :mod:`agman_milvus.core.images`; anything that goes wrong with one image is
captured as a :class:`DecodedRow` failure so the rest of the batch goes on. This is the decode
function that :mod:`agman_milvus.core.engine` runs for ingest and reindex.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from agman_milvus.core import copy_vote
from agman_milvus.core.config import Settings
from agman_milvus.core.engine import Decoded
from agman_milvus.core.images import ImageError, decode_image_bytes
from agman_milvus.core.phash import phash, to_signed64
from agman_milvus.services.blobs import BlobStore, is_blob_uri
from agman_milvus.services.fetch import read_image_bytes
from agman_milvus.services.local_features import LocalFeatureCache

logger = logging.getLogger(__name__)

__all__ = ["DecodedRow", "decode_image_row", "failure_text"]

Preprocess = Callable[[Image.Image], torch.Tensor]


@dataclass(kw_only=True)
class DecodedRow(Decoded):
    """One catalog image after the read/decode stage: ``inputs`` (the preprocessed tensor) and
    the image's features, or ``failure`` as ``"<reason>: <message>"``."""

    image_id: int
    width: int | None = None
    height: int | None = None
    phash: int | None = None  # signed 64-bit, as stored in SQL
    keypoints: np.ndarray | None = None  # copy-check voting vectors (copy_vote.vote_vectors)


def failure_text(exc: BaseException) -> str:
    """``"<reason>: <message>"`` for storage in ``images.failure_reason``."""
    if isinstance(exc, ImageError):
        return f"{exc.reason}: {exc.message}"
    return f"error: {type(exc).__name__}: {exc}"


def read_row_bytes(
    image_id: int, sha256: str, source_uri: str | None, blobs: BlobStore, settings: Settings
) -> bytes:
    """The stored bytes of an image: its blob when present, else its source URI."""
    if blobs.exists(sha256):
        return blobs.get(sha256)
    if source_uri is None or is_blob_uri(source_uri):
        raise ImageError(
            f"image {image_id}: its bytes are gone (blob {sha256[:12]}... is not in "
            f"{blobs.root}) and it has no source URI to read again",
            reason="missing_blob",
        )
    return read_image_bytes(source_uri, settings=settings)


def decode_image_row(
    image_id: int,
    sha256: str,
    source_uri: str | None,
    *,
    blobs: BlobStore,
    settings: Settings,
    preprocess: Preprocess,
    local_features: LocalFeatureCache | None = None,
) -> DecodedRow:
    """Read, decode, hash and preprocess one image; never raises for a bad image. With
    ``local_features``, its SIFT keypoints are extracted (and cached) for copy checks too."""
    try:
        data = read_row_bytes(image_id, sha256, source_uri, blobs, settings)
        label = source_uri or f"image {image_id}"
        image = decode_image_bytes(data, settings=settings, source=label)
        return DecodedRow(
            image_id=image_id, inputs=preprocess(image), width=image.width,
            height=image.height, phash=to_signed64(phash(image)),
            keypoints=_vote_vectors(image_id, sha256, image, local_features),
        )
    except ImageError as exc:
        out = DecodedRow(image_id=image_id, failure=failure_text(exc))
        logger.info("image %d failed: %s", image_id, out.failure)
    except Exception as exc:  # noqa: BLE001 - one broken image must not stop the batch
        out = DecodedRow(image_id=image_id, failure=failure_text(exc))
        logger.warning("image %d failed unexpectedly: %s", image_id, out.failure, exc_info=True)
    return out


def _vote_vectors(
    image_id: int, sha256: str, image: Image.Image, cache: LocalFeatureCache | None
) -> np.ndarray | None:
    """The image's copy-check voting vectors; None (logged) when its keypoints cannot be had:
    copy checks then find it by its descriptor only."""
    if cache is None:
        return None
    try:
        return copy_vote.vote_vectors(cache.get(sha256, lambda: image))
    except Exception as exc:  # noqa: BLE001 - an optional feature must not fail the image
        logger.warning("image %d: no copy-check keypoints (%s)", image_id, exc)
        return None
