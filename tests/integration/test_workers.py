"""Celery workers for real: Redis at 127.0.0.1:6379, ``agman worker`` subprocesses, a shared
``milvus-lite server``, a SQLite catalog file shared by all processes, a tiny real model.

* ingest events through a worker; the same image twice and the same message delivered twice
  leave one row and one vector;
* SIGKILL a worker in the middle of a batch; after a restart every image is indexed exactly
  once (SQL and Milvus agree) and none is lost;
* a screening job's chunks shared by two workers, each query checked once, and by the two
  processes of a prefork worker, each on its share of the cores.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import noise_jpeg
from tests.support.celery_harness import (
    REDIS_URL,
    Worker,
    delete_redis_keys,
    milvus_lite_server,
    redis_available,
    tiny_checkpoint,
    wait_until,
)

pytestmark = [pytest.mark.services, pytest.mark.timeout(240)]

VISIBILITY_TIMEOUT = 12  # seconds; the test's tasks take a few seconds


@dataclass
class Deployment:
    settings: object  # agman_milvus.core.config.Settings
    env: dict[str, str]
    tmp: Path

    def worker(self, name: str, **kwargs: object) -> Worker:
        return Worker(self.env, self.tmp / f"{name}.log", **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    if not redis_available():
        pytest.skip(f"Redis is not reachable at {REDIS_URL}")
    from agman_milvus.core.config import Settings

    tmp = tmp_path_factory.mktemp("workers")
    checkpoint = tiny_checkpoint(tmp / "tiny.safetensors")
    key_prefix = f"agman-test-{uuid.uuid4().hex[:8]}:"
    with milvus_lite_server(tmp / "milvus.db") as milvus_uri:
        values = {
            "AGMAN_DATA_DIR": str(tmp / "data"),
            "AGMAN_MILVUS_URI": milvus_uri,
            "AGMAN_BROKER_URL": REDIS_URL,
            "AGMAN_BROKER_KEY_PREFIX": key_prefix,
            "AGMAN_CHECKPOINT": str(checkpoint),
            "AGMAN_COLLECTION_PREFIX": f"w{uuid.uuid4().hex[:8]}",
            "AGMAN_BATCH_SIZE": "4",
            "AGMAN_DEVICE": "cpu",
            "AGMAN_TASK_TIME_LIMIT": "10",
            "AGMAN_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AGMAN_", "MILVUS_URI"))}
        env.update(values)
        env["OMP_NUM_THREADS"] = "1"  # keep the worker light on a shared 2-core machine
        settings = Settings(**{k[len("AGMAN_"):].lower(): v for k, v in values.items()})
        try:
            yield Deployment(settings=settings, env=env, tmp=tmp)
        finally:
            delete_redis_keys(key_prefix)


def _counts(services) -> dict[str, int]:
    store = services.vectors
    return {label: store.count(label) for label in [*store.schema.names, "copy"]}



def test_worker_ingest_duplicates_and_redelivered_messages(deployment: Deployment) -> None:
    from agman_milvus.app.client import Client
    from agman_milvus.services.store.catalog import ImageStatus
    from agman_milvus.workers.app import create_app
    from agman_milvus.workers.names import EMBED_TASK, GPU_QUEUE

    worker = deployment.worker("w1").start()
    client = Client(deployment.settings)
    try:
        handles = [client.ingest(f"shirt-{i}", noise_jpeg(i), {"colour": "red"}, wait=True, timeout=90)
                   for i in range(3)]
        assert [h.status for h in handles] == ["indexed"] * 3, handles
        again = client.ingest("shirt-0", noise_jpeg(0), {"colour": "red"}, wait=True, timeout=90)
        assert again.image_id == handles[0].image_id and again.duplicate and again.status == "indexed"

        # The same message delivered twice (e.g. a redelivery after a lost ack), rows pending.
        ids = [h.image_id for h in handles]
        catalog = client.services.catalog
        catalog.images.mark_pending(ids)
        app = create_app(deployment.settings)
        before = worker.log().count("succeeded in")
        for _ in range(2):
            app.send_task(EMBED_TASK, args=[ids], queue=GPU_QUEUE)
        wait_until(lambda: worker.log().count("succeeded in") >= before + 2, 60, what="two tasks")
        rows = catalog.images.get_many(ids)
        assert all(r.status == ImageStatus.indexed for r in rows.values())
        assert catalog.images.count() == 3
        assert _counts(client.services) == {"colour": 3, "sleeve": 3, "copy": 3}
        assert worker.alive()
    finally:
        worker.stop()
        client.close()


def test_sigkill_mid_batch_loses_nothing(deployment: Deployment) -> None:
    from agman_milvus.services.container import Services
    from agman_milvus.services.store.catalog import ImageStatus
    from agman_milvus.usecases.ingest import register_image
    from agman_milvus.workers.app import create_app
    from agman_milvus.workers.producer import CeleryDispatcher

    services = Services(deployment.settings)
    catalog = services.catalog
    n = 48
    ids = [register_image(services, f"dress-{i}", noise_jpeg(1000 + i), {"colour": "blue"}).image_id
           for i in range(n)]
    assert len(set(ids)) == n

    def indexed() -> int:
        return sum(r.status == ImageStatus.indexed for r in catalog.images.get_many(ids).values())

    first = deployment.worker("kill-1").start()
    second = deployment.worker("kill-2")
    try:
        CeleryDispatcher(create_app(deployment.settings), task_batch=n).submit(ids)  # one message
        wait_until(lambda: indexed() >= 4, 90, poll=0.05, what="the batch to start")
        first.kill()
        killed_at, done_at_kill = time.monotonic(), indexed()
        assert 0 < done_at_kill < n, f"kill did not land mid-batch ({done_at_kill}/{n} indexed)"
        assert "succeeded in" not in first.log()

        # Redis hands the unacknowledged message out again once its visibility timeout passed.
        time.sleep(max(0.0, killed_at + VISIBILITY_TIMEOUT + 1 - time.monotonic()))
        second.start()
        wait_until(lambda: indexed() == n, 120, poll=0.2, what="every image indexed after restart")
        assert "embed_images[" in second.log() and " received" in second.log()  # redelivered
        statuses = {r.status for r in catalog.images.get_many(ids).values()}
        assert statuses == {ImageStatus.indexed}
        counts = _counts(services)
        total_indexed = catalog.images.count(ImageStatus.indexed)
        assert set(counts.values()) == {total_indexed}, (counts, total_indexed)
        assert set(services.vectors.get_vectors("colour", ids)) == set(ids)
        assert set(services.vectors.get_vectors("copy", ids)) == set(ids)
    finally:
        first.kill()
        second.stop()
        services.close()


def test_ingest_many_sends_batches_of_32(deployment: Deployment) -> None:
    from agman_milvus.app.client import Client
    from agman_milvus.services.store.catalog import ImageStatus

    worker = deployment.worker("many").start()
    client = Client(deployment.settings)
    try:
        items = [(f"event-{i}", noise_jpeg(5000 + i), {"colour": "green"}) for i in range(70)]
        items.append(("event-bad", b"GIF89a but nothing else"))
        handles = client.ingest_many(items)
        assert [h.status for h in handles[:70]] == ["pending"] * 70
        assert handles[70].status == "failed" and handles[70].reason.startswith("truncated:")
        for handle in handles:
            handle.wait(timeout=120)
        assert {h.status for h in handles[:70]} == {"indexed"}
        received = [line for line in worker.log().splitlines()
                    if "embed_images[" in line and " received" in line]
        assert len(received) == 3, received  # 32 + 32 + 6 images: three tasks, not 70
        ids = [h.image_id for h in handles[:70]]
        rows = client.services.catalog.images.get_many(ids)
        assert {r.status for r in rows.values()} == {ImageStatus.indexed}
        assert set(client.services.vectors.get_vectors("colour", ids)) == set(ids)
        assert worker.alive()
    finally:
        worker.stop()
        client.close()


def test_workers_resend_a_killed_batch_and_lost_messages(deployment: Deployment) -> None:
    """Recovery without Redis' visibility timeout (set to 10 minutes here): the next worker
    re-sends the images a SIGKILLed worker had claimed, and images whose message never reached
    the queue (a lost publish, a Redis restart without persistence)."""
    from agman_milvus.services.container import Services
    from agman_milvus.services.store.catalog import ImageStatus
    from agman_milvus.usecases.ingest import register_image
    from agman_milvus.workers.app import create_app
    from agman_milvus.workers.producer import CeleryDispatcher

    env = {**deployment.env, "AGMAN_PENDING_RESEND_AFTER": "4", "AGMAN_VISIBILITY_TIMEOUT": "600"}
    services = Services(deployment.settings)
    catalog = services.catalog
    killed = [register_image(services, f"coat-{i}", noise_jpeg(3000 + i), {"colour": "red"}).image_id
              for i in range(32)]

    def indexed(ids: list[int]) -> int:
        return sum(r.status == ImageStatus.indexed for r in catalog.images.get_many(ids).values())

    first = Worker(env, deployment.tmp / "resend-1.log")
    second = Worker(env, deployment.tmp / "resend-2.log")
    try:
        first.start()
        CeleryDispatcher(create_app(deployment.settings), task_batch=len(killed)).submit(killed)
        wait_until(lambda: indexed(killed) >= 4, 90, poll=0.05, what="the batch to start")
        first.kill()
        assert indexed(killed) < len(killed), "kill did not land mid-batch"
        lost = [register_image(services, f"hat-{i}", noise_jpeg(4000 + i), {"colour": "blue"}).image_id
                for i in range(8)]  # registered, never sent
        killed_at = time.monotonic()
        second.start()
        everything = killed + lost
        wait_until(lambda: indexed(everything) == len(everything), 90, poll=0.2,
                   what="every image indexed by re-sends")
        recovery = time.monotonic() - killed_at
        assert recovery < 90 and "re-sending" in second.log()
        rows = catalog.images.get_many(everything)
        assert {r.status for r in rows.values()} == {ImageStatus.indexed}
        total_indexed = catalog.images.count(ImageStatus.indexed)
        assert set(_counts(services).values()) == {total_indexed}  # no duplicate, none missing
    finally:
        first.kill()
        second.stop()
        services.close()


def test_two_workers_share_a_screening_job(deployment: Deployment) -> None:
    """A job's chunks are separate tasks: both workers take some, every query is checked once,
    and the batch that completes the last chunk marks the job done."""
    from agman_milvus.app.client import Client

    first, second = deployment.worker("screen-1"), deployment.worker("screen-2")
    first.start()
    second.start()
    client = Client(deployment.settings)
    try:
        originals = [noise_jpeg(7000 + i, 96) for i in range(4)]
        for i, image in enumerate(originals):
            handle = client.ingest(f"screened-{i}", image, {"colour": "red"}, wait=True, timeout=90)
            assert handle.status == "indexed"
        others = [noise_jpeg(8000 + i, 96) for i in range(12)]
        queries = [*originals, *others]
        job = client.screen(queries, top_k=2, chunk_size=2).wait(timeout=180)
        assert (job.status, job.done, job.total) == ("done", 16, 16), job.error

        chunks = client.services.catalog.screening_jobs.chunks(job.id)
        assert [(c.start, c.stop, c.done) for c in chunks] == [(s, s + 2, 2) for s in range(0, 16, 2)]
        workers = {c.worker for c in chunks}
        assert len(workers) == 2 and None not in workers, workers  # both took a share
        for w in (first, second):
            assert w.log().count("screen[") >= 2 and w.alive()  # received and succeeded lines

        refs = client.services.catalog.screening_jobs.get(job.id).params["queries"]
        found = {}
        for m in job.matches():
            if m.evidence.get("rank") == 1:
                assert m.query_ref not in found, f"{m.query_ref} checked twice"
                found[m.query_ref] = m.verdict
        assert all(found.get(ref) == "copy" for ref in refs[:4]), found  # each original found
    finally:
        client.close()
        first.stop()
        second.stop()


def test_a_prefork_workers_processes_share_a_job_on_a_share_of_the_cores(deployment: Deployment) -> None:
    """``agman worker -P prefork -c 2``: the two pool processes take the job's chunks, each
    holding its CPU work to its share of the cores (``AGMAN_THREADS``, set by the command), so
    they do not run two threads a core between them."""
    from agman_milvus.app.client import Client

    cores = len(os.sched_getaffinity(0))
    worker = deployment.worker("prefork", pool="prefork", concurrency=2, queues="agman.default")
    worker.start()
    client = Client(deployment.settings)
    try:
        queries = [noise_jpeg(9000 + i, 96) for i in range(8)]
        job = client.screen(queries, top_k=2, chunk_size=1).wait(timeout=180)
        assert (job.status, job.done, job.total) == ("done", 8, 8), job.error
        log = worker.log()
        share = max(1, cores // 2)
        assert f"prefork pool of 2, {share} CPU thread(s) each (AGMAN_THREADS)" in log
        held = re.findall(r"CPU work of process (\d+) held to (\d+) thread", log)
        assert len({pid for pid, _ in held}) == 2, log[-3000:]  # both pool processes worked
        assert all(int(threads) == share for _, threads in held), held
    finally:
        client.close()
        worker.stop()


def test_a_killed_workers_screening_chunk_is_resent(deployment: Deployment) -> None:
    """Recovery without Redis' visibility timeout (10 minutes here): a worker SIGKILLed in the
    middle of a chunk goes silent, a worker's timer re-sends the chunk, which the other worker
    resumes at its last committed batch; no query is checked twice."""
    from agman_milvus.app.client import Client

    env = {**deployment.env, "AGMAN_PENDING_RESEND_AFTER": "4", "AGMAN_VISIBILITY_TIMEOUT": "600",
           "AGMAN_TASK_TIME_LIMIT": "300"}
    first = Worker(env, deployment.tmp / "screen-kill-1.log")
    second = Worker(env, deployment.tmp / "screen-kill-2.log")
    client = Client(deployment.settings)
    try:
        first.start()
        original = noise_jpeg(9000, 96)
        indexed = client.ingest("kill-screened", original, {"colour": "red"}, wait=True, timeout=90)
        assert indexed.status == "indexed"
        queries = [original, *(noise_jpeg(9100 + i, 96) for i in range(127))]
        job = client.screen(queries, top_k=2, chunk_size=128)  # one chunk, two batches
        jobs = client.services.catalog.screening_jobs
        wait_until(lambda: jobs.chunk(job.id, 0).done >= 64, 120, poll=0.05, what="a first batch")
        first.kill()
        done_at_kill = jobs.chunk(job.id, 0).done
        assert done_at_kill < 128, "kill did not land mid-chunk"
        killed_at = time.monotonic()
        second.start()
        job.wait(timeout=120)
        assert (job.status, job.done, job.total) == ("done", 128, 128), job.error
        assert time.monotonic() - killed_at < 120
        # the second worker's timer re-sends the silent chunk; on a loaded machine the first
        # one's can already have, when a batch took longer than the 4 s (its run then stops)
        assert "re-sending screening job" in first.log() + second.log()
        second_name = second.argv[second.argv.index("-n") + 1].split("@")[0]
        assert (jobs.chunk(job.id, 0).worker or "").startswith(second_name + "@")  # it finished the chunk
        first_matches = [m for m in job.matches() if m.evidence.get("rank") == 1]
        refs = [m.query_ref for m in first_matches]
        assert len(refs) == len(set(refs)), "a query was checked twice"
        assert any(m.verdict == "copy" for m in first_matches)  # the original was found
    finally:
        client.close()
        first.kill()
        second.stop()


def test_a_failed_screening_job_is_sent_to_the_workers_again(deployment: Deployment) -> None:
    """``Client.resume_screening`` with a broker: a failed job's unfinished chunks go to the
    workers again and the job ends done, its error cleared."""
    from agman_milvus.app.client import Client
    from agman_milvus.usecases.screening import create_job, query_references

    worker = deployment.worker("screen-resume")
    client = Client(deployment.settings)
    try:
        catalog = client.services.catalog
        refs = query_references([noise_jpeg(9500 + i, 96) for i in range(4)], client.services.blobs)
        job_id = create_job(catalog, refs, top_k=2, chunk_size=2)  # never sent: only resumed
        catalog.screening_jobs.fail(job_id, "RuntimeError: the first run failed")
        worker.start()
        job = client.resume_screening(job_id).wait(timeout=180)
        assert (job.status, job.done, job.error) == ("done", 4, None)
        assert [c.done for c in catalog.screening_jobs.chunks(job_id)] == [2, 2]
        assert client.services._embedder is None  # following a job on workers loads no model here
    finally:
        client.close()
        worker.stop()
