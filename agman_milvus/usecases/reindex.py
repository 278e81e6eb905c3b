"""Model upgrade: embed the catalog with a new checkpoint, then switch versions.

The new model version gets its own collections (see :mod:`agman_milvus.services.store.vectors`); the
old version's collections, SQL rows and aliases stay as they are and keep serving searches
while the new ones fill. ``images.model_version`` keeps naming the version whose *active*
collections hold the image until the switch, so ``agman reconcile`` sees a consistent
deployment at every moment (it never looks at a version that is not active).

An image counts as finished for the new version when it has a row in every one of its
collections whose filter metadata equals the catalog's; a re-run embeds only the rest.

Activation, in order: catch-up rounds (images ingested, edited or deleted meanwhile), images
the new model cannot read are marked failed, then one SQL transaction makes the new version
active and its finished images indexed by it, then the Milvus aliases move. Every single
search reads one collection of one version, so no search mixes versions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agman_milvus.core.config import Settings
from agman_milvus.core.engine import Batch, EmbeddingEngine, batched
from agman_milvus.core.errors import AgmanError
from agman_milvus.services.container import Services
from agman_milvus.services.embedding import Embedder, EncodedBatch
from agman_milvus.services.local_features import LocalFeatureCache, cache_root
from agman_milvus.services.store.catalog import LIVE_STATUSES, Catalog, ImageStatus
from agman_milvus.services.store.tables import Image
from agman_milvus.services.store.vectors import COPY, VectorStore
from agman_milvus.usecases.indexing import vector_rows
from agman_milvus.usecases.row_decoding import DecodedRow, decode_image_row

logger = logging.getLogger(__name__)

__all__ = ["ReindexError", "ReindexReport", "reindex"]

#: Passes over the catalog at activation time before switching anyway (ingest never stops).
CATCH_UP_ROUNDS = 3

Progress = Callable[[int, int], None]


class ReindexError(AgmanError, RuntimeError):
    """A reindex that cannot run as asked; the message says why."""


@dataclass
class ReindexReport:
    """What one :func:`reindex` call did."""

    old_version: str | None
    new_version: str
    live_images: int = 0
    already_done: int = 0  # finished by an earlier run
    embedded: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    pruned: int = 0  # new-version vectors of images that are no longer live, removed
    activated: bool = False
    switched_rows: int = 0  # image rows now indexed by the new version
    left_for_reconcile: list[int] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "old_version": self.old_version, "new_version": self.new_version,
            "live_images": self.live_images, "already_done": self.already_done,
            "embedded": len(self.embedded), "failed": len(self.failed), "pruned": self.pruned,
            "activated": self.activated, "switched_rows": self.switched_rows,
            "left_for_reconcile": len(self.left_for_reconcile), "dropped": self.dropped,
            "seconds": round(self.seconds, 2),
        }


@dataclass
class _State:
    """The new version's collections compared with the catalog."""

    live: set[int]
    finished: set[int]  # live, in every collection, metadata up to date
    stray: set[int]  # in some collection but no longer live


def reindex(
    target: Services | Settings,
    checkpoint: str | Path | None = None,
    activate: bool = True,
    drop_old: bool = False,
    *,
    batch_size: int | None = None,
    on_progress: Progress | None = None,
) -> ReindexReport:
    """Embed every live image with ``checkpoint`` (default: the settings' checkpoint) into
    that version's collections; with ``activate`` make it the active version; with
    ``drop_old`` then drop the previously active version's collections.

    Resumable: images already finished for the new version are skipped.
    ``on_progress(done, total)`` is called after each batch.
    """
    if drop_old and not activate:
        raise ReindexError(
            "drop_old needs activate: the old version's collections serve every search until "
            "the new version is activated"
        )
    services = target if isinstance(target, Services) else Services(target)
    try:
        return _reindex(services, checkpoint, activate, drop_old, batch_size, on_progress)
    finally:
        if services is not target:
            services.close()


def _reindex(
    services: Services, checkpoint: str | Path | None, activate: bool, drop_old: bool,
    batch_size: int | None, on_progress: Progress | None,
) -> ReindexReport:
    started = time.perf_counter()
    settings = services.settings
    embedder = _embedder(services, checkpoint)
    catalog = services.catalog
    old = catalog.model_versions.active()
    new_version = embedder.version
    report = ReindexReport(old_version=old.version if old else None, new_version=new_version)
    store = VectorStore.from_settings(
        settings, embedder.schema, new_version,
        embed_dim=embedder.embed_dim, descriptor_dim=embedder.descriptor_dim,
    )
    if old is not None and old.version == new_version:
        logger.info("model version %s is already active; nothing to reindex", new_version)
        if not store.is_active:  # a switch interrupted between SQL and Milvus
            store.activate()
        report.activated = True
        report.seconds = time.perf_counter() - started
        return report

    store.ensure_collections()  # never activates while another version is active
    model = embedder.model
    source = checkpoint if checkpoint is not None else settings.checkpoint
    catalog.model_versions.register(
        new_version, name=str(getattr(model, "model_name", "unknown")),
        backbone=str(getattr(model, "backbone_name", "unknown")),
        attribute_schema=embedder.schema.to_json(), embed_dim=embedder.embed_dim,
        descriptor_dim=embedder.descriptor_dim,
        checkpoint_path=str(source) if source is not None else None,
    )
    logger.info("reindexing into model version %s (active: %s)", new_version, report.old_version)

    rounds = CATCH_UP_ROUNDS if activate else 1
    state = _compare(store, catalog)
    # keypoints are every version's: only images indexed before voting existed lack them
    with_keypoints = store.keypoint_image_ids() if settings.copy_keypoints else None
    report.live_images = len(state.live)
    report.already_done = len(state.finished)
    for attempt in range(rounds + 1):
        report.pruned += _delete_from(store, state.stray)
        todo = sorted(state.live - state.finished - report.failed.keys())
        if not todo or attempt == rounds:
            break
        if attempt:
            logger.info("catch-up round %d: %d images changed meanwhile", attempt, len(todo))
        lacking = set(todo) - with_keypoints if with_keypoints is not None else set()
        _embed(todo, lacking, services, embedder, store, report, batch_size or settings.batch_size,
               on_progress, done=len(state.finished & state.live), total=len(state.live))
        if with_keypoints is not None:
            with_keypoints |= lacking
        state = _compare(store, catalog)

    missing = state.live - state.finished
    if not activate:
        logger.info("model version %s holds %d of %d live images; not activated",
                    new_version, len(state.finished), len(state.live))
        report.seconds = time.perf_counter() - started
        return report

    for image_id in sorted(missing & report.failed.keys()):
        catalog.images.mark_failed(image_id, f"{report.failed[image_id]} (model {new_version})")
    report.switched_rows = catalog.model_versions.switch(new_version, sorted(state.finished))
    store.activate()
    report.activated = True
    report.left_for_reconcile = sorted(missing - report.failed.keys())
    if report.left_for_reconcile:
        logger.warning("%d images changed during the switch; run `agman reconcile`",
                       len(report.left_for_reconcile))
    logger.info("model version %s is active (%d images)", new_version, report.switched_rows)
    if drop_old and report.old_version is not None:
        report.dropped = store.drop_version(report.old_version)
        logger.info("dropped the collections of model version %s: %s", report.old_version,
                    ", ".join(report.dropped))
    report.seconds = time.perf_counter() - started
    return report


def _embedder(services: Services, checkpoint: str | Path | None) -> Embedder:
    """The settings' embedder, or a new one for another checkpoint."""
    settings = services.settings
    if checkpoint is None or (
        settings.checkpoint is not None
        and Path(checkpoint).resolve() == settings.checkpoint.resolve()
    ):
        return services.embedder
    path = Path(checkpoint)
    if not path.is_file():
        raise ReindexError(f"checkpoint {path} does not exist")
    return Embedder(checkpoint=path, device=settings.device, batch_size=settings.batch_size,
                    precision=settings.precision)


# -- comparing ---------------------------------------------------------------------------------
def _compare(store: VectorStore, catalog: Catalog) -> _State:
    """Which live images the new version has finished (all collections, current metadata)."""
    live = {image_id for image_id, _ in catalog.images.iter_ids(LIVE_STATUSES)}
    everywhere: set[int] | None = None
    anywhere: set[int] = set()
    stored_meta: dict[int, dict[str, Any]] = {}
    for label, name in store.collection_names().items():
        fields = store.filter_fields if label == COPY else ()
        ids = set()
        for row in store.scan(name, fields):
            image_id = int(row["image_id"])
            ids.add(image_id)
            if fields:
                stored_meta[image_id] = {f: row[f] for f in fields}
        anywhere |= ids
        everywhere = ids if everywhere is None else everywhere & ids
    finished = (everywhere or set()) & live
    info = catalog.images.info(sorted(finished))
    for image_id in list(finished):
        meta = info.get(image_id)
        if meta is None or meta.product_deleted:
            finished.discard(image_id)
        elif store.filter_metadata(meta.metadata()) != stored_meta.get(image_id):
            finished.discard(image_id)  # product edited since: write it again
    return _State(live=live, finished=finished, stray=anywhere - live)


def _delete_from(store: VectorStore, image_ids: Iterable[int]) -> int:
    """Remove images from the new version's collections only."""
    ids = sorted(int(i) for i in image_ids)
    if not ids:
        return 0
    for name in store.collection_names().values():
        store.delete_from(name, ids)
    return len(ids)


# -- embedding ---------------------------------------------------------------------------------
def _embed(
    image_ids: list[int], lacking: set[int], services: Services, embedder: Embedder, store: VectorStore,
    report: ReindexReport, batch_size: int, on_progress: Progress | None, *, done: int,
    total: int,
) -> None:
    """Decode (next batch ahead, in threads), embed and write ``image_ids`` to ``store`` (in a
    writer thread, while the next batch embeds), on the embedding engine. The ``lacking``
    images (no copy-check keypoints stored) get them on the way.

    SQL is not changed: the rows keep serving the active version until the switch.
    """
    settings, catalog = services.settings, services.catalog
    preprocess = embedder.model.preprocess
    names = embedder.schema.names
    chunks = list(batched(image_ids, batch_size))
    keypoints = LocalFeatureCache(cache_root(settings.data_dir), memory_items=0) if lacking else None

    def live_rows(ids: list[int]) -> list[Image]:
        rows = catalog.images.get_many(ids)
        return [r for i in ids if (r := rows.get(i)) is not None and r.status in LIVE_STATUSES]

    def decode(row: Image) -> DecodedRow:
        return decode_image_row(row.id, row.sha256, row.source_uri, blobs=services.blobs,
                                settings=settings, preprocess=preprocess,
                                local_features=keypoints if row.id in lacking else None)

    def write(batch: Batch[Image, DecodedRow], encoded: EncodedBatch | None) -> list[int]:
        return _write(store, catalog, batch.ok, names, encoded) if encoded is not None else []

    def finish(batch: Batch[Image, DecodedRow], written: list[int]) -> None:
        nonlocal done
        failures = batch.failures
        report.failed.update((row.id, reason) for row, reason in failures)
        report.embedded += written
        done += len(chunks[batch.number])
        logger.info("reindex batch %d/%d: %d written, %d failed | %s", batch.number + 1,
                    len(chunks), len(written), len(failures), batch.timing_text())
        if on_progress is not None:
            on_progress(min(done, total), total)

    engine = EmbeddingEngine(decode, embedder.encode_tensor, write, name="agman-reindex",
                             decode_workers=settings.decode_workers, write_in_thread=True)
    engine.run((live_rows(ids) for ids in chunks), finish)


def _write(
    store: VectorStore, catalog: Catalog, ok: Sequence[DecodedRow], names: Sequence[str],
    encoded: EncodedBatch,
) -> list[int]:
    """Upsert the batch's live images; undo images deleted while they were embedded."""
    info = catalog.images.info([d.image_id for d in ok])
    keep = [j for j, d in enumerate(ok) if (m := info.get(d.image_id)) is not None
            and m.status in LIVE_STATUSES and not m.product_deleted]
    store.upsert(vector_rows(ok, keep, info, names, encoded.embeddings, encoded.descriptors))
    store.upsert_keypoints((ok[j].image_id, info[ok[j].image_id].product_id, ok[j].keypoints)
                           for j in keep if ok[j].keypoints is not None)
    ids = [ok[j].image_id for j in keep]
    rows = catalog.images.get_many(ids)
    gone = [i for i in ids if i not in rows or rows[i].status == ImageStatus.deleted]
    _delete_from(store, gone)
    gone_set = set(gone)
    return [i for i in ids if i not in gone_set]
