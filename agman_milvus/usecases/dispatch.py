"""Where embedding work runs: in this process (embedded mode) or on Celery workers.

Producers (the Client, ``agman ingest``) commit the SQL rows first and only then hand image
ids to a dispatcher, so a message never names a row that does not exist yet. A lost message
leaves its rows pending; re-sending the event (or ``agman ingest`` again) dispatches them again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

logger = logging.getLogger(__name__)

__all__ = [
    "CeleryDispatcher", "DEFAULT_QUEUE", "Dispatcher", "EMBED_TASK", "GPU_QUEUE",
    "InProcessDispatcher", "TASK_BATCH", "chunked",
]

GPU_QUEUE = "agman.gpu"
DEFAULT_QUEUE = "agman.default"
EMBED_TASK = "agman_milvus.workers.tasks.embed_images"
DELETE_TASK = "agman_milvus.workers.tasks.delete_product"
UPDATE_TASK = "agman_milvus.workers.tasks.update_product"
#: Image ids per Celery message: enough to keep a GPU busy, small enough to redo cheaply.
TASK_BATCH = 64


def chunked(ids: Sequence[int], size: int) -> list[list[int]]:
    return [list(ids[i:i + size]) for i in range(0, len(ids), size)]


class Dispatcher(Protocol):
    """Runs or enqueues the embedding of pending images."""

    asynchronous: bool

    def submit(self, image_ids: Iterable[int]) -> None: ...


class InProcessDispatcher:
    """Embeds right away in this process (the embedded default: no broker)."""

    asynchronous = False

    def __init__(self, services: Any) -> None:
        from agman_milvus.usecases.indexing import IndexReport

        self.services = services
        self.report = IndexReport()  # everything this dispatcher ran, with stage timings

    def submit(self, image_ids: Iterable[int], on_batch: Callable[[Any], None] | None = None) -> None:
        """Embed ``image_ids`` now; a lazy iterable is consumed as ids arrive."""
        from agman_milvus.usecases.indexing import index_images

        self.report.merge(index_images(image_ids, self.services, on_batch=on_batch))


class CeleryDispatcher:
    """Sends ``embed_images`` messages of at most ``task_batch`` ids to the GPU queue.

    ``app`` is any Celery app configured with the broker (it only needs ``send_task``; the
    producer does not import the tasks, and never loads the model).
    """

    asynchronous = True

    def __init__(self, app: Any, task_batch: int = TASK_BATCH) -> None:
        if task_batch < 1:
            raise ValueError("task_batch must be at least 1")
        self.app = app
        self.task_batch = task_batch

    def submit(self, image_ids: Iterable[int]) -> None:
        for chunk in chunked(list(image_ids), self.task_batch):
            self.app.send_task(EMBED_TASK, args=[chunk], queue=GPU_QUEUE)
            logger.debug("enqueued %d images on %s", len(chunk), GPU_QUEUE)
