"""Screening jobs: copy-check many images in the background and keep every match in SQL.

A job is a ``screening_jobs`` row (status, done/total, the query references in ``params``);
each query found to be a ``copy`` or ``near_duplicate`` of a catalogue image adds a
``screening_matches`` row with its score and evidence (the verification's inliers, matched
region, residual and inlier pairs included, so the report can draw them), and a query that
cannot be read adds one ``error`` row with the reason.

The queries are split into chunks of :data:`CHUNK_SIZE`. With a broker configured each chunk is
one Celery task (queue ``agman.default``), so every worker consuming that queue takes a share of
the job (:func:`run_chunk`); without one, a background thread of this process shares them
among child processes, one a core (:mod:`agman_milvus.usecases.local_screening`), or runs them
in order itself (:func:`run_job`). A chunk advances in batches, each committed with its progress, so a
redelivered task resumes where the last commit left off and never duplicates a match. A chunk
whose worker went silent (killed, out of memory) or whose message was lost does not wait for
the broker's visibility timeout: the workers' re-send timer finds it (:func:`resend_stale_chunks`)
and sends it again. A job whose thread died with its process, or that failed, goes on from its
committed progress when asked (:func:`~agman_milvus.usecases.local_screening.resume_in_thread`,
:func:`restart_failed`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from PIL import Image as PILImage

from agman_milvus.core.images import ImageError, ImageSource, read_image_bytes
from agman_milvus.services.blobs import BlobStore, is_blob_uri
from agman_milvus.services.store.catalog import Catalog, JobStatus, ScreeningJob, ScreeningMatch
from agman_milvus.services.store.repository import utcnow
from agman_milvus.usecases.copyright import DISTINCT, CopyCheck, CopyChecker
from agman_milvus.usecases.reports import ScreeningReport, export_report, load_screening_report

__all__ = ["CHUNK_SIZE", "ERROR", "ScreeningJobHandle", "create_job", "query_references",
           "resend_stale_chunks", "restart_failed", "run_chunk", "run_job"]

log = logging.getLogger(__name__)

ERROR = "error"
#: Queries a screening job checks together (one model pass, one keypoint search) and commits.
#: Milvus Lite's search walks every stored keypoint row once a call, in Python: 64 queries a
#: batch instead of 16 ran 1.09x the checks/s in a thread and 1.13x on two child processes
#: (600 queries against 1,000 references; docs/benchmarks.md).
BATCH_SIZE = 64
#: Decoded query pixels checked together (about 144 MB as RGB): a batch's images are all decoded
#: before its model pass, so a batch of large photos is checked in several groups instead.
GROUP_PIXELS = 48_000_000
#: Queries per chunk, one Celery task each: a worker's share of a job, small enough that many
#: workers share a few hundred queries, large enough that a task's overhead does not count.
CHUNK_SIZE = 64


def query_references(images: Sequence[ImageSource], blobs: BlobStore) -> list[str]:
    """Strings a worker can read back: URIs and ``blob://`` as they are, local paths made
    absolute, and bytes or PIL images stored in the blob directory (``blob://<sha256>``)."""
    refs = []
    for image in images:
        if isinstance(image, str) and ("://" in image or is_blob_uri(image)):
            refs.append(image)
        elif isinstance(image, (str, Path)):
            refs.append(str(Path(image).absolute()))
        elif isinstance(image, (bytes, bytearray, memoryview, PILImage.Image)):
            refs.append(BlobStore.uri(blobs.put(read_image_bytes(image))))
        else:
            raise TypeError(f"cannot screen a {type(image).__name__}; pass paths, URIs, bytes or PIL images")
    return refs


def create_job(catalog: Catalog, refs: Sequence[str], *, top_k: int = 5, chunk_size: int = CHUNK_SIZE,
               **params: Any) -> int:
    """Record a queued job over ``refs`` in chunks of ``chunk_size`` queries; returns its id."""
    if not refs:
        raise ValueError("a screening job needs at least one image")
    return catalog.screening_jobs.create(
        len(refs), {"queries": list(refs), "top_k": int(top_k), **params}, chunk_size=chunk_size)


def run_job(job_id: int, checker: CopyChecker, *, batch_size: int = BATCH_SIZE) -> ScreeningJob:
    """Run (or resume) every chunk of job ``job_id`` in this process, in order; returns its
    final row. A failed job runs again from where its chunks stopped.

    An unexpected error marks the job failed (with the message) and is re-raised.
    """
    jobs = checker.catalog.screening_jobs
    job = jobs.get(job_id)
    if job.status == JobStatus.done:
        return job
    jobs.start(job_id)
    for chunk in jobs.chunks(job_id):
        if chunk.done < chunk.stop - chunk.start:
            _run_chunk(checker, job, chunk.start, batch_size, worker=None)
    jobs.finish_if_complete(job_id)
    job = jobs.get(job_id)
    log.info("screening job %d %s: %d/%d images", job_id, job.status.value, job.done, job.total)
    return job


def run_chunk(job_id: int, start: int, checker: CopyChecker, *, worker: str | None = None,
              batch_size: int = BATCH_SIZE, fail_job: bool = True) -> ScreeningJob:
    """Run (or resume) the chunk of job ``job_id`` that starts at query ``start`` (one Celery
    task; ``worker`` names the worker for the chunk's row); returns the job's row. The
    batch that completes the job's last chunk marks it done, whichever chunk that is.

    An unexpected error marks the job failed (with the message; not with ``fail_job`` False,
    where the caller does) and is re-raised.
    """
    jobs = checker.catalog.screening_jobs
    _run_chunk(checker, jobs.get(job_id), start, batch_size, worker, fail_job=fail_job)
    return jobs.get(job_id)


def _run_chunk(checker: CopyChecker, job: ScreeningJob, start: int, batch_size: int,
               worker: str | None, *, fail_job: bool = True) -> None:
    """Claim the chunk of ``job`` (its row, queries included, read once by the caller) and
    check its queries from its committed progress on, a batch per transaction; stop when
    another run of the chunk has committed a batch first."""
    jobs, job_id = checker.catalog.screening_jobs, job.id
    jobs.start_chunk(job_id, start, worker)
    chunk = jobs.chunk(job_id, start)
    refs: list[str] = list(job.params.get("queries", []))
    top_k = int(job.params.get("top_k", 5))
    try:
        for first in range(chunk.start + chunk.done, chunk.stop, batch_size):
            batch = refs[first:min(first + batch_size, chunk.stop)]
            rows = _screen_batch(checker, batch, top_k)
            if not jobs.record_batch(job_id, chunk.start, rows, done_before=first - chunk.start,
                                     done_after=first - chunk.start + len(batch)):
                log.warning("screening job %d: queries %d+ were committed by another run; this one stops",
                            job_id, first)
                return
            log.debug("screening job %d: queries %d-%d done", job_id, first, first + len(batch))
    except Exception as exc:
        if fail_job:
            jobs.fail(job_id, f"{type(exc).__name__}: {exc}")
        raise


def resend_stale_chunks(catalog: Catalog, submit: Callable[[int, int], None], resend_after: float, *,
                        unclaimed: bool) -> int:
    """Take the chunks whose run went silent more than ``resend_after`` seconds ago and, with
    ``unclaimed`` (the caller knows no message is waiting), those sent that long ago and never
    claimed, and ``submit(job_id, start)`` each; returns how many. ``resend_after`` 0 disables
    it. A re-send that races a slow run costs time only: one of them stops at its next batch."""
    if resend_after <= 0:
        return 0
    taken = catalog.screening_jobs.stale_chunks(utcnow() - timedelta(seconds=resend_after),
                                                unclaimed=unclaimed, take=True)
    for job_id, start in taken:
        log.warning("re-sending screening job %d's chunk at query %d: no progress for %.0f s",
                    job_id, start, resend_after)
        submit(job_id, start)
    return len(taken)


def _screen_batch(checker: CopyChecker, refs: list[str], top_k: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    checked: list[tuple[str, CopyCheck]] = []
    group: list[tuple[str, PILImage.Image]] = []  # decoded, not yet checked
    group_pixels = 0

    def check_group() -> None:
        checks = checker.check_many([im for _, im in group], top_k)
        checked.extend(zip([ref for ref, _ in group], checks, strict=True))
        group.clear()

    for ref in refs:
        try:
            image = checker.load_image(ref)
        except (ImageError, OSError, ValueError) as exc:
            rows.append({"query_ref": ref, "matched_image_id": None, "matched_product_id": None,
                         "verdict": ERROR, "score": 0.0, "evidence": {"error": str(exc)}})
            continue
        pixels = image.width * image.height
        if group and group_pixels + pixels > GROUP_PIXELS:
            check_group()
            group_pixels = 0
        group.append((ref, image))
        group_pixels += pixels
    if group:
        check_group()
    for ref, check in checked:
        for rank, match in enumerate(check.matches, start=1):
            if match.verdict == DISTINCT:
                continue
            info = checker.catalog.images.info([match.image_id]).get(match.image_id)
            evidence = {
                "rank": rank, "product_id": match.product_id,
                "descriptor_similarity": match.descriptor_similarity,
                "phash_distance": match.phash_distance,
                "attributes": {k: {"similarity": a.similarity, "threshold": a.threshold,
                                   "agrees": a.agrees} for k, a in match.attributes.items()},
                "attributes_agreeing": match.attributes_agreeing,
                "source_uri": match.source_uri, "title": match.metadata.get("title"),
                "calibrated": check.calibrated, "model_version": check.model_version,
                "candidate_score": match.candidate_score,
                "verification": match.verification.to_dict() if match.verification is not None else None,
            }
            rows.append({"query_ref": ref, "matched_image_id": match.image_id,
                         "matched_product_id": info.product_id if info else None,
                         "verdict": match.verdict, "score": match.score, "evidence": evidence})
    return rows


def restart_failed(catalog: Catalog, job: ScreeningJob) -> list[int]:
    """For workers: mark ``job`` (its row) running again when it failed and return the first
    queries of its unfinished chunks, to be sent again. Empty for any other job: a queued or
    running job's chunks are with the workers already (their re-send timer covers a silent
    one), a done one has none left."""
    if job.status != JobStatus.failed:
        return []
    catalog.screening_jobs.start(job.id)
    return [c.start for c in catalog.screening_jobs.chunks(job.id) if c.done < c.stop - c.start]


class ScreeningJobHandle:
    """Follow a screening job: ``status``, ``done``/``total``, ``wait()``, ``report()``."""

    def __init__(self, catalog: Catalog, job_id: int, *, loader: Callable[[str], Any] | None = None,
                 thread: threading.Thread | None = None) -> None:
        self.catalog = catalog
        self.id = int(job_id)
        self._loader = loader
        self._thread = thread
        self._row = catalog.screening_jobs.summary(self.id)

    def __repr__(self) -> str:
        return f"ScreeningJobHandle(id={self.id}, status={self.status!r}, done={self.done}/{self.total})"

    def refresh(self) -> ScreeningJobHandle:
        """Read the job's state again (not its queries)."""
        self._row = self.catalog.screening_jobs.summary(self.id)
        return self

    @property
    def status(self) -> str:
        return self._row.status

    @property
    def done(self) -> int:
        return self._row.done

    @property
    def total(self) -> int:
        return self._row.total

    @property
    def error(self) -> str | None:
        return self._row.error

    @property
    def progress(self) -> float:
        return self.done / self.total if self.total else 1.0

    @property
    def finished(self) -> bool:
        return self.status in (JobStatus.done.value, JobStatus.failed.value)

    def wait(self, timeout: float = 600.0, poll: float = 0.2) -> ScreeningJobHandle:
        """Block until the job is done or failed; TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.refresh().finished:
            if time.monotonic() >= deadline:
                where = ("it runs in this process" if self._thread is not None
                         else "are workers consuming the agman.default queue?")
                raise TimeoutError(f"screening job {self.id} is at {self.done}/{self.total} after "
                                   f"{timeout:g} s; {where}")
            time.sleep(poll)
        return self

    def matches(self) -> list[ScreeningMatch]:
        return self.catalog.screening_jobs.matches(self.id)

    def report(self) -> ScreeningReport:
        return load_screening_report(self.catalog, self.id)

    def export(self, path: str | Path, fmt: str | None = None) -> Path:
        """Write the report as CSV, JSON or HTML (by ``fmt`` or the file suffix)."""
        return export_report(self.report(), Path(path), fmt, loader=self._loader)
