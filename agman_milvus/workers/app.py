"""The Celery app: Redis broker and result backend from :class:`Settings`.

Start workers with ``agman worker`` (it picks the pool, queues and allocator), or directly:
``celery -A agman_milvus.workers.app worker -Q agman.gpu -P solo -c 1``.

Reliability settings (see the Celery "Optimizing" guide): tasks are acknowledged after they
finish (``task_acks_late``), a worker reserves one task at a time (prefetch 1), a task whose
worker process dies is redelivered (``task_reject_on_worker_lost``), and Redis redelivers an
unacknowledged message only after ``visibility_timeout``, which is kept above the longest a
task may run (``task_time_limit``) so a slow task is never run twice concurrently. A killed
worker's images do not wait for that: every worker re-sends images claimed by a worker that went
silent for ``pending_resend_after`` seconds (:mod:`agman_milvus.workers.resender`). Publishing
is retried with backoff (:data:`PUBLISH_RETRY_POLICY`).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from agman_milvus.core.config import Settings, get_settings
from agman_milvus.workers.names import DEFAULT_QUEUE, EMBED_TASK, GPU_QUEUE
from agman_milvus.workers.resender import ResendStep

logger = logging.getLogger(__name__)

__all__ = ["PUBLISH_RETRY_POLICY", "app", "celery_config", "create_app", "visibility_timeout"]


#: kombu's retry policy for publishing a message: 0.5 s, then 1.5 s, 2.5 s ... up to 5 s apart.
PUBLISH_RETRY_POLICY: dict[str, float] = {
    "max_retries": 12, "interval_start": 0.5, "interval_step": 1.0, "interval_max": 5.0,
}


def visibility_timeout(settings: Settings) -> int:
    """Seconds before Redis redelivers an unacknowledged message (> task_time_limit)."""
    configured = settings.visibility_timeout
    if configured is None:
        return settings.task_time_limit + 300
    if configured <= settings.task_time_limit:
        logger.warning(
            "AGMAN_VISIBILITY_TIMEOUT=%d is not above AGMAN_TASK_TIME_LIMIT=%d: a task still "
            "running after %d s would be delivered a second time", configured,
            settings.task_time_limit, configured,
        )
    return configured


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings (lower-case names) for ``settings``."""
    transport: dict[str, Any] = {"visibility_timeout": visibility_timeout(settings)}
    backend_transport: dict[str, Any] = {}
    if settings.broker_key_prefix:
        transport["global_keyprefix"] = settings.broker_key_prefix
        backend_transport["global_keyprefix"] = settings.broker_key_prefix
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend or settings.broker_url,
        "broker_transport_options": transport,
        "result_backend_transport_options": backend_transport,
        "broker_connection_retry_on_startup": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_ignore_result": True,  # the SQL image status is the result
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_time_limit": settings.task_time_limit,
        "task_soft_time_limit": max(5, settings.task_time_limit - 5),
        "task_default_queue": DEFAULT_QUEUE,
        "task_routes": {EMBED_TASK: {"queue": GPU_QUEUE}},
        # A publish that fails (Redis restarting) is retried for about 45 s before it raises.
        "task_publish_retry": True,
        "task_publish_retry_policy": PUBLISH_RETRY_POLICY,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
    }


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app for ``settings`` (default: the environment). Importing it loads no model."""
    settings = settings or get_settings()
    celery = Celery("agman_milvus", include=["agman_milvus.workers.tasks",
                                             "agman_milvus.workers.screening_tasks"])
    celery.conf.update(celery_config(settings))
    celery.steps["worker"].add(ResendStep)  # the workers re-send stale pending images
    return celery


app = create_app()
