"""What producers use to hand work to the workers: image ids to embed, screening jobs to run.

Producers (the Client, ``agman ingest``) commit the SQL rows first and only then send a
message, so a message never names a row that does not exist yet. Only task names are sent
(``send_task``): a producer never imports the tasks or loads the model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from kombu.exceptions import OperationalError as KombuOperationalError

from agman_milvus.usecases.dispatch import PublishError
from agman_milvus.workers.names import (
    DEFAULT_QUEUE,
    EMBED_TASK,
    GPU_QUEUE,
    NORMAL_PRIORITY,
    SCREEN_TASK,
)

logger = logging.getLogger(__name__)

__all__ = ["CeleryDispatcher", "TASK_BATCH", "send_screening_job"]

#: Image ids per Celery message: enough to keep a GPU busy, small enough to redo cheaply.
TASK_BATCH = 64


class CeleryDispatcher:
    """Sends ``embed_images`` messages of at most ``task_batch`` ids to the GPU queue, at
    ``priority`` (re-sends use :data:`~agman_milvus.workers.names.RESEND_PRIORITY`, served first).

    ``app`` is any Celery app configured with the broker (it only needs ``send_task``).
    """

    asynchronous = True

    def __init__(self, app: Any, task_batch: int = TASK_BATCH, priority: int = NORMAL_PRIORITY) -> None:
        if task_batch < 1:
            raise ValueError("task_batch must be at least 1")
        self.app = app
        self.task_batch = task_batch
        self.priority = priority

    def submit(self, image_ids: Iterable[int]) -> None:
        """Send ``image_ids``; raises :class:`PublishError` (naming the unsent ids) when the
        broker stays unreachable through the app's publish retries."""
        ids = list(image_ids)
        for start in range(0, len(ids), self.task_batch):
            chunk = ids[start:start + self.task_batch]
            try:
                self.app.send_task(EMBED_TASK, args=[chunk], queue=GPU_QUEUE, priority=self.priority)
            except (KombuOperationalError, OSError) as exc:
                raise PublishError(f"could not send {len(ids) - start} images to the broker: {exc}",
                                   ids[start:]) from exc
            logger.debug("enqueued %d images on %s", len(chunk), GPU_QUEUE)


def send_screening_job(app: Any, job_id: int, chunk_starts: Sequence[int],
                       priority: int = NORMAL_PRIORITY) -> None:
    """Queue screening job ``job_id``, one message per chunk (by its first query), so the
    workers share it; its queries and progress live in SQL. Re-sends use
    :data:`~agman_milvus.workers.names.RESEND_PRIORITY`, served before the chunks waiting."""
    for start in chunk_starts:
        app.send_task(SCREEN_TASK, args=[int(job_id), int(start)], queue=DEFAULT_QUEUE, priority=priority)
