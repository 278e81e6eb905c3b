"""Re-sending stale work from the workers themselves (no beat process to run).

Every ``agman worker`` runs :class:`ResendStep`, a worker bootstep with a daemon thread that
every ``pending_resend_after / 4`` seconds (at most 30 s) calls :func:`resend_stale_celery`:
images claimed by a worker that went silent (SIGKILL, out of memory, a lost connection) are
always re-sent; images never claimed only while the embedding queue is empty (their message
was lost, e.g. a Redis restart without persistence, or a publish that failed). Re-sent messages
have a higher priority than new work, so they do not wait behind a backlog. Several workers
may tick at once: the SQL update that takes the stale rows stamps them, so each is sent once.
``agman reconcile`` and a waiting ``agman ingest`` call the same function. The same tick
re-sends screening jobs' chunks the same way, also ahead of the chunks waiting
(:func:`resend_stale_chunks_celery`; never-claimed ones only while the ``agman.default`` queue
is empty).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from celery import bootsteps

from agman_milvus.core.config import Settings
from agman_milvus.workers.names import DEFAULT_QUEUE, GPU_QUEUE, RESEND_PRIORITY
from agman_milvus.workers.producer import CeleryDispatcher, send_screening_job

logger = logging.getLogger(__name__)

__all__ = ["ResendStep", "queue_depth", "resend_interval", "resend_stale_celery",
           "resend_stale_chunks_celery"]


def queue_depth(app: Any, queue: str = GPU_QUEUE) -> int:
    """Messages waiting in ``queue`` (not counting those a worker holds)."""
    with app.connection_for_read() as conn:
        return int(conn.default_channel.queue_declare(queue).message_count)


def resend_interval(settings: Settings) -> float:
    """Seconds between two looks for stale images on a worker."""
    return min(30.0, max(1.0, settings.pending_resend_after / 4))


def resend_stale_celery(app: Any, catalog: Any, settings: Settings,
                        image_ids: Sequence[int] | None = None) -> int:
    """Re-send stale pending images as ``embed_images`` messages; returns how many."""
    from agman_milvus.usecases.recovery import resend_stale

    if settings.pending_resend_after <= 0:
        return 0
    unclaimed = queue_depth(app) == 0
    dispatcher = CeleryDispatcher(app, priority=RESEND_PRIORITY)  # ahead of any backlog
    return resend_stale(catalog, dispatcher.submit, settings.pending_resend_after,
                        unclaimed=unclaimed, image_ids=image_ids)


def resend_stale_chunks_celery(app: Any, catalog: Any, settings: Settings) -> int:
    """Re-send stale screening chunks as ``screen`` messages; returns how many."""
    from agman_milvus.usecases.screening import resend_stale_chunks

    unclaimed = queue_depth(app, DEFAULT_QUEUE) == 0
    return resend_stale_chunks(
        catalog, lambda job_id, start: send_screening_job(app, job_id, [start], priority=RESEND_PRIORITY),
        settings.pending_resend_after, unclaimed=unclaimed)


class ResendStep(bootsteps.StartStopStep):
    """A worker bootstep: a daemon thread re-sending stale images and chunks (see the module)."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        from agman_milvus.core.config import get_settings

        settings = get_settings()
        if settings.pending_resend_after <= 0 or not settings.broker_url:
            return
        self._thread = threading.Thread(target=self._loop, args=(worker.app, settings),
                                        name="agman-resend", daemon=True)
        self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stop.set()

    def _loop(self, app: Any, settings: Settings) -> None:
        from agman_milvus.services.store.catalog import open_catalog

        catalog = None
        while not self._stop.wait(resend_interval(settings)):
            try:
                catalog = catalog or open_catalog(settings)
                resend_stale_celery(app, catalog, settings)
                resend_stale_chunks_celery(app, catalog, settings)
            except Exception:  # noqa: BLE001 - the database or broker may be restarting: next tick
                logger.warning("looking for stale work failed; trying again in %.0f s",
                               resend_interval(settings), exc_info=True)
