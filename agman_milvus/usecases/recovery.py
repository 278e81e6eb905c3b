"""Recovery of embedding work: attempts that crash, and pending images nobody is working on.

**Attempts.** A worker *claims* the pending images of a task before embedding them (one attempt
each, ``claimed_at`` stamped). A batch runs as a batch; if it raises anything but infrastructure
trouble (``MemoryError``, a decoder crash), or if one of its images was attempted
:data:`BATCH_ATTEMPTS` times before (its workers died: SIGKILL, out of memory), the batch is split
and its images run one at a time, each claimed on its own. An image is marked failed with its
error, or, after ``settings.max_attempts`` (at least 3: twice in its batch, then alone) attempts
that killed their worker, with a "gave up" reason; its batchmates are indexed. Infrastructure
trouble (``TRANSIENT_ERRORS``) takes its attempt back and propagates, so the caller (the Celery
task) retries.

**Re-sending.** A pending image is *stale* when it was claimed more than
``settings.pending_resend_after`` seconds ago (its worker went silent) or, when the caller
knows no message can still be waiting for it (the queue is empty), when it has waited unclaimed
that long (its message was lost: a Redis restart, a failed publish). :func:`resend_stale`
stamps stale images as sent and hands them to ``submit``, slice by slice until none is left
(the workers' timer, ``agman reconcile`` and a waiting ``agman ingest`` all call it; the stamp
makes them take turns).
Embedding is idempotent (upserts keyed by image id), so a re-send that races a slow worker
costs time, not correctness.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from agman_milvus.services.store.catalog import Catalog
from agman_milvus.services.store.repository import utcnow
from agman_milvus.usecases.indexing import IndexReport, index_images
from agman_milvus.usecases.ingest import TRANSIENT_ERRORS

if TYPE_CHECKING:
    from agman_milvus.services.container import Services

logger = logging.getLogger(__name__)

__all__ = ["BATCH_ATTEMPTS", "RESEND_SLICE", "count_stale", "embed_with_attempts", "resend_stale"]

#: Attempts of a batch as a whole: a worker killed once (a deploy, a crash elsewhere) costs one
#: batch re-run; a batch that killed two workers is split.
BATCH_ATTEMPTS = 2

#: Stale images taken (stamped) and submitted per step of :func:`resend_stale`.
RESEND_SLICE = 1000


def _error_reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"embedding failed: {type(exc).__name__}" + (f": {text}" if text else "")


def _one_by_one(image_ids: Sequence[int], services: Services, *, claim: bool) -> IndexReport:
    """Each image on its own; a crash fails that image only."""
    catalog = services.catalog
    limit = services.settings.max_attempts
    report = IndexReport()
    for n, image_id in enumerate(image_ids):
        if n % 8 == 7:  # a heartbeat: still busy with the rest
            catalog.images.claim(image_ids[n:], count=False)
        if claim:
            attempts = catalog.images.claim([image_id]).get(image_id)
            if attempts is None:  # indexed, failed or deleted meanwhile
                report.skipped.append(image_id)
                continue
            if attempts > limit:
                reason = (f"gave up after {limit} attempts: the worker embedding this image died each "
                          "time (out of memory? see the worker log)")
                catalog.images.mark_failed(image_id, reason)
                report.failed[image_id] = reason
                logger.warning("image %d: %s", image_id, reason)
                continue
        try:
            report.merge(index_images([image_id], services))
        except TRANSIENT_ERRORS:
            catalog.images.unclaim([image_id])
            raise
        except Exception as exc:  # noqa: BLE001 - any crash of this one image is its failure
            reason = _error_reason(exc)
            catalog.images.mark_failed(image_id, reason)
            report.failed[image_id] = reason
            logger.warning("image %d: %s", image_id, reason, exc_info=True)
    return report


def embed_with_attempts(image_ids: Sequence[int], services: Services) -> IndexReport:
    """Embed ``image_ids`` as a worker task does: claimed, split when a batch crashes or
    crashed before; see the module docstring."""
    catalog = services.catalog
    ids = list(dict.fromkeys(int(i) for i in image_ids))
    attempts = catalog.images.claim(ids)  # counts this attempt; the earlier ones are one less
    crashed_before = sum(1 for a in attempts.values() if a > BATCH_ATTEMPTS)
    if crashed_before:
        logger.info("%d of %d images were attempted %d times before: embedding them one by one",
                    crashed_before, len(ids), BATCH_ATTEMPTS)
        # Take the batch attempt back (the claim stamp stays): attempts count one by one.
        catalog.images.unclaim(list(attempts))
        return _one_by_one(ids, services, claim=True)
    claimed = list(attempts)

    def still_busy(_part: IndexReport) -> None:  # a heartbeat per written batch
        catalog.images.claim(claimed, count=False)

    try:
        return index_images(ids, services, on_batch=still_busy)
    except TRANSIENT_ERRORS:
        catalog.images.unclaim(claimed)
        raise
    except Exception:  # noqa: BLE001 - a poison image must not take its batchmates down
        logger.warning("a batch of %d images crashed; embedding them one by one", len(ids), exc_info=True)
        return _one_by_one(ids, services, claim=False)


def _cutoff(resend_after: float) -> datetime:
    return utcnow() - timedelta(seconds=resend_after)


def count_stale(catalog: Catalog, resend_after: float, *, unclaimed: bool) -> int:
    """How many pending images are stale (see the module docstring); nothing is changed."""
    return catalog.images.count_stale(_cutoff(resend_after), unclaimed=unclaimed)


def resend_stale(
    catalog: Catalog, submit: Callable[[list[int]], None], resend_after: float, *, unclaimed: bool,
    image_ids: Sequence[int] | None = None, limit: int = RESEND_SLICE,
) -> int:
    """Take stale pending images and ``submit`` them, in slices of at most ``limit`` until a
    slice comes back short (drained); returns how many.

    Slices keep a large backlog's stamping and sending bounded. ``resend_after`` 0 disables
    re-sending. ``image_ids`` restricts the search (a waiting ``agman ingest`` re-sends its own
    images only)."""
    if resend_after <= 0:
        return 0
    total = 0
    while True:
        ids = catalog.images.stale_pending(_cutoff(resend_after), unclaimed=unclaimed,
                                           image_ids=image_ids, take=True, limit=limit)
        if ids:
            logger.warning("re-sending %d images pending for more than %.0f s (first ids %s)",
                           len(ids), resend_after, ids[:5])
            submit(ids)
        total += len(ids)
        if len(ids) < limit:
            return total
