"""A screening job without workers: a thread of the caller's process (the embedded default)
that shares the job's chunks among child processes, one a core.

Run in the caller's process alone, the job's checks share one interpreter lock with the
embedded Milvus Lite (pure Python) answering each batch's keypoint search, and kept about 1.5 of
2 cores busy. So the job's thread (:func:`start_thread`) starts ``processes`` children
(``python -m agman_milvus.usecases.local_screening``, so no ``__main__`` of the caller is
imported), each holding its CPU work to cores / processes threads (``Settings.threads``) and
searching the caller's Milvus Lite over the local port it already serves on, as workers search
``agman milvus-serve``; the caller's process is left with Lite's searches. Each child takes one
chunk at a time, so they share the job as workers do, and commits each batch to SQL itself.
On 2 cores a 600-query job ran at 1.16-1.42x the thread's checks/s with batches of 16 queries,
1.13x with batches of 64 (docs/benchmarks.md).
``AGMAN_SCREEN_PROCESSES=1`` (or a job of one chunk) keeps the job in the thread.

The conversation is JSON lines on the child's stdin and stdout: the job (settings, model
version, thresholds) first, answered ``{"ready": true}`` or ``{"error": ...}``; then a chunk's
first query, answered ``{"done": start}`` or ``{"error": ...}``; end of input ends the child.
A child that cannot start (no process, another model version, a failed import, no answer
within :data:`START_TIMEOUT`) leaves its chunks to the others, or to the thread. A chunk whose child
died, or did not answer within ``task_time_limit`` (it is killed), is given to another child once,
from its committed progress. A child whose parent died
stops within a second; the job stays ``running`` and goes on from its committed progress when
resumed (:func:`resume_in_thread`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import IO, Any

from agman_milvus.core.config import Settings
from agman_milvus.core.runtime import configure_process
from agman_milvus.core.threads import cpu_count
from agman_milvus.services.container import Services
from agman_milvus.services.store.catalog import JobStatus, ScreeningJob
from agman_milvus.services.store.engine import in_memory
from agman_milvus.services.store.vectors import hold_milvus, lite_server_uri, release_milvus
from agman_milvus.usecases.copyright import CopyChecker, CopyThresholds
from agman_milvus.usecases.screening import run_chunk, run_job

__all__ = ["ChunkFailedError", "child_settings", "local_processes", "resume_in_thread",
           "run_chunks_in_processes", "run_locally", "start_thread"]

log = logging.getLogger(__name__)

#: Times a chunk may lose its child (killed, out of memory) before the job fails.
MAX_CHUNK_DEATHS = 2
#: Children a job starts at most unless told (``AGMAN_SCREEN_PROCESSES``): they all search the
#: caller's Milvus Lite, whose Python answers one search at a time (measured on 2 cores only).
DEFAULT_MAX_PROCESSES = 8
#: Seconds a child may take to start (imports, model, stores; a few seconds on an idle machine)
#: before it is stopped and its share left to the others or to the thread.
START_TIMEOUT = 300.0
#: Memory a child takes: 1.4-1.6 GB resident in the 600-query job of bench/screening.py (PyTorch
#: and OpenCV imported, 0.8 GB, the model, a batch's images and local features), with headroom.
CHILD_MEMORY = 2 * 2**30


class ChunkFailedError(RuntimeError):
    """A chunk of the job failed in a child process (the message says why)."""


def start_thread(job_id: int, checker: CopyChecker) -> threading.Thread:
    """Run the job in a daemon thread of this process (:func:`run_locally`). The process's
    allocator settings are applied first (:func:`configure_process`), so the thread shares the
    tuned heap instead of starting its own arena. The thread counts as a user of the Milvus
    client until the job ends, so closing the client that started it does not close an
    embedded Milvus Lite under it (nor under the children searching it)."""
    configure_process()
    settings = checker.settings
    if settings is not None:
        hold_milvus(settings)
    processes = local_processes(settings) if settings is not None else 1

    def target() -> None:
        try:
            run_locally(job_id, checker, processes)
        except Exception:  # recorded on the job row
            log.exception("screening job %d failed", job_id)
        finally:
            if settings is not None:
                release_milvus(settings)

    thread = threading.Thread(target=target, name=_thread_name(job_id), daemon=True)
    thread.start()
    return thread


def resume_in_thread(job: ScreeningJob, checker: CopyChecker) -> threading.Thread | None:
    """Go on with ``job`` (its row) in a thread of this process (:func:`start_thread`) from
    where its chunks stopped: the embedded default's job whose process ended (Ctrl-C, a crash,
    a closed terminal), or a failed one. None when the job is done or a thread of this process
    runs it already."""
    running_here = any(t.name == _thread_name(job.id) and t.is_alive() for t in threading.enumerate())
    if job.status == JobStatus.done or running_here:
        return None
    checker.catalog.screening_jobs.start(job.id)  # before the thread: a waiter must not see "failed"
    return start_thread(job.id, checker)


def _thread_name(job_id: int) -> str:
    return f"agman-screen-{job_id}"


def run_locally(job_id: int, checker: CopyChecker, processes: int) -> ScreeningJob:
    """Run (or resume) every chunk of job ``job_id``: on ``processes`` child processes when
    there are two or more chunks left and children can share this process's stores
    (:func:`run_chunks_in_processes`), what they leave (or everything) in this thread
    (:func:`~agman_milvus.usecases.screening.run_job`); returns the job's final row."""
    jobs = checker.catalog.screening_jobs
    if processes > 1 and jobs.summary(job_id).status != JobStatus.done.value:
        jobs.start(job_id)
        starts = [c.start for c in jobs.chunks(job_id) if c.done < c.stop - c.start]
        run_chunks_in_processes(job_id, checker, starts, processes)
    return run_job(job_id, checker)


def local_processes(settings: Settings) -> int:
    """How many child processes a job without workers uses: ``settings.screen_processes``, or
    one a core (:func:`~agman_milvus.core.threads.cpu_count`, which ``AGMAN_THREADS`` holds), at
    most :data:`DEFAULT_MAX_PROCESSES` and as many as the available memory holds
    (:data:`CHILD_MEMORY` each)."""
    if settings.screen_processes:
        return settings.screen_processes
    available = _available_memory()
    fits = available // CHILD_MEMORY if available is not None else DEFAULT_MAX_PROCESSES
    return max(1, min(cpu_count(), DEFAULT_MAX_PROCESSES, fits))


def _available_memory() -> int | None:
    """Bytes of memory available to new processes (Linux' ``MemAvailable``); None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def child_settings(settings: Settings, processes: int, checkpoint: Path) -> Settings | None:
    """The settings a child process runs with: the caller's, with the model in ``checkpoint``
    and its CPU work held to a share of the cores. A child reaches an embedded Milvus Lite as
    any second process does, over the port its holder publishes (this process, or the one it
    joined), and follows the directory when that process lets it go, so the job goes on when an
    ingest it shared the catalogue with ends. None when children cannot share this process's
    stores (an in-memory SQLite database, or an embedded Milvus Lite this process has not
    opened)."""
    if in_memory(settings.resolved_database_url):
        return None
    if settings.embedded and lite_server_uri(settings) is None:
        return None
    threads = max(1, cpu_count() // processes)
    return settings.model_copy(update={"checkpoint": checkpoint, "threads": threads})


def run_chunks_in_processes(job_id: int, checker: CopyChecker, starts: list[int], processes: int) -> None:
    """Run the chunks of job ``job_id`` that begin at ``starts`` on up to ``processes`` child
    processes. Chunks no child could take stay unfinished in SQL (the caller runs them). Raises
    :class:`ChunkFailedError` when a chunk fails (the job is marked failed with its message) or
    keeps killing its child. Nothing runs elsewhere when the model was given in memory (children
    load theirs from its file)."""
    settings, checkpoint = checker.settings, checker.embedder.checkpoint
    if settings is None or checkpoint is None or processes < 2 or len(starts) < 2:
        return
    shared = child_settings(settings, processes, checkpoint)
    if shared is None:
        return
    job = {"settings": shared.model_dump(mode="json"), "job_id": job_id,
           "model_version": checker.embedder.version, "thresholds": checker.thresholds.to_dict(),
           "verify_k": checker.verify_k, "vote_k": checker.vote_k}
    children: list[_Child] = []
    for _ in range(min(processes, len(starts))):
        try:
            children.append(_Child.start(job))
        except OSError as exc:  # no interpreter to run, no process left: the thread takes the rest
            log.warning("screening job %d: a child process could not start (%s)", job_id, exc)
            break
    if not children:
        return
    dispatch = _Dispatch(starts, settings.task_time_limit)
    log.info("screening job %d: %d chunks on %d local processes of %d thread(s)", job_id, len(starts),
             len(children), shared.threads)
    threads = [threading.Thread(target=dispatch.drive, args=(child,), name=f"{_thread_name(job_id)}-{n}",
                                daemon=True) for n, child in enumerate(children)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if dispatch.error is not None:
        checker.catalog.screening_jobs.fail(job_id, dispatch.error)
        raise ChunkFailedError(dispatch.error)


class _Dispatch:
    """The chunks still to run, handed to each child's thread one at a time."""

    def __init__(self, starts: list[int], time_limit: float) -> None:
        self._pending = list(starts)
        self._time_limit = time_limit  # seconds a chunk may run in a child
        self._deaths: Counter[int] = Counter()
        self._lock = threading.Lock()
        self.error: str | None = None

    def _take(self) -> int | None:
        with self._lock:
            return self._pending.pop(0) if self._pending and self.error is None else None

    def drive(self, child: _Child) -> None:
        """Feed ``child`` chunks until none are left, a chunk fails or the child dies."""
        try:
            if not child.wait_ready():
                return
            while (start := self._take()) is not None:
                try:
                    child.run(start, self._time_limit)
                except _ChildDied as exc:
                    with self._lock:
                        self._deaths[start] += 1
                        if self._deaths[start] >= MAX_CHUNK_DEATHS:
                            self.error = (f"the chunk at query {start} ended {MAX_CHUNK_DEATHS} "
                                          f"processes, the last with {exc}")
                        else:
                            log.warning("screening process %d died (%s); its chunk at query %d goes on "
                                        "elsewhere", child.pid, exc, start)
                            self._pending.insert(0, start)
                    return
                except ChunkFailedError as exc:
                    with self._lock:
                        self.error = self.error or str(exc)
                    return
        finally:
            child.stop()


class _ChildDied(RuntimeError):
    """The child process ended without answering (killed, out of memory)."""


class _Child:
    """One child process and its end of the conversation."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._proc = proc
        self.pid = proc.pid

    @classmethod
    def start(cls, job: dict[str, Any]) -> _Child:
        proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, bufsize=1)
        child = cls(proc)
        child._send(job)
        return child

    def _send(self, message: dict[str, Any]) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps(message) + "\n")
            self._proc.stdin.flush()
        except OSError as exc:  # the child is gone; its answer (none) says so
            log.debug("screening process %d: %s", self.pid, exc)

    def _answer(self, timeout: float) -> dict[str, Any]:
        """The child's next message; :class:`_ChildDied` when it ended, or said nothing within
        ``timeout`` seconds (it is killed then)."""
        assert self._proc.stdout is not None
        if not select.select([self._proc.stdout], [], [], timeout)[0]:
            self._proc.kill()
            self._proc.wait()
            raise _ChildDied(f"no answer within {timeout:.0f} s; killed")
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            raise _ChildDied(f"exit status {code}" if code >= 0 else f"signal {-code}")
        try:
            return dict(json.loads(line))
        except (ValueError, TypeError) as exc:  # not our child speaking (an interpreter that is not Python's)
            self._proc.kill()
            raise _ChildDied(f"unexpected output {line[:80]!r}") from exc

    def wait_ready(self) -> bool:
        """True once the child has loaded the model and reached the stores; False (logged)
        when it cannot run the job or did not start within :data:`START_TIMEOUT`."""
        try:
            answer = self._answer(START_TIMEOUT)
        except _ChildDied as exc:
            log.warning("screening process %d did not start (%s)", self.pid, exc)
            return False
        if answer.get("ready"):
            return True
        log.warning("screening process %d cannot run the job: %s", self.pid, answer.get("error"))
        return False

    def run(self, start: int, time_limit: float) -> None:
        """Run the chunk at ``start``; raises :class:`ChunkFailedError` or :class:`_ChildDied`,
        also when the child has not answered within ``time_limit`` seconds (it is killed: a
        chunk that hangs, as a worker's task past its time limit)."""
        self._send({"start": start})
        answer = self._answer(time_limit)
        if "error" in answer:
            raise ChunkFailedError(answer["error"])

    def stop(self) -> None:
        """Close the child's input (it exits after its chunk) and reap it."""
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


# -- the child process ---------------------------------------------------------------------------
def _watch_parent(parent: int) -> None:
    """End this process within a second of its parent's end (the job's caller is gone)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _build_checker(job: dict[str, Any], services: Services) -> CopyChecker:
    checker = CopyChecker.from_services(services)
    if checker.embedder.version != job["model_version"]:
        raise ValueError(f"its model is {checker.embedder.version}, the job's {job['model_version']}")
    checker.thresholds = CopyThresholds.from_dict(job["thresholds"])
    checker.verify_k, checker.vote_k = int(job["verify_k"]), int(job["vote_k"])
    return checker


def _serve(requests: IO[str], answers: IO[str]) -> None:
    """Answer the parent's job, then its chunks, until its input ends. The child's services are
    closed before it returns: a child that came to hold the catalogue's Milvus Lite (the process
    it joined let the directory go) lets it go while this process still answers calls, not in the
    interpreter's shutdown, where the gRPC server cannot take the calls of processes that joined it
    (its thread died with a traceback in CI)."""

    def answer(message: dict[str, Any]) -> None:
        answers.write(json.dumps(message) + "\n")
        answers.flush()

    job = json.loads(requests.readline())
    with contextlib.ExitStack() as closing:
        try:
            services = Services(Settings.model_validate(job["settings"]))
            closing.callback(services.close)
            checker = _build_checker(job, services)
        except Exception as exc:  # noqa: BLE001 - told to the parent, which runs the chunks elsewhere
            answer({"error": f"{type(exc).__name__}: {exc}"})
            return
        answer({"ready": True})
        worker = f"local-{os.getpid()}"
        for line in requests:
            start = int(json.loads(line)["start"])
            try:
                run_chunk(job["job_id"], start, checker, worker=worker, fail_job=False)
            except Exception as exc:  # noqa: BLE001 - the parent marks the job failed with it
                answer({"error": f"{type(exc).__name__}: {exc}"})
                return
            answer({"done": start})


def main() -> None:
    """The child: answers on the original stdout; anything else printed goes to stderr."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's; this process follows it
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    _serve(sys.stdin, answers)


if __name__ == "__main__":
    main()
