"""A screening job without workers shared among child processes of the caller (the embedded
default: Milvus Lite served by the caller's process, a SQLite catalog file, a tiny real model
loaded from its file by every process):

* the children take the job's chunks and give the verdicts the thread gives;
* a child killed in the middle of a chunk: another resumes the chunk, no query is checked twice;
* a child that stops answering is killed after ``task_time_limit`` and its chunk goes on too;
* a model given in memory keeps the job in the thread (children could not load it);
* the caller's process dies: its children stop, the job stays running and resumes.
* a child that holds the catalogue's Milvus Lite lets it go when its input ends, before it exits.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import noise_jpeg
from tests.support.celery_harness import tiny_checkpoint, wait_until

pytestmark = pytest.mark.timeout(300)


def _copies(count: int, originals: int = 4) -> list[bytes]:
    """``count`` different files, each a re-encoded copy of one of the originals: every query
    has one match, so the matches show that each was checked once."""
    return [noise_jpeg(7000 + n % originals, 96, quality=95 - n // originals) for n in range(count)]


def _settings(data_dir: Path, checkpoint: Path, processes: int):  # noqa: ANN202 - Settings
    from agman_milvus.core.config import Settings

    return Settings(data_dir=data_dir, checkpoint=checkpoint, device="cpu", batch_size=4, broker_url=None,
                    milvus_uri=None, database_url=None, screen_processes=processes, threads=1)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from agman_milvus.app.client import Client

    tmp = tmp_path_factory.mktemp("local-screening")
    c = Client(_settings(tmp / "data", tiny_checkpoint(tmp / "tiny.safetensors"), processes=2))
    for i in range(4):
        assert c.ingest(f"original-{i}", noise_jpeg(7000 + i, 96), {"colour": "red"}).status == "indexed"
    yield c
    c.close()


def _best(job) -> dict[str, tuple[str, str | None]]:  # noqa: ANN001 - ScreeningJobHandle
    """Each query's rank-1 match (verdict, product); asserts no query was checked twice."""
    best: dict[str, tuple[str, str | None]] = {}
    for m in job.matches():
        if m.verdict == "error" or m.evidence.get("rank") == 1:
            assert m.query_ref not in best, f"{m.query_ref} checked twice"
            best[m.query_ref] = (m.verdict, m.evidence.get("product_id"))
    return best


def _local_pids(client, job_id: int) -> set[int]:  # noqa: ANN001 - Client
    workers = {c.worker for c in client.services.catalog.screening_jobs.chunks(job_id)}
    return {int(w.removeprefix("local-")) for w in workers if w and w.startswith("local-")}


def test_child_processes_share_the_job_and_agree_with_the_thread(client, caplog) -> None:  # noqa: ANN001
    from agman_milvus.app.client import Client

    queries = [noise_jpeg(7000 + i, 96) for i in range(4)] + [noise_jpeg(8000 + i, 96) for i in range(12)]
    with caplog.at_level(logging.INFO, logger="agman_milvus.usecases.local_screening"):
        job = client.screen(queries, top_k=2, chunk_size=2).wait(timeout=240)
    assert (job.status, job.done, job.total) == ("done", 16, 16), job.error
    assert "8 chunks on 2 local processes of 1 thread(s)" in caplog.text
    chunks = client.services.catalog.screening_jobs.chunks(job.id)
    assert all(c.done == 2 and (c.worker or "").startswith("local-") for c in chunks), chunks
    pids = _local_pids(client, job.id)
    assert pids and os.getpid() not in pids

    in_thread = Client(client.settings.model_copy(update={"screen_processes": 1}))
    try:
        alone = in_thread.screen(queries, top_k=2, chunk_size=2).wait(timeout=240)
        assert alone.status == "done" and all(c.worker is None for c in
                                              client.services.catalog.screening_jobs.chunks(alone.id))
    finally:
        in_thread.close()
    shared, threaded = _best(job), _best(alone)
    refs = client.services.catalog.screening_jobs.get(job.id).params["queries"]
    alone_refs = client.services.catalog.screening_jobs.get(alone.id).params["queries"]
    assert [shared.get(r) for r in refs] == [threaded.get(r) for r in alone_refs]
    assert [shared[r] for r in refs[:4]] == [("copy", f"original-{i}") for i in range(4)]


def test_a_killed_child_s_chunk_goes_on_in_another(client, caplog) -> None:  # noqa: ANN001
    queries = _copies(192)
    # two chunks: the first two batches of 64, the second one (done with its first commit)
    job = client.screen(queries, top_k=2, chunk_size=128)
    jobs = client.services.catalog.screening_jobs

    found: list[tuple[int, int]] = []

    def a_child_mid_chunk() -> bool:
        found[:] = [(int(c.worker.removeprefix("local-")), c.start) for c in jobs.chunks(job.id)
                    if (c.worker or "").startswith("local-") and 0 < c.done < c.stop - c.start]
        return bool(found)

    wait_until(a_child_mid_chunk, 180, poll=0.02, what="a child in the middle of a chunk")
    pid, start = found[0]
    with caplog.at_level(logging.WARNING, logger="agman_milvus.usecases.local_screening"):
        os.kill(pid, signal.SIGKILL)
        job.wait(timeout=240)
    assert f"screening process {pid} died (signal 9); its chunk at query {start} goes on" in caplog.text
    assert (job.status, job.done, job.total) == ("done", 192, 192), job.error
    assert jobs.chunk(job.id, start).worker != f"local-{pid}"  # another process finished it
    best = _best(job)
    refs = jobs.get(job.id).params["queries"]
    assert [best.get(r) for r in refs] == [("copy", f"original-{n % 4}") for n in range(192)]


def test_a_child_that_stops_answering_is_killed_and_its_chunk_goes_on(client, caplog, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(client.services.settings, "task_time_limit", 10)  # seconds a chunk may run
    job = client.screen(_copies(64), top_k=2, chunk_size=8)  # eight chunks of one batch each
    jobs = client.services.catalog.screening_jobs
    at_work: list[int] = []

    def a_child_at_work() -> bool:
        at_work[:] = [int(c.worker.removeprefix("local-")) for c in jobs.chunks(job.id)
                      if (c.worker or "").startswith("local-") and c.done == 0]
        return bool(at_work)

    wait_until(a_child_at_work, 180, poll=0.02, what="a child at work on a chunk")
    pid = at_work[0]
    with caplog.at_level(logging.WARNING, logger="agman_milvus.usecases.local_screening"):
        os.kill(pid, signal.SIGSTOP)  # hangs, as a call that never returns would
        job.wait(timeout=240)
    assert f"screening process {pid} died (no answer within 10 s; killed)" in caplog.text
    assert (job.status, job.done, job.total) == ("done", 64, 64), job.error
    refs = jobs.get(job.id).params["queries"]
    assert [_best(job).get(r) for r in refs] == [("copy", f"original-{n % 4}") for n in range(64)]


def test_children_that_do_not_start_in_time_leave_the_job_to_the_thread(client, caplog, monkeypatch) -> None:  # noqa: ANN001
    from agman_milvus.usecases import local_screening

    monkeypatch.setattr(local_screening, "START_TIMEOUT", 0.01)  # no child imports PyTorch that fast
    with caplog.at_level(logging.WARNING, logger="agman_milvus.usecases.local_screening"):
        job = client.screen(_copies(4), top_k=2, chunk_size=2).wait(timeout=120)
    assert job.status == "done" and _local_pids(client, job.id) == set(), job.error
    assert caplog.text.count("did not start (no answer within 0 s; killed)") == 2
    refs = client.services.catalog.screening_jobs.get(job.id).params["queries"]
    assert [_best(job).get(r) for r in refs] == [("copy", f"original-{n}") for n in range(4)]


def test_children_that_cannot_be_started_leave_the_job_to_the_thread(client, caplog, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")  # the interpreter is gone
    with caplog.at_level(logging.WARNING, logger="agman_milvus.usecases.local_screening"):
        job = client.screen(_copies(4), top_k=2, chunk_size=2).wait(timeout=120)
    assert job.status == "done" and _local_pids(client, job.id) == set(), job.error
    assert "a child process could not start" in caplog.text
    refs = client.services.catalog.screening_jobs.get(job.id).params["queries"]
    assert [_best(job).get(r) for r in refs] == [("copy", f"original-{n}") for n in range(4)]


def test_a_model_given_in_memory_keeps_the_job_in_the_thread(client) -> None:  # noqa: ANN001
    from agman_milvus.app.client import Client
    from agman_milvus.core.model import load_checkpoint
    from agman_milvus.services.container import Services
    from agman_milvus.services.embedding import Embedder

    model = load_checkpoint(client.settings.checkpoint)
    given = Client(services=Services(client.settings, embedder=Embedder(model, device="cpu")))
    try:
        job = given.screen(_copies(3), top_k=2, chunk_size=1).wait(timeout=120)
        assert job.status == "done" and _local_pids(given, job.id) == set()
        refs = given.services.catalog.screening_jobs.get(job.id).params["queries"]
        assert [_best(job).get(r) for r in refs] == [("copy", f"original-{n}") for n in range(3)]
    finally:
        given.close()


CALLER = textwrap.dedent("""
    import io, os, sys, time
    import numpy as np
    from PIL import Image
    from agman_milvus.app.client import Client
    from agman_milvus.core.config import Settings

    def jpeg(quality):
        buf = io.BytesIO()
        rng = np.random.default_rng(1)
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(buf, "JPEG", quality=quality)
        return buf.getvalue()

    settings = Settings(data_dir=sys.argv[1], checkpoint=sys.argv[2], device="cpu", batch_size=4,
                        screen_processes=2, threads=1)
    client = Client(settings)
    client.ingest("original", jpeg(90))
    job = client.screen([jpeg(95 - n) for n in range(40)], top_k=2, chunk_size=4)  # copies, each a file
    jobs = client.services.catalog.screening_jobs
    while not any(c.done and (c.worker or "").startswith("local-") for c in jobs.chunks(job.id)):
        time.sleep(0.05)
    print(job.id, flush=True)
    os._exit(1)  # the caller dies, Milvus Lite with it
""")


def test_children_stop_with_their_caller_and_the_job_resumes(tmp_path: Path) -> None:
    from agman_milvus.app.client import Client

    checkpoint = tiny_checkpoint(tmp_path / "tiny.safetensors")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGMAN_", "MILVUS_URI"))}
    caller = subprocess.run([sys.executable, "-c", CALLER, str(tmp_path / "data"), str(checkpoint)],
                            env=env, capture_output=True, text=True, timeout=240)
    job_id = int(caller.stdout.split()[0])
    client = Client(_settings(tmp_path / "data", checkpoint, processes=2))
    try:
        pids = _local_pids(client, job_id)
        assert pids

        def gone() -> bool:
            return not any(Path(f"/proc/{pid}").exists() and "zombie" not in
                           Path(f"/proc/{pid}/status").read_text(errors="replace") for pid in pids)

        wait_until(gone, 10, poll=0.1, what="the children's end")
        row = client.services.catalog.screening_jobs.get(job_id)
        assert row.status.value == "running" and 0 < row.done < 40, (row.status, row.done, row.error)
        job = client.resume_screening(job_id).wait(timeout=240)
        assert (job.status, job.done) == ("done", 40), job.error
        refs = client.services.catalog.screening_jobs.get(job_id).params["queries"]
        assert [_best(job).get(r) for r in refs] == [("copy", "original")] * 40
    finally:
        client.close()


def test_a_child_lets_the_catalogue_go_before_it_exits(tmp_path: Path) -> None:
    """A child that opened the catalogue's Milvus Lite itself (the process it joined let it go)
    closes it when its input ends, while it still answers calls: left to the interpreter's
    shutdown, its gRPC server could no longer take the calls of processes that joined it (its
    thread died with a traceback in CI). The child's loop runs here, in this process."""
    import io
    import json

    from agman_milvus.app.client import Client
    from agman_milvus.services.store import lite_sharing
    from agman_milvus.usecases import local_screening

    settings = _settings(tmp_path / "data", tiny_checkpoint(tmp_path / "tiny.safetensors"), processes=2)
    client = Client(settings)
    try:
        assert client.ingest("original", noise_jpeg(7100, 96)).status == "indexed"
        checker = client._copy_checker()
        job = {"settings": settings.model_dump(mode="json"), "job_id": 1,
               "model_version": checker.embedder.version, "thresholds": checker.thresholds.to_dict(),
               "verify_k": checker.verify_k, "vote_k": checker.vote_k}
    finally:
        client.close()
    directory = settings.data_dir / "milvus.db"
    assert not lite_sharing.locked(directory)
    answers = io.StringIO()
    local_screening._serve(io.StringIO(json.dumps(job) + "\n"), answers)  # the job, then no chunk
    assert json.loads(answers.getvalue()) == {"ready": True}
    assert not lite_sharing.locked(directory) and not lite_sharing.serving_file(directory).exists()
    answers = io.StringIO()  # settings it cannot read are answered, as a model it cannot load is
    local_screening._serve(io.StringIO(json.dumps({**job, "settings": {"threads": "many"}}) + "\n"), answers)
    assert json.loads(answers.getvalue())["error"].startswith("ValidationError")


def test_how_many_children_and_when_none(tmp_path: Path) -> None:
    from agman_milvus.core.config import Settings
    from agman_milvus.core.threads import cpu_count
    from agman_milvus.usecases.local_screening import DEFAULT_MAX_PROCESSES, child_settings, local_processes

    assert local_processes(Settings(data_dir=tmp_path, screen_processes=3)) == 3
    default = local_processes(Settings(data_dir=tmp_path))
    assert 1 <= default <= min(cpu_count(), DEFAULT_MAX_PROCESSES)
    checkpoint = tmp_path / "model.safetensors"
    # children cannot share an in-memory database, nor a Milvus Lite this process has not opened
    assert child_settings(Settings(data_dir=tmp_path, database_url="sqlite://"), 2, checkpoint) is None
    assert child_settings(Settings(data_dir=tmp_path), 2, checkpoint) is None
    server = child_settings(Settings(data_dir=tmp_path, milvus_uri="http://127.0.0.1:19530"), 2, checkpoint)
    assert server is not None and server.milvus_uri == "http://127.0.0.1:19530"
    assert (server.checkpoint, server.threads) == (checkpoint, max(1, cpu_count() // 2))
