"""The fault tier: crashes and restarts in the middle of an ingest, on the full server stack
(PostgreSQL + Redis + two Celery worker processes + a real Milvus server; runs in
``tests/server_stack_tier.sh``, ``-k fault`` selects these).

Each case runs ``agman ingest`` of a fresh manifest of ``N`` small images, waits until the
workers are busy, holds them (SIGSTOP) until the manifest is registered, then SIGKILLs both
workers (and starts two new ones), SIGKILLs and restarts Redis, freezes the Milvus server for
``FREEZE`` seconds (SIGSTOP; restarting milvus-lite 2.3.5 with data did not come back within 6
minutes here), or restarts PostgreSQL (immediate mode:
connections cut, no clean shutdown). The ingest command must then finish on its own with every
image indexed, within ``RECOVERY_LIMIT`` seconds of the service being back, and the
deployment must hold 0 lost and 0 duplicated images: every SQL row indexed (or failed with a
reason), each collection holding exactly one entity per indexed row (``count(*)``), and
``agman reconcile --dry-run`` clean. Stale work is re-sent after
``AGMAN_PENDING_RESEND_AFTER`` = 10 s here (120 s by default).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.e2e.conftest import AGMAN, Catalogue, Deployment, base_env, wait_for_worker
from tests.e2e.test_server_stack import _create_database

pytestmark = [pytest.mark.server_stack, pytest.mark.timeout(900)]

N = 120  # images per case
RESEND_AFTER = 10  # seconds
#: seconds from the end of the fault (the service is back, or new workers are ready) until
#: every image of the case is indexed
RECOVERY_LIMIT = 180
#: seconds the Milvus server does not answer; kept under its etcd session TTL (30 s), past which
#: a frozen Milvus 2.3 exits when it wakes up
FREEZE = 15
WORK_ENV = "AGMAN_TEST_STACK_WORK"


@pytest.fixture(scope="module")
def stack(catalogue: Catalogue, workdir: Path, milvus_server) -> Iterator[Deployment]:
    if os.environ.get(WORK_ENV) is None:
        pytest.skip(f"{WORK_ENV} is not set: run tests/server_stack_tier.sh for the fault tier")
    env = base_env(
        workdir / "data", catalogue.checkpoint,
        AGMAN_MILVUS_URI=milvus_server.uri,
        AGMAN_DATABASE_URL=_create_database(os.environ["AGMAN_TEST_PG_ADMIN"]),
        AGMAN_BROKER_URL=os.environ["AGMAN_TEST_REDIS_URL"],
        AGMAN_BROKER_KEY_PREFIX=f"faults{uuid.uuid4().hex[:6]}:",
        AGMAN_COLLECTION_PREFIX=f"f{uuid.uuid4().hex[:8]}",
        AGMAN_PENDING_RESEND_AFTER=str(RESEND_AFTER),
        AGMAN_BATCH_SIZE="16",
    )
    deployment = Deployment("faults", env, cwd=workdir, asynchronous=True, logs=workdir)
    deployment.run("db", "upgrade")
    try:
        _start_workers(deployment)
        yield deployment
    finally:
        deployment.stop_all()


def _start_workers(d: Deployment) -> list[subprocess.Popen[bytes]]:
    procs = [d.start("worker", "-Q", "agman.gpu,agman.default", "--no-compile", "-n",
                     f"fault{uuid.uuid4().hex[:4]}@%h", name=f"fault-worker-{len(d.background)}")
             for _ in range(2)]
    wait_for_worker(d)
    return procs


def _manifest(root: Path, case: str, seed: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "id", "colour"])
        for i in range(N):
            pixels = rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"{i}.jpg", quality=90)
            writer.writerow([f"{i}.jpg", f"{case}-{i}", "red"])
    return root / "manifest.csv"


def _sql(d: Deployment, query: str) -> list[tuple]:
    import psycopg

    url = d.env["AGMAN_DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(url, connect_timeout=3) as conn:
        return list(conn.execute(query).fetchall())


def _progress(d: Deployment, case: str) -> tuple[int, int]:
    """(registered, indexed) images of ``case``; (-1, -1) while the database is unreachable."""
    try:
        rows = _sql(d, "SELECT i.status, count(*) FROM images i JOIN products p ON p.id = i.product_id "
                       f"WHERE p.external_id LIKE '{case}-%' GROUP BY i.status")
    except Exception:  # noqa: BLE001 - PostgreSQL may be restarting
        return -1, -1
    counts = {str(status): n for status, n in rows}
    return sum(counts.values()), counts.get("indexed", 0)


def _wait(predicate: Callable[[], bool], timeout: float, what: str, d: Deployment) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{d.log_tail()}")


def _run_case(d: Deployment, tmp: Path, case: str, seed: int, fault: Callable[[], None]) -> dict:
    manifest = _manifest(tmp / case, case, seed)
    log = open(tmp / f"{case}-ingest.json", "w+")
    ingest = subprocess.Popen([str(AGMAN), "ingest", str(manifest), "--json"], cwd=d.cwd, env=d.env,
                              stdout=log, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: _progress(d, case)[1] >= 16, 240, f"{case}: the ingest to be under way", d)
        # Hold the busy workers (SIGSTOP) until the whole manifest is registered, so the fault
        # lands mid-ingest however fast they are; they resume (or are killed) with the fault.
        paused = [p for p in d.background if p.poll() is None and "worker" in p.args]
        for proc in paused:
            os.killpg(proc.pid, signal.SIGSTOP)
        try:
            _wait(lambda: _progress(d, case)[0] == N, 240, f"{case}: the manifest to be registered", d)
            at_fault = _progress(d, case)[1]
            assert at_fault < N, f"{case}: the fault came too late ({at_fault}/{N} already indexed)"
            faulted = time.monotonic()
            fault()
        finally:
            for proc in paused:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGCONT)
        back = time.monotonic()
        _wait(lambda: _progress(d, case)[1] == N, RECOVERY_LIMIT, f"{case}: every image indexed", d)
        recovery, outage = time.monotonic() - back, back - faulted
        _, stderr = ingest.communicate(timeout=120)
    finally:
        if ingest.poll() is None:
            ingest.kill()
            ingest.wait()
    log.seek(0)
    out = log.read()
    log.close()
    assert ingest.returncode == 0, f"{case}: agman ingest exited {ingest.returncode}\n{stderr[-3000:]}"
    summary = json.loads(out[out.index("{"):])
    assert (summary["indexed"], summary["failed"], summary["pending"]) == (N, 0, 0), summary
    _assert_nothing_lost_or_duplicated(d)
    print(f"\nfault {case}: {at_fault}/{N} indexed at the fault, which took {outage:.1f} s; all indexed "
          f"{recovery:.1f} s after it")
    return {"case": case, "indexed_at_fault": at_fault, "fault_seconds": round(outage, 1),
            "recovery_seconds": round(recovery, 1)}


def _assert_nothing_lost_or_duplicated(d: Deployment) -> None:
    statuses = dict(_sql(d, "SELECT status, count(*) FROM images GROUP BY status"))
    reasonless = _sql(d, "SELECT count(*) FROM images WHERE status = 'failed' "
                         "AND coalesce(failure_reason, '') = ''")[0][0]
    assert set(statuses) <= {"indexed", "failed"} and reasonless == 0, statuses
    counts = json.loads(d.python(
        "import json\nfrom agman_milvus import Client\nstore = Client().services.vectors\n"
        "print(json.dumps({label: store.count(label) for label in [*store.schema.names, 'copy']}))\n"))
    assert set(counts.values()) == {statuses["indexed"]}, (counts, statuses)  # one entity per row
    report = d.json("reconcile", "--dry-run")
    assert report["clean"] is True and report["stale_pending"] == 0, report


def test_fault_worker_sigkill_mid_batch(stack: Deployment, tmp_path: Path) -> None:
    workers = [p for p in stack.background if p.poll() is None and "worker" in p.args]

    def kill_workers() -> None:
        for proc in workers:
            stack.stop(proc, sig=signal.SIGKILL)
            stack.background.remove(proc)
        _start_workers(stack)

    _run_case(stack, tmp_path, "kill", 1, kill_workers)


def test_fault_redis_restart(stack: Deployment, tmp_path: Path) -> None:
    work = Path(os.environ[WORK_ENV]) / "redis"

    def restart_redis() -> None:
        pid = int((work / "redis.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        while Path(f"/proc/{pid}").exists():
            time.sleep(0.1)
        time.sleep(2)
        subprocess.run(["redis-server", "--bind", "127.0.0.1", "--port", "6379", "--save", "",
                        "--appendonly", "yes", "--daemonize", "yes", "--dir", str(work),
                        "--pidfile", str(work / "redis.pid"), "--logfile", str(work / "redis.log")],
                       check=True)

    _run_case(stack, tmp_path, "redis", 2, restart_redis)


def test_fault_milvus_freeze(stack: Deployment, tmp_path: Path, milvus_server) -> None:
    _run_case(stack, tmp_path, "milvus", 3, lambda: milvus_server.freeze(FREEZE))


def test_fault_postgres_restart(stack: Deployment, tmp_path: Path) -> None:
    pg = Path(os.environ[WORK_ENV]) / "pg"
    pg_ctl = str(Path(os.environ["AGMAN_TEST_PGBIN"]) / "pg_ctl")

    def restart_postgres() -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", pg_ctl, "-D", str(pg), "-m", "immediate",
                        "-l", str(pg.parent / "pg.log"), "-w", "restart"],
                       check=True, stdout=subprocess.DEVNULL, timeout=120)

    _run_case(stack, tmp_path, "postgres", 4, restart_postgres)
