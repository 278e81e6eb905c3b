"""Ingest use cases: product/image events in, SQL rows + Milvus vectors out.

Shared by the Celery workers and the embedded single-process mode:

* :func:`register_image` records a product and one of its images (bytes go to the blob
  store) and says whether the image still needs embedding;
* :func:`index_images` (re-exported from :mod:`agman_milvus.pipeline`) embeds images and
  stores their vectors; :func:`reembed_images` forces it (for ``agman reconcile``);
* :func:`delete_product` and :func:`update_product` keep Milvus in step with SQL.

Every event is validated first (:func:`agman_milvus.services.store.validation.validate_product`:
an :class:`InvalidProductError` before anything is read or stored), and a local source must
pass the source policy and the image header checks (:func:`probe_image_bytes`) before its bytes
enter the blob store: what is not an image is recorded as failed and never kept.

Image identity: an image is keyed by ``(product, sha256)``. For bytes, PIL images, local paths
and ``file://`` URIs the bytes are read when the event arrives, so ``sha256`` is the content's
hash and the same picture sent twice is one row. ``http(s)://`` images are fetched later by
the worker (an event handler must not block on downloads); they are keyed by the SHA-256 of
their URI (``"uri:" + uri``), so the same URL sent twice is one row.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image as PILImage

from agman_milvus.core.config import Settings
from agman_milvus.core.errors import InvalidProductError
from agman_milvus.core.images import ImageError, ImageSource, probe_image_bytes, read_image_bytes
from agman_milvus.services.blobs import BlobStore, InvalidBlobIdError, is_blob_uri, parse_blob_uri
from agman_milvus.services.container import Services, get_services
from agman_milvus.services.store.catalog import (
    PRODUCT_FIELDS,
    TRANSIENT_SQL_ERRORS,
    CatalogError,
    ImageStatus,
    Product,
)
from agman_milvus.services.store.validation import validate_product
from agman_milvus.services.store.vectors import COPY, VectorRow
from agman_milvus.usecases.indexing import IndexReport, index_images
from agman_milvus.usecases.row_decoding import failure_text

logger = logging.getLogger(__name__)

__all__ = [
    "IndexReport", "InvalidProductError", "Registration", "TRANSIENT_ERRORS", "UnknownProductError",
    "delete_product", "index_images", "reembed_images", "refresh_metadata", "register_image",
    "update_product",
]


def _transient_errors() -> tuple[type[BaseException], ...]:
    from pymilvus import MilvusException

    return (
        MilvusException,  # Milvus unavailable, timeouts, server-side errors
        *TRANSIENT_SQL_ERRORS,  # database connection lost or closed, lock or pool timeouts
        ConnectionError,  # sockets refused/reset (Redis, gRPC plumbing)
        TimeoutError,
    )


#: Errors worth retrying (with backoff): infrastructure trouble, never bad input. A bad image is
#: not an error at this level at all: it is recorded as failed and the batch goes on.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = _transient_errors()


class UnknownProductError(CatalogError, LookupError):
    """An event names a product the catalog has never seen."""


@dataclass(frozen=True)
class Registration:
    """The outcome of recording one image event in SQL."""

    image_id: int
    product_id: int  # SQL id (the Milvus ``product_id``)
    external_id: str
    created: bool  # False: this product already had this image (a duplicate event)
    status: ImageStatus
    reason: str | None
    needs_embedding: bool  # the caller must dispatch it (pending now)


# -- reading an event's image ----------------------------------------------------------------
@dataclass(frozen=True)
class _Source:
    sha256: str
    source_uri: str | None
    error: str | None = None
    new_blob: bool = False  # this event wrote the blob (removed again if registering fails)


def _uri_scheme(value: str) -> str | None:
    head, sep, _ = value.partition("://")
    return head.lower() if sep and head.replace("+", "").replace("-", "").replace(".", "").isalnum() else None


def _ref_key(ref: str) -> str:
    return hashlib.sha256(b"uri:" + ref.encode("utf-8", "surrogatepass")).hexdigest()


def _store(data: bytes, source_uri: str | None, blobs: BlobStore, settings: Settings) -> _Source:
    """Check the header, then keep the bytes: what is not an image never enters the store."""
    try:
        probe_image_bytes(data, settings=settings, source=source_uri)
    except ImageError as exc:
        return _Source(BlobStore.sha256(data), source_uri, failure_text(exc))
    return _keep(data, source_uri, blobs)


def _keep(data: bytes, source_uri: str | None, blobs: BlobStore) -> _Source:
    """Keep bytes already known to be an image."""
    sha, new = blobs.put_new(data)
    return _Source(sha, source_uri or BlobStore.uri(sha), new_blob=new)


def _resolve_source(image: ImageSource, blobs: BlobStore, settings: Settings) -> _Source:
    """Read the event's bytes (when it has them) and store them if they are an image; name
    the image's key and origin."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        raw = bytes(image)
        try:
            data = read_image_bytes(raw, settings=settings)
        except ImageError as exc:
            return _Source(hashlib.sha256(raw).hexdigest(), None, failure_text(exc))
        return _store(data, None, blobs, settings)
    if isinstance(image, PILImage.Image):
        try:
            data = read_image_bytes(image, settings=settings)
        except ImageError as exc:
            return _Source(_ref_key(f"pil:{image.mode}:{image.size}"), None, failure_text(exc))
        return _keep(data, None, blobs)  # checked and decoded before it was encoded: no probe
    if isinstance(image, os.PathLike):
        image = os.fspath(image)
    if not isinstance(image, str):
        return _Source(_ref_key(repr(type(image))), None,
                       f"unsupported_type: cannot ingest a {type(image).__name__}; pass a path, "
                       "a file:// or http(s):// URI, bytes or a PIL image")
    scheme = _uri_scheme(image)
    if scheme in ("http", "https"):
        return _Source(_ref_key(image), image)  # fetched by the worker
    if scheme == "blob" or is_blob_uri(image):
        try:
            sha = parse_blob_uri(image)
        except InvalidBlobIdError as exc:
            return _Source(_ref_key(image), image, f"invalid_uri: {exc}")
        if not blobs.exists(sha):
            return _Source(sha, image, f"missing_blob: no blob {sha} in {blobs.root}")
        return _Source(sha, image)
    try:
        data = read_image_bytes(image, settings=settings)
    except ImageError as exc:
        return _Source(_ref_key(image), image, failure_text(exc))
    source = image if scheme else str(Path(image).absolute())
    found = _store(data, source, blobs, settings)
    return found if found.error is None else _Source(_ref_key(image), image, found.error)


def _forget_blob(source: _Source, services: Services) -> None:
    """Remove a blob this event wrote when its rows could not be recorded (no orphan left)."""
    if not source.new_blob:
        return
    try:
        if services.catalog.images.referenced_sha256([source.sha256]):
            return  # another event recorded the same bytes meanwhile
    except Exception:  # noqa: BLE001 - the database is what failed; the blob is ours alone
        logger.debug("cannot check blob %s against the catalog; removing it", source.sha256)
    services.blobs.delete(source.sha256)


# -- events ------------------------------------------------------------------------------------
def _product_state(product: Product | None) -> tuple[Any, ...] | None:
    if product is None:
        return None
    return (*(getattr(product, f) for f in PRODUCT_FIELDS), dict(product.extra or {}), product.deleted)


def register_image(
    services: Services,
    product_id: str,
    image: ImageSource,
    metadata: Mapping[str, Any] | None = None,
) -> Registration:
    """Record ``product_id`` (external id) with ``metadata`` and one image of it.

    Idempotent: the same image of the same product sent again returns the same row
    (``created`` False). A pending row, or a failed one whose bytes now read, comes back with
    ``needs_embedding`` so a lost or failed delivery is retried. A bad source (missing file,
    unsupported scheme, empty bytes, not an image...) is recorded as failed with its reason
    right away, and its bytes are not kept. Changed product metadata is pushed to the Milvus
    filter fields of its indexed images. An invalid product id or metadata raises
    :class:`InvalidProductError` before anything is read or stored.
    """
    metadata = validate_product(product_id, metadata, filter_fields=services.settings.filter_fields)
    source = _resolve_source(image, services.blobs, services.settings)
    try:
        return _record(services, product_id, source, metadata)
    except BaseException:
        _forget_blob(source, services)
        raise


def _record(services: Services, product_id: str, source: _Source, metadata: Mapping[str, Any]
            ) -> Registration:
    """The SQL half of :func:`register_image`."""
    catalog = services.catalog
    before = _product_state(catalog.products.get(product_id)) if metadata else None
    product = catalog.products.upsert(product_id, metadata)
    if before is not None and before != _product_state(product):
        refresh_metadata(catalog.images.indexed_ids(product.id), services)
    row, created = catalog.images.add(product.id, source.sha256, source_uri=source.source_uri)
    status, reason, needs = row.status, row.failure_reason, False
    if source.error is not None:
        catalog.images.mark_failed(row.id, source.error)
        status, reason = ImageStatus.failed, source.error
    elif row.status == ImageStatus.pending:
        needs = True
    elif row.status == ImageStatus.failed and not created:
        catalog.images.mark_pending([row.id])
        status, reason, needs = ImageStatus.pending, None, True
    return Registration(
        image_id=row.id, product_id=product.id, external_id=product_id, created=created,
        status=status, reason=reason, needs_embedding=needs,
    )


def refresh_metadata(image_ids: Sequence[int], services: Services) -> int:
    """Rewrite the Milvus rows of indexed images with their product's current metadata.

    Vectors are read back from Milvus (no model run) and upserted with the new filter fields.
    Images missing a vector somewhere are left alone (``agman reconcile`` repairs those).
    Returns the number of images rewritten.
    """
    ids = [int(i) for i in image_ids]
    if not ids:
        return 0
    store = services.active_vectors()
    if store is None:
        return 0
    info = services.catalog.images.info(ids)
    labels = [*store.schema.names, COPY]
    stored = {label: store.get_vectors(label, ids, "Strong") for label in labels}  # fresh writes
    rows = []
    for image_id in ids:
        meta = info.get(image_id)
        if meta is None or meta.status != ImageStatus.indexed or meta.product_deleted:
            continue
        if any(image_id not in stored[label] for label in labels):
            logger.warning("image %d lacks vectors in some collection; left for reconcile", image_id)
            continue
        rows.append(VectorRow(
            image_id=image_id, product_id=meta.product_id,
            vectors={name: stored[name][image_id] for name in store.schema.names},
            descriptor=stored[COPY][image_id], metadata=meta.metadata(),
        ))
    written = store.upsert(rows)
    logger.info("refreshed Milvus metadata of %d images", written)
    return written


def update_product(
    product_id: str, metadata: Mapping[str, Any], services: Services | None = None
) -> int:
    """Change a product's metadata in SQL, then in the Milvus rows of its indexed images.

    Returns the number of images whose Milvus rows were rewritten.
    """
    services = services or get_services()
    metadata = validate_product(product_id, metadata, filter_fields=services.settings.filter_fields)
    catalog = services.catalog
    if catalog.products.get(product_id) is None:
        raise UnknownProductError(f"no product with id {product_id!r}; ingest an image of it first")
    product = catalog.products.upsert(product_id, metadata)
    return refresh_metadata(catalog.images.indexed_ids(product.id), services)


def delete_product(product_id: str, services: Services | None = None) -> list[int]:
    """Delete a product: its vectors leave every collection before its rows are marked deleted.

    Idempotent (deleting twice is harmless). Vectors that an in-flight embedding writes after
    this are removed by that pipeline itself when it sees the rows deleted. Returns the ids of
    the product's images.
    """
    services = services or get_services()
    catalog = services.catalog
    product = catalog.products.get(product_id)
    if product is None:
        raise UnknownProductError(f"no product with id {product_id!r}")
    store = services.active_vectors()
    if store is not None:
        store.delete_product(product.id)
    image_ids = catalog.products.soft_delete(product_id)
    if store is not None and image_ids:
        store.delete_images(image_ids)  # anything written between the two steps
    logger.info("deleted product %s (%d images)", product_id, len(image_ids))
    return image_ids


def reembed_images(
    image_ids: Sequence[int], services: Services | None = None, *, settings: Settings | None = None
) -> IndexReport:
    """Embed ``image_ids`` again even if indexed (the ``reembed`` of ``agman reconcile``)."""
    if services is None:
        services = _services_for(settings) if settings is not None else get_services()
    return index_images(list(image_ids), services, force=True)


_by_settings: dict[int, tuple[Settings, Services]] = {}


def _services_for(settings: Settings) -> Services:
    """One Services per Settings object (reconcile calls us once per batch)."""
    entry = _by_settings.get(id(settings))
    if entry is None or entry[0] is not settings:
        entry = _by_settings[id(settings)] = (settings, Services(settings))
    return entry[1]
