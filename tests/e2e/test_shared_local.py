"""One machine, several processes: ``agman milvus-serve`` shares the embedded data directory,
``agman worker`` processes embed and screen from Redis, and every step is its own process. The
commands name the server's port (AGMAN_MILVUS_URI); the worker finds it by the data dir."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import journeys
from tests.e2e.conftest import Catalogue, Deployment, base_env, free_port, wait_for_port, wait_for_worker
from tests.support.celery_harness import REDIS_URL, delete_redis_keys, redis_available

pytestmark = [pytest.mark.services, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def deployment(catalogue: Catalogue, workdir: Path) -> Iterator[Deployment]:
    if not redis_available():
        pytest.skip(f"needs Redis at {REDIS_URL}")
    port = free_port()
    prefix = f"agman-e2e-{uuid.uuid4().hex[:8]}:"
    env = base_env(workdir / "data", catalogue.checkpoint,
                   AGMAN_MILVUS_URI=f"http://127.0.0.1:{port}", AGMAN_BROKER_URL=REDIS_URL,
                   AGMAN_BROKER_KEY_PREFIX=prefix)
    deployment = Deployment("shared_local", env, cwd=workdir, asynchronous=True, logs=workdir)
    try:
        server = deployment.start("milvus-serve", "--port", str(port), name="milvus-serve")
        wait_for_port(port, server, timeout=60)
        deployment.start("worker", "-Q", "agman.gpu,agman.default", "--no-compile",
                         "-n", f"e2e-{uuid.uuid4().hex[:6]}@%h", name="worker", env={"AGMAN_MILVUS_URI": ""})
        wait_for_worker(deployment)
        yield deployment
    finally:
        deployment.stop_all()
        delete_redis_keys(prefix)


def test_ingest_on_workers(deployment: Deployment, catalogue: Catalogue) -> None:
    journeys.ingest(deployment, catalogue)


def test_search(deployment: Deployment, catalogue: Catalogue, tmp_path: Path) -> None:
    journeys.search(deployment, catalogue, tmp_path)


def test_a_command_without_the_uri_finds_the_served_directory(deployment: Deployment,
                                                              catalogue: Catalogue) -> None:
    """`agman milvus-serve` publishes its port beside the directory: a command with the same
    data dir and no AGMAN_MILVUS_URI works over it instead of failing on the directory's lock
    (the broker set too: it is served, so workers could share it)."""
    proc = deployment.run("-v", "search", str(catalogue.image(journeys.QUERY)), "-a", "colour", "--json",
                          env={"AGMAN_MILVUS_URI": ""})
    assert "open in process" in " ".join(proc.stderr.split()), proc.stderr[-2000:]
    assert json.loads(proc.stdout)[0]["product_id"] == journeys.QUERY


def test_check_copy(deployment: Deployment, catalogue: Catalogue) -> None:
    journeys.check_copy(deployment, catalogue)


def test_python_api(deployment: Deployment, catalogue: Catalogue) -> None:
    journeys.python_api(deployment, catalogue)


def test_screen_on_workers(deployment: Deployment, catalogue: Catalogue, tmp_path: Path) -> None:
    journeys.screen(deployment, catalogue, tmp_path)


def test_reconcile(deployment: Deployment, catalogue: Catalogue) -> None:
    journeys.reconcile(deployment, catalogue)
