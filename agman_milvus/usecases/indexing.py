"""Index images: read/decode -> model -> write, with the stages overlapped.

Batches of catalog rows run on the embedding engine (:mod:`agman_milvus.core.engine`): a
thread pool reads and decodes batch n+1 while the model runs batch n, and a writer thread
stores batch n-1 (vectors into every Milvus collection, then the SQL status) meanwhile, in the
style of clip-retrieval's reader -> mapper -> writer. Per-stage timings are logged per batch.

Guarantees:

* a bad image is marked failed with its reason; the rest of the batch goes on;
* each image's SIFT keypoints are extracted in the decode threads (and cached on disk for
  copy verification) and written to the copy check's voting collection beside its vectors;
* vectors are written before a row is marked indexed, so SQL never claims a vector that Milvus
  lacks; an image deleted while it was being embedded has its fresh vectors removed again;
* re-running a batch (task redelivery) rewrites the same rows by primary key: no duplicates.
  Images already indexed by the current model version are skipped unless ``force``.

Errors of Milvus or the database propagate (the caller, e.g. a Celery task, retries them);
the images they concern simply stay pending.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from agman_milvus.core.engine import STAGES, Batch, EmbeddingEngine
from agman_milvus.services.embedding import EncodedBatch
from agman_milvus.services.local_features import LocalFeatureCache, cache_root
from agman_milvus.services.store.catalog import Catalog, ImageFeatures, ImageInfo, ImageStatus
from agman_milvus.services.store.tables import Image
from agman_milvus.services.store.vectors import VectorRow
from agman_milvus.usecases.row_decoding import DecodedRow, decode_image_row

logger = logging.getLogger(__name__)

__all__ = ["IndexReport", "index_images", "vector_rows"]


@dataclass
class IndexReport:
    """What one :func:`index_images` call did. ``timings`` are seconds per stage:
    ``read_decode`` (summed over decode threads), ``decode_wait`` (the model waiting for
    decoded images), ``model``, ``write`` (writer thread), ``write_wait`` (the model waiting
    for the writer) and ``total`` (wall clock)."""

    indexed: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)
    model_version: str | None = None
    batches: int = 0
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys((*STAGES, "total"), 0.0))

    @property
    def images_per_second(self) -> float:
        done = len(self.indexed) + len(self.failed)
        return done / self.timings["total"] if self.timings["total"] > 0 else 0.0

    def merge(self, other: IndexReport) -> None:
        self.indexed += other.indexed
        self.failed.update(other.failed)
        self.skipped += other.skipped
        self.batches += other.batches
        self.model_version = other.model_version or self.model_version
        for key, value in other.timings.items():
            self.timings[key] = self.timings.get(key, 0.0) + value

    def to_dict(self) -> dict[str, object]:
        return {
            "indexed": len(self.indexed), "failed": len(self.failed), "skipped": len(self.skipped),
            "batches": self.batches, "model_version": self.model_version,
            "images_per_second": round(self.images_per_second, 2),
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }


def vector_rows(
    ok: Sequence[DecodedRow], keep: Iterable[int], info: Mapping[int, ImageInfo],
    names: Sequence[str], embeddings: np.ndarray, descriptors: np.ndarray,
) -> Iterator[VectorRow]:
    """Milvus rows for the images ``ok[j]``, ``j`` in ``keep``: one vector per attribute, the
    copy descriptor and the product's filter metadata."""
    for j in keep:
        image = info[ok[j].image_id]
        yield VectorRow(
            image_id=ok[j].image_id, product_id=image.product_id,
            vectors={name: embeddings[j, k] for k, name in enumerate(names)},
            descriptor=descriptors[j], metadata=image.metadata(),
        )


def _record_features(catalog: Catalog, decoded: Sequence[DecodedRow]) -> None:
    """Store width, height and perceptual hash of decoded images."""
    catalog.images.record_features(ImageFeatures(d.image_id, d.width, d.height, d.phash) for d in decoded)


def _batches(
    image_ids: Iterable[int], size: int, catalog: Catalog, version: str, force: bool,
    report: IndexReport,
) -> Iterator[list[Image]]:
    """Group ids (possibly still arriving) into batches of rows that need embedding."""
    seen: set[int] = set()

    def make(ids: list[int]) -> list[Image]:
        rows = catalog.images.get_many(ids)
        todo = []
        for image_id in ids:
            row = rows.get(image_id)
            if row is None or row.status == ImageStatus.deleted:
                report.skipped.append(image_id)
            elif not force and row.status == ImageStatus.indexed and row.model_version == version:
                report.skipped.append(image_id)
            else:
                todo.append(row)
        return todo

    buffer: list[int] = []
    for raw in image_ids:
        image_id = int(raw)
        if image_id in seen:
            continue
        seen.add(image_id)
        buffer.append(image_id)
        if len(buffer) == size:
            batch = make(buffer)
            buffer = []
            if batch:
                yield batch
    if buffer and (batch := make(buffer)):
        yield batch


def index_images(
    image_ids: Iterable[int],
    services: Services,  # noqa: F821 - agman_milvus.services.container.Services (imported lazily)
    *,
    force: bool = False,
    batch_size: int | None = None,
    on_batch: Callable[[IndexReport], None] | None = None,
) -> IndexReport:
    """Embed and store ``image_ids`` (SQL image ids); see the module docstring.

    ``image_ids`` may be a lazy iterable (ids still being registered): batches are formed as
    ids arrive, so embedding starts with the first full batch.

    ``batch_size`` images go through the model at once (default: ``settings.batch_size``);
    ``on_batch`` is called with each written batch's report (e.g. for progress).
    """
    settings = services.settings
    started = time.perf_counter()
    report = IndexReport()
    catalog = services.catalog
    embedder = services.embedder
    vectors = services.vectors  # loads the model and ensures the collections
    version = embedder.version
    report.model_version = version
    preprocess = embedder.model.preprocess
    names = embedder.schema.names

    local_features = (LocalFeatureCache(cache_root(settings.data_dir), memory_items=0)
                      if settings.copy_keypoints else None)

    def decode(row: Image) -> DecodedRow:
        return decode_image_row(row.id, row.sha256, row.source_uri, blobs=services.blobs,
                                settings=settings, preprocess=preprocess,
                                local_features=local_features)

    def store(ok: list[DecodedRow], encoded: EncodedBatch, number: int) -> tuple[list[int], list[int]]:
        """Vectors first, then SQL; returns (indexed, skipped) image ids."""
        info = catalog.images.info([d.image_id for d in ok])
        keep = [j for j, d in enumerate(ok) if d.image_id in info
                and info[d.image_id].status != ImageStatus.deleted
                and not info[d.image_id].product_deleted]
        vectors.upsert(vector_rows(ok, keep, info, names, encoded.embeddings, encoded.descriptors))
        vectors.upsert_keypoints((ok[j].image_id, info[ok[j].image_id].product_id, ok[j].keypoints)
                                 for j in keep if ok[j].keypoints is not None)
        written = [ok[j] for j in keep]
        _record_features(catalog, written)
        ids = [d.image_id for d in written]
        catalog.images.mark_indexed(ids, version)
        # An image deleted while we embedded it: its row stayed deleted, drop the fresh vectors.
        gone = [i for i, r in catalog.images.get_many(ids).items() if r.status == ImageStatus.deleted]
        if gone:
            vectors.delete_images(gone)
            logger.info("batch %d: %d images were deleted meanwhile; vectors removed",
                        number, len(gone))
        gone_set, keep_set = set(gone), set(keep)
        indexed = [i for i in ids if i not in gone_set]
        return indexed, [d.image_id for j, d in enumerate(ok) if j not in keep_set] + gone

    def write(batch: Batch[Image, DecodedRow], encoded: EncodedBatch | None) -> IndexReport:
        part = IndexReport(batches=1, model_version=version)
        if encoded is not None:
            part.indexed, part.skipped = store(batch.ok, encoded, batch.number)
        for row, reason in batch.failures:
            catalog.images.mark_failed(row.id, reason)
            part.failed[row.id] = reason
        return part

    def finish(batch: Batch[Image, DecodedRow], part: IndexReport) -> None:
        part.timings.update(batch.times)
        logger.info("batch %d: %d images, %d indexed, %d failed | %s", batch.number + 1,
                    len(batch.items), len(part.indexed), len(part.failed), batch.timing_text())
        report.merge(part)
        if on_batch is not None:
            on_batch(part)

    engine = EmbeddingEngine(decode, embedder.encode_tensor, write,
                             decode_workers=settings.decode_workers, write_in_thread=True)
    size = batch_size or settings.batch_size
    engine.run(_batches(image_ids, size, catalog, version, force, report), finish)
    report.timings["total"] = time.perf_counter() - started
    return report
