"""Find and repair drift between the SQL catalog (the truth) and Milvus.

Drift, both ways:

* **orphan vectors**: vectors whose image row is missing, deleted or failed -> deleted;
* **stale vectors**: vectors written by another model version than the active one -> deleted;
* **missing vectors**: rows marked indexed that lack a vector in some collection of the active
  version (the copy collection counts) -> marked pending and re-embedded;
* **stale rows**: rows marked indexed by another model version -> pending and re-embedded;
* **orphan blobs** (when given the blob store): stored bytes that no image row and no screening
  job names, older than an hour (an ingest in flight writes its blob just before its row)
  -> deleted.
* **orphan keypoints**: copy-check voting keypoints of images that are not live -> deleted.
  Live images without keypoints (indexed before voting existed, or with keypoints turned off)
  are only counted (``without_keypoints``): re-ingesting them, or a reindex to a new model
  version, stores their keypoints.
* **stale pending rows**: images pending past ``pending_resend_after`` whose work was lost (see
  :mod:`agman_milvus.usecases.recovery`) -> sent again (``resend_pending``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from agman_milvus.services.blobs import BlobStore
from agman_milvus.services.store.catalog import LIVE_STATUSES, Catalog, ImageStatus
from agman_milvus.services.store.vectors import VectorStore

log = logging.getLogger(__name__)

Reembed = Callable[[list[int]], None]
#: ``resend_pending(dry_run)``: how many stale pending images there are (dry run) or were re-sent.
ResendPending = Callable[[bool], int]


@dataclass
class ReconcileReport:
    """What reconcile found, and what it did about it."""

    active_version: str
    dry_run: bool
    indexed_rows: int = 0
    vectors_seen: dict[str, int] = field(default_factory=dict)
    orphan_vectors: dict[str, list[int]] = field(default_factory=dict)
    stale_vectors: dict[str, list[int]] = field(default_factory=dict)
    missing_vectors: list[int] = field(default_factory=list)
    stale_rows: list[int] = field(default_factory=list)
    stale_pending: int = 0
    orphan_keypoints: list[int] = field(default_factory=list)
    without_keypoints: int = 0
    deleted_vectors: int = 0
    orphan_blobs: list[str] = field(default_factory=list)
    reembedded: int = 0
    unrepaired: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """True when no drift was found."""
        return not (any(self.orphan_vectors.values()) or any(self.stale_vectors.values())
                    or self.missing_vectors or self.stale_rows or self.stale_pending
                    or self.orphan_keypoints)

    def to_dict(self) -> dict[str, object]:
        return {
            "active_version": self.active_version, "dry_run": self.dry_run, "clean": self.clean,
            "indexed_rows": self.indexed_rows, "vectors_seen": self.vectors_seen,
            "orphan_vectors": {k: len(v) for k, v in self.orphan_vectors.items()},
            "stale_vectors": {k: len(v) for k, v in self.stale_vectors.items()},
            "missing_vectors": len(self.missing_vectors), "stale_rows": len(self.stale_rows),
            "stale_pending": self.stale_pending,
            "orphan_keypoints": len(self.orphan_keypoints), "without_keypoints": self.without_keypoints,
            "deleted_vectors": self.deleted_vectors, "orphan_blobs": len(self.orphan_blobs),
            "reembedded": self.reembedded,
            "unrepaired": self.unrepaired,
        }


def reconcile(
    catalog: Catalog,
    vectors: VectorStore,
    active_version: str,
    *,
    dry_run: bool,
    reembed: Reembed | None,
    batch_size: int = 500,
    blobs: BlobStore | None = None,
    resend_pending: ResendPending | None = None,
) -> ReconcileReport:
    """Compare the catalog with the active version's collections and (unless ``dry_run``) repair.

    ``reembed(image_ids)`` must (re)write the images' vectors and mark them indexed; it is
    called in batches of ``batch_size`` after the rows were marked pending. Without it, missing
    vectors are only reported. ``resend_pending`` counts (dry run) or re-sends stale pending
    images; their number is ``stale_pending`` (found by a dry run, re-sent otherwise).
    """
    if vectors.model_version != active_version:
        raise ValueError(
            f"the vector store is for model version {vectors.model_version!r}, "
            f"not the active version {active_version!r}"
        )
    report = ReconcileReport(active_version=active_version, dry_run=dry_run)
    if blobs is not None:
        screened = catalog.screening_jobs.blob_ids()
        report.orphan_blobs = blobs.sweep_orphans(
            lambda ids: catalog.images.referenced_sha256(ids) | (screened & set(ids)), dry_run=dry_run
        )

    live = {image_id for image_id, _ in catalog.images.iter_ids(LIVE_STATUSES)}
    indexed: dict[int, str | None] = dict(catalog.images.iter_ids(ImageStatus.indexed))
    report.indexed_rows = len(indexed)
    report.stale_rows = sorted(i for i, v in indexed.items() if v != active_version)

    existing = vectors.existing_collections()
    current_ids = {i for i, v in indexed.items() if v == active_version}
    missing: set[int] = set()
    for label, name in vectors.collection_names().items():
        seen: set[int] = set()
        orphans, stale = [], []
        if name in existing:
            for image_id, version in vectors.iter_image_ids(name):
                seen.add(image_id)
                if image_id not in live:
                    orphans.append(image_id)
                elif version != active_version:
                    stale.append(image_id)
        else:
            log.warning("collection %s of the active version does not exist", name)
        report.vectors_seen[label] = len(seen)
        report.orphan_vectors[label] = sorted(orphans)
        report.stale_vectors[label] = sorted(stale)
        missing |= current_ids - seen
        missing |= set(stale) & current_ids
    report.missing_vectors = sorted(missing)
    with_keypoints = vectors.keypoint_image_ids()
    report.orphan_keypoints = sorted(with_keypoints - live)
    report.without_keypoints = len(set(indexed) - with_keypoints)
    if resend_pending is not None:
        report.stale_pending = resend_pending(dry_run)
    log.info("reconcile found: %s", report.to_dict())

    if dry_run:
        return report

    for label, name in vectors.collection_names().items():
        doomed = report.orphan_vectors[label] + report.stale_vectors[label]
        vectors.delete_from(name, doomed, batch_size)
        report.deleted_vectors += len(doomed)
    vectors.delete_keypoints(report.orphan_keypoints)

    todo = sorted(set(report.missing_vectors) | set(report.stale_rows))
    if not todo:
        return report
    if reembed is None:
        report.unrepaired.append(
            f"{len(todo)} images need re-embedding but no embedding pipeline is available "
            "(agman_milvus.usecases.ingest.reembed_images); they were left as they are"
        )
        return report
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        catalog.images.mark_pending(batch)
        reembed(batch)
        report.reembedded += len(batch)
    return report
