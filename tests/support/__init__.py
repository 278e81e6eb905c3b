"""Helpers shared by the test suites (importable as ``tests.support``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def find_shared_dir() -> Path | None:
    """The read-only ``shared/`` data directory, or None when this machine has none.

    ``AGMAN_SHARED_DIR`` wins; otherwise ``shared/`` beside the repository (CI clones the
    repository with ``shared/`` next to it).
    """
    configured = os.environ.get("AGMAN_SHARED_DIR")
    candidate = Path(configured) if configured else REPO_ROOT.parent / "shared"
    return candidate if candidate.is_dir() else None


def require_shared(*parts: str) -> Path:
    """A path inside the shared directory; skips the calling test when it is missing."""
    base = find_shared_dir()
    path = base.joinpath(*parts) if base is not None else None
    if path is None or not path.exists():
        pytest.skip(f"needs shared/{'/'.join(parts)}: not on this machine")
    return path
