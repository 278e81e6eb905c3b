"""Screening jobs: a ``screening_jobs`` row (status, done/total, params), its chunks and matches.

A job's queries are split into chunks (``screening_chunks``), each run by one task, so several
workers share a job. Each batch of a chunk is committed with the chunk's and the job's progress
in one transaction, and only by the run that read the chunk's progress it starts from (see
:meth:`ScreeningJobRepository.record_batch`), so a resumed or doubly delivered chunk never
duplicates a match. The batch that completes the job marks it done. A chunk whose run went
silent (its worker killed) or whose message was lost is found by :meth:`stale_chunks` and sent
again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from agman_milvus.core.errors import AgmanError
from agman_milvus.services.store.repository import Repository, utcnow
from agman_milvus.services.store.tables import JobStatus, ScreeningChunk, ScreeningJob, ScreeningMatch

__all__ = ["JobNotFoundError", "JobSummary", "ScreeningJobRepository"]


class JobNotFoundError(AgmanError, LookupError):
    """No screening job with that id."""


@dataclass(frozen=True)
class JobSummary:
    """A screening job's state, without its queries."""

    id: int
    status: str
    done: int
    total: int
    created_at: datetime
    finished_at: datetime | None
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "created_at": self.created_at.isoformat(),
                "finished_at": self.finished_at.isoformat() if self.finished_at else None}


#: The ``screening_jobs`` columns a :class:`JobSummary` holds, one a field.
_SUMMARY_COLUMNS = tuple(getattr(ScreeningJob, f.name) for f in fields(JobSummary))


def _summary(row: Any) -> JobSummary:
    """A :data:`_SUMMARY_COLUMNS` row as a :class:`JobSummary`."""
    return JobSummary(**{**row._mapping, "id": int(row.id), "status": row.status.value})


class ScreeningJobRepository(Repository):
    """The ``screening_jobs``, ``screening_chunks`` and ``screening_matches`` tables."""

    def create(self, total: int, params: Mapping[str, Any], chunk_size: int | None = None) -> int:
        """Record a queued job of ``total`` queries in chunks of ``chunk_size`` (default: one
        chunk); returns its id."""
        size = max(1, total if chunk_size is None else chunk_size)
        with self.sessions.begin() as s:
            job = ScreeningJob(status=JobStatus.queued, total=total, done=0, params=dict(params))
            s.add(job)
            s.flush()
            now = utcnow()
            s.add_all([ScreeningChunk(job_id=job.id, start=start, stop=min(start + size, total), done=0,
                                      sent_at=now)
                       for start in range(0, total, size)])
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

    def summary(self, job_id: int) -> JobSummary:
        """The job's state without its queries (what following a job reads, often: a job's
        ``params`` may hold thousands); :class:`JobNotFoundError` when there is none."""
        with self.sessions() as s:
            row = s.execute(select(*_SUMMARY_COLUMNS).where(ScreeningJob.id == job_id)).first()
        if row is None:
            raise JobNotFoundError(f"no screening job {job_id}")
        return _summary(row)

    def recent(self, limit: int = 20) -> list[JobSummary]:
        """The ``limit`` newest jobs, newest first, without their queries (a job's ``params``
        may hold thousands)."""
        with self.sessions() as s:
            rows = s.execute(select(*_SUMMARY_COLUMNS).order_by(ScreeningJob.id.desc()).limit(limit)).all()
        return [_summary(r) for r in rows]

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

    def chunks(self, job_id: int) -> list[ScreeningChunk]:
        """The job's chunks in query order."""
        with self.sessions() as s:
            return list(s.scalars(select(ScreeningChunk).where(ScreeningChunk.job_id == job_id)
                                  .order_by(ScreeningChunk.start)))

    def chunk(self, job_id: int, start: int) -> ScreeningChunk:
        """The job's chunk starting at query ``start``; :class:`JobNotFoundError` when none."""
        with self.sessions() as s:
            chunk = s.get(ScreeningChunk, (job_id, start))
        if chunk is None:
            raise JobNotFoundError(f"screening job {job_id} has no chunk starting at query {start}")
        return chunk

    def start(self, job_id: int) -> None:
        """Mark the job running (clearing the error and end time of an earlier failed run)."""
        self._set(job_id, status=JobStatus.running, error=None, finished_at=None)

    def start_chunk(self, job_id: int, start: int, worker: str | None) -> None:
        """Claim the chunk for a run (``worker``: who runs it), and mark a queued job running (a
        failed one stays failed: another chunk's error is not cleared by this one starting)."""
        with self.sessions.begin() as s:
            s.execute(update(ScreeningChunk).where(ScreeningChunk.job_id == job_id,
                                                   ScreeningChunk.start == start)
                      .values(worker=worker, claimed_at=utcnow()))
            s.execute(update(ScreeningJob).where(ScreeningJob.id == job_id,
                                                 ScreeningJob.status == JobStatus.queued)
                      .values(status=JobStatus.running))

    def record_batch(
        self, job_id: int, start: int, matches: Iterable[Mapping[str, Any]], *, done_before: int,
        done_after: int,
    ) -> bool:
        """In one transaction: advance chunk ``start`` from ``done_before`` to ``done_after``
        queries (its run's sign of life too), add ``matches`` (``screening_matches`` column
        values) and the queries to the job's ``done``, and mark the job done when that was its
        last query. False, with nothing written, when the chunk is no longer at ``done_before``
        (another run of it committed this batch first)."""
        with self.sessions.begin() as s:
            moved = s.execute(update(ScreeningChunk).where(
                ScreeningChunk.job_id == job_id, ScreeningChunk.start == start,
                ScreeningChunk.done == done_before).values(done=done_after, claimed_at=utcnow()))
            if moved.rowcount != 1:  # type: ignore[attr-defined]
                return False
            s.add_all([ScreeningMatch(job_id=job_id, **row) for row in matches])
            s.execute(update(ScreeningJob).where(ScreeningJob.id == job_id)
                      .values(done=ScreeningJob.done + (done_after - done_before)))
            _finish_if_complete(s, job_id)  # sees this transaction's own count
            return True

    def stale_chunks(self, cutoff: datetime, *, unclaimed: bool, take: bool = False) -> list[tuple[int, int]]:
        """``(job_id, start)`` of the unfinished chunks of queued or running jobs whose run
        went silent (claimed, no sign of life since ``cutoff``) and, with ``unclaimed``, of
        those never claimed since their message was sent before ``cutoff`` (it was lost).

        With ``take`` each is stamped as sent now (``claimed_at`` cleared) by an update that
        only succeeds while it is still stale, so two callers never take the same chunk."""
        where = _stale_chunk(cutoff, unclaimed)
        with self.sessions() as s:
            found = [(int(j), int(st)) for j, st in s.execute(
                select(ScreeningChunk.job_id, ScreeningChunk.start).where(where)
                .order_by(ScreeningChunk.job_id, ScreeningChunk.start))]
        if not take:
            return found
        taken = []
        with self.sessions.begin() as s:
            for job_id, start in found:
                stamped = s.execute(update(ScreeningChunk).where(
                    ScreeningChunk.job_id == job_id, ScreeningChunk.start == start, where)
                    .values(claimed_at=None, sent_at=utcnow()))
                if stamped.rowcount == 1:  # type: ignore[attr-defined]
                    taken.append((job_id, start))
        return taken

    def fail(self, job_id: int, error: str) -> None:
        """Mark the job failed with ``error`` (a human-readable message)."""
        self._set(job_id, status=JobStatus.failed, error=error[:4000], finished_at=utcnow())

    def finish_if_complete(self, job_id: int) -> None:
        """Mark a running job done when every query is (a resumed job with nothing left)."""
        with self.sessions.begin() as s:
            _finish_if_complete(s, job_id)

    def _set(self, job_id: int, **values: Any) -> None:
        with self.sessions.begin() as s:
            s.execute(update(ScreeningJob).where(ScreeningJob.id == job_id).values(**values))


def _stale_chunk(cutoff: datetime, unclaimed: bool) -> ColumnElement[bool]:
    silent = and_(ScreeningChunk.claimed_at.is_not(None), ScreeningChunk.claimed_at < cutoff)
    lost = and_(ScreeningChunk.claimed_at.is_(None), ScreeningChunk.sent_at < cutoff)
    live_jobs = select(ScreeningJob.id).where(ScreeningJob.status.in_([JobStatus.queued, JobStatus.running]))
    return and_(ScreeningChunk.done < ScreeningChunk.stop - ScreeningChunk.start,
                ScreeningChunk.job_id.in_(live_jobs), or_(silent, lost) if unclaimed else silent)


def _finish_if_complete(s: Session, job_id: int) -> None:
    s.execute(update(ScreeningJob).where(
        ScreeningJob.id == job_id, ScreeningJob.done >= ScreeningJob.total,
        ScreeningJob.status == JobStatus.running).values(status=JobStatus.done, finished_at=utcnow()))


def _matches(s: Session, job_id: int) -> list[ScreeningMatch]:
    return list(s.scalars(select(ScreeningMatch).where(ScreeningMatch.job_id == job_id)
                          .order_by(ScreeningMatch.id)))
