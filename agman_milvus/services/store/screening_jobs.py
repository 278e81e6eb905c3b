"""Screening jobs: a ``screening_jobs`` row (status, done/total, params) and its matches.

Each batch of a job is committed with its progress in one transaction (see
:meth:`ScreeningJobRepository.record_batch`), so a resumed job never duplicates a match.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from agman_milvus.services.store.repository import Repository, utcnow
from agman_milvus.services.store.tables import JobStatus, ScreeningJob, ScreeningMatch

__all__ = ["JobNotFoundError", "ScreeningJobRepository"]


class JobNotFoundError(LookupError):
    """No screening job with that id."""


class ScreeningJobRepository(Repository):
    """The ``screening_jobs`` and ``screening_matches`` tables."""

    def create(self, total: int, params: Mapping[str, Any]) -> int:
        """Record a queued job of ``total`` queries; returns its id."""
        with self.sessions.begin() as s:
            job = ScreeningJob(status=JobStatus.queued, total=total, done=0, params=dict(params))
            s.add(job)
            s.flush()
            return int(job.id)

    def blob_ids(self) -> set[str]:
        """Every blob id a job's queries name (``blob://<sha>``): bytes screened as queries."""
        out: set[str] = set()
        with self.sessions() as s:
            for params in s.scalars(select(ScreeningJob.params)):
                for ref in (params or {}).get("queries", ()):
                    if isinstance(ref, str) and ref.startswith("blob://"):
                        out.add(ref[len("blob://"):])
        return out

    def get(self, job_id: int) -> ScreeningJob:
        """The job's row; :class:`JobNotFoundError` when there is none."""
        with self.sessions() as s:
            job = s.get(ScreeningJob, job_id)
        if job is None:
            raise JobNotFoundError(f"no screening job {job_id}")
        return job

    def get_with_matches(self, job_id: int) -> tuple[ScreeningJob, list[ScreeningMatch]]:
        """The job's row and its matches in insertion order, read in one session."""
        with self.sessions() as s:
            job = s.get(ScreeningJob, job_id)
            if job is None:
                raise JobNotFoundError(f"no screening job {job_id}")
            return job, _matches(s, job_id)

    def matches(self, job_id: int) -> list[ScreeningMatch]:
        """The job's matches in insertion order."""
        with self.sessions() as s:
            return _matches(s, job_id)

    def start(self, job_id: int) -> None:
        """Mark the job running (clearing the error of an earlier failed run)."""
        self._set(job_id, status=JobStatus.running, error=None)

    def record_batch(
        self, job_id: int, queries: Sequence[str], matches: Iterable[Mapping[str, Any]], done: int
    ) -> None:
        """In one transaction: replace the matches of ``queries`` (left by an interrupted run)
        with ``matches`` (``screening_matches`` column values) and set the job's ``done``."""
        with self.sessions.begin() as s:
            s.execute(delete(ScreeningMatch).where(
                ScreeningMatch.job_id == job_id, ScreeningMatch.query_ref.in_(queries)))
            s.add_all([ScreeningMatch(job_id=job_id, **row) for row in matches])
            s.execute(update(ScreeningJob).where(ScreeningJob.id == job_id).values(done=done))

    def fail(self, job_id: int, error: str) -> None:
        """Mark the job failed with ``error`` (a human-readable message)."""
        self._set(job_id, status=JobStatus.failed, error=error[:4000], finished_at=utcnow())

    def finish(self, job_id: int) -> None:
        """Mark the job done."""
        self._set(job_id, status=JobStatus.done, finished_at=utcnow())

    def _set(self, job_id: int, **values: Any) -> None:
        with self.sessions.begin() as s:
            s.execute(update(ScreeningJob).where(ScreeningJob.id == job_id).values(**values))


def _matches(s: Session, job_id: int) -> list[ScreeningMatch]:
    return list(s.scalars(select(ScreeningMatch).where(ScreeningMatch.job_id == job_id)
                          .order_by(ScreeningMatch.id)))
