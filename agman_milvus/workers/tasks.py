"""Celery task for embedding (queue ``agman.gpu``): a thin wrapper around
:func:`agman_milvus.usecases.recovery.embed_with_attempts`.

The model, the database engine and the Milvus client are built lazily, once per worker
process, inside that process (never in a parent before ``fork``): the Celery documentation's
lazy-property base task. Tasks carry SQL ids only; the SQL image status is the result.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from agman_milvus.services.container import Services
from agman_milvus.usecases.ingest import TRANSIENT_ERRORS
from agman_milvus.workers.app import app
from agman_milvus.workers.names import EMBED_TASK

logger = logging.getLogger(__name__)

__all__ = ["PipelineTask", "embed_images"]

_RETRY: dict[str, Any] = {
    "autoretry_for": TRANSIENT_ERRORS,  # infrastructure trouble only; bad images never raise
    "retry_backoff": True,
    "retry_backoff_max": 300,
    "retry_jitter": True,
    "max_retries": 8,
}


class PipelineTask(Task):
    """Base task holding this process's :class:`Services`, built on first use."""

    abstract = True
    _services: Services | None = None

    @property
    def services(self) -> Services:
        if self._services is None:  # Services itself rebuilds its parts after a fork
            type(self)._services = Services()
        return self._services  # type: ignore[return-value]


@app.task(base=PipelineTask, bind=True, name=EMBED_TASK, acks_late=True, ignore_result=True, **_RETRY)
def embed_images(self: PipelineTask, image_ids: list[int]) -> dict[str, object]:
    """Embed and index these images (idempotent: redelivery rewrites the same rows); a batch
    that crashes, or whose worker died before, is split (``usecases.recovery``)."""
    from agman_milvus.usecases.recovery import embed_with_attempts

    return embed_with_attempts([int(i) for i in image_ids], self.services).to_dict()
