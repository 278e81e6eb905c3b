"""The full server stack: PostgreSQL + Redis + Celery worker processes + a real Milvus server,
every step its own process (runs in ``tests/server_stack_tier.sh``)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import journeys
from tests.e2e.conftest import Catalogue, Deployment, base_env, wait_for_worker

pytestmark = [pytest.mark.server_stack, pytest.mark.timeout(1200)]

STACK_ENV = "AGMAN_TEST_SERVER_STACK"


def _create_database(admin_url: str) -> str:
    import psycopg

    name = f"agman_e2e_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.replace("postgresql://", "postgresql+psycopg://", 1).rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="module")
def deployment(catalogue: Catalogue, workdir: Path, milvus_server_uri: str) -> Iterator[Deployment]:
    if os.environ.get(STACK_ENV) != "1":
        pytest.skip(f"set {STACK_ENV}=1 and run tests/server_stack_tier.sh for the server stack")
    env = base_env(
        workdir / "data", catalogue.checkpoint,
        AGMAN_MILVUS_URI=milvus_server_uri,
        AGMAN_DATABASE_URL=_create_database(os.environ["AGMAN_TEST_PG_ADMIN"]),
        AGMAN_BROKER_URL=os.environ["AGMAN_TEST_REDIS_URL"],
        AGMAN_COLLECTION_PREFIX=f"e2e{uuid.uuid4().hex[:8]}",
    )
    deployment = Deployment("server_stack", env, cwd=workdir, asynchronous=True, logs=workdir)
    deployment.run("db", "upgrade")  # a configured database is migrated explicitly, first
    try:
        for n in range(2):
            deployment.start("worker", "-Q", "agman.gpu,agman.default", "--no-compile",
                             "-n", f"stack{n}@%h", name=f"worker{n}")
        wait_for_worker(deployment)
        yield deployment
    finally:
        deployment.stop_all()


def test_database_and_models(deployment: Deployment) -> None:
    journeys.database_commands(deployment)


def test_ingest_on_workers(deployment: Deployment, catalogue: Catalogue) -> None:
    journeys.ingest(deployment, catalogue)


def test_search(deployment: Deployment, catalogue: Catalogue, tmp_path: Path) -> None:
    journeys.search(deployment, catalogue, tmp_path)


def test_check_copy(deployment: Deployment, catalogue: Catalogue) -> None:
    journeys.check_copy(deployment, catalogue)


def test_python_api(deployment: Deployment, catalogue: Catalogue) -> None:
    journeys.python_api(deployment, catalogue)


def test_screen_on_workers(deployment: Deployment, catalogue: Catalogue, tmp_path: Path) -> None:
    journeys.screen(deployment, catalogue, tmp_path)


def test_calibrate(deployment: Deployment) -> None:
    journeys.calibrate(deployment)


def test_one_line_errors(deployment: Deployment, catalogue: Catalogue) -> None:
    journeys.one_line_errors(deployment, catalogue)


def test_reconcile(deployment: Deployment, catalogue: Catalogue) -> None:
    journeys.reconcile(deployment, catalogue)


def test_reindex(deployment: Deployment, catalogue: Catalogue) -> None:
    journeys.reindex(deployment, catalogue)
