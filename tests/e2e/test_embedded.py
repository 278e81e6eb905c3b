"""The embedded default (Milvus Lite + SQLite, in-process ingest): every step its own process."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import journeys
from tests.e2e.conftest import Catalogue, Deployment, base_env

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def deployment(catalogue: Catalogue, workdir: Path) -> Deployment:
    return Deployment("embedded", base_env(workdir / "data", catalogue.checkpoint), cwd=workdir,
                      asynchronous=False)


def test_database_and_models(deployment: Deployment) -> None:
    journeys.database_commands(deployment)


def test_ingest(deployment: Deployment, catalogue: Catalogue) -> None:
    journeys.ingest(deployment, catalogue)


def test_search(deployment: Deployment, catalogue: Catalogue, tmp_path: Path) -> None:
    journeys.search(deployment, catalogue, tmp_path)


def test_check_copy(deployment: Deployment, catalogue: Catalogue) -> None:
    journeys.check_copy(deployment, catalogue)


def test_python_api(deployment: Deployment, catalogue: Catalogue) -> None:
    journeys.python_api(deployment, catalogue)


def test_screen(deployment: Deployment, catalogue: Catalogue, tmp_path: Path) -> None:
    journeys.screen(deployment, catalogue, tmp_path)


def test_calibrate(deployment: Deployment) -> None:
    journeys.calibrate(deployment)


def test_one_line_errors(deployment: Deployment, catalogue: Catalogue) -> None:
    journeys.one_line_errors(deployment, catalogue)


def test_reconcile(deployment: Deployment, catalogue: Catalogue) -> None:
    journeys.reconcile(deployment, catalogue)


def test_reindex(deployment: Deployment, catalogue: Catalogue) -> None:
    journeys.reindex(deployment, catalogue)
