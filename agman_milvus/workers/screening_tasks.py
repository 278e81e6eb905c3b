"""Celery task for screening jobs (queue ``agman.default``): a thin wrapper around
:func:`agman_milvus.usecases.screening.run_chunk`, one message per chunk of a job, so every
worker consuming the queue takes a share of it.

A message carries the job id and the chunk's first query; the job's rows in SQL hold the
queries, the progress and the result, so a redelivered task resumes at the chunk's last
committed batch without duplicating matches. A message without a chunk (sent before jobs had
chunks) runs the whole job.
"""

from __future__ import annotations

import logging

from agman_milvus.workers.app import app
from agman_milvus.workers.names import SCREEN_TASK
from agman_milvus.workers.tasks import PipelineTask

logger = logging.getLogger(__name__)

__all__ = ["screen"]


@app.task(base=PipelineTask, bind=True, name=SCREEN_TASK, acks_late=True, ignore_result=True)
def screen(self: PipelineTask, job_id: int, start: int | None = None) -> dict[str, object]:
    """Run (or resume) the chunk of screening job ``job_id`` that starts at query ``start``
    (None: every chunk); progress and matches go to SQL."""
    from agman_milvus.usecases.copyright import CopyChecker
    from agman_milvus.usecases.screening import run_chunk, run_job

    checker = CopyChecker.from_services(self.services)
    if start is None:
        job = run_job(int(job_id), checker)
    else:
        job = run_chunk(int(job_id), int(start), checker, worker=self.request.hostname)
    return {"job_id": job.id, "status": job.status.value, "done": job.done, "total": job.total}
