"""Suite-wide fixtures: where the shared real data lives, and skipping when it is absent."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # make ``tests.support`` importable however pytest runs
    sys.path.insert(0, str(_REPO_ROOT))

from tests.support import find_shared_dir  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``realdata`` when the shared data directory is absent."""
    if find_shared_dir() is not None:
        return
    skip = pytest.mark.skip(reason="needs ../shared (or AGMAN_SHARED_DIR): not on this machine")
    for item in items:
        if item.get_closest_marker("realdata"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared real-data directory (``../shared`` or ``AGMAN_SHARED_DIR``); skips if absent."""
    path = find_shared_dir()
    if path is None:
        pytest.skip("needs ../shared (or AGMAN_SHARED_DIR): not on this machine")
    return path

