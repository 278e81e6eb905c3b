"""Where embedding work runs: this process (embedded mode) or Celery workers.

Producers commit the SQL rows first and only then hand image ids to a dispatcher, so work
never names a row that does not exist yet. :class:`InProcessDispatcher` embeds right away; the
Celery one (``agman_milvus.workers.producer.CeleryDispatcher``) enqueues.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from agman_milvus.core.errors import AgmanError

__all__ = ["Dispatcher", "InProcessDispatcher", "PublishError"]


class PublishError(AgmanError, RuntimeError):
    """Work could not be handed to the broker (after retries). The images stay pending: the
    workers, ``agman reconcile`` or a later ``agman ingest`` send them again."""

    def __init__(self, message: str, image_ids: list[int]) -> None:
        super().__init__(message)
        self.image_ids = image_ids


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
