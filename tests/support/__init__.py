"""Helpers shared by the test suites (importable as ``tests.support``)."""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def listening(url: str, default_port: int) -> bool:
    """True when something accepts TCP connections at ``url``'s host and port.

    Tests skip a tier whose service is simply not running here; a service that is up but
    answers wrongly (bad credentials, wrong database...) must fail them instead, so they
    check this first and then connect without catching anything.
    """
    parts = urlsplit(url)
    try:
        socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), timeout=2
        ).close()
    except OSError:
        return False
    return True


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


def noise_jpeg(seed: int, width: int = 48, height: int | None = None, quality: int = 85) -> bytes:
    """A JPEG of random pixels, ``width`` x ``height`` (square by default): one image a seed,
    resembling no other."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    pixels = rng.integers(0, 256, (height or width, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()
