"""Celery task for screening jobs (queue ``agman.default``): a thin wrapper around
:func:`agman_milvus.usecases.screening.run_job`.

The task carries the job id only; the job row in SQL holds the queries, the progress and the
result, so a redelivered task resumes at the last committed batch without duplicating matches.
"""

from __future__ import annotations

import logging

from agman_milvus.workers.app import app
from agman_milvus.workers.names import SCREEN_TASK
from agman_milvus.workers.tasks import PipelineTask

logger = logging.getLogger(__name__)

__all__ = ["screen"]


@app.task(base=PipelineTask, bind=True, name=SCREEN_TASK, acks_late=True, ignore_result=True)
def screen(self: PipelineTask, job_id: int) -> dict[str, object]:
    """Run (or resume) screening job ``job_id``; progress and matches go to SQL."""
    from agman_milvus.usecases.copyright import CopyChecker
    from agman_milvus.usecases.screening import run_job

    checker = CopyChecker.from_services(self.services)
    job = run_job(int(job_id), checker)
    return {"job_id": job.id, "status": job.status.value, "done": job.done, "total": job.total}
