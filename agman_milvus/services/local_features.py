"""On-disk cache of catalogue images' local features (SIFT keypoints, grey and colour thumbnails).

Copy verification needs the candidates' keypoints; extracting them costs 6-9 ms for a 224 px
catalogue photo (bench/copydetect.py). They are computed once per image content (keyed by the
image's SHA-256, so a re-ingested or re-indexed image reuses them), stored as
``<root>/<sha[:2]>/<sha>.features`` (:meth:`LocalFeatures.to_bytes`, ~95 KB for a 224 px
catalogue photo, 25 KB of it the colour thumbnail) and kept in a small in-memory LRU (memory
only when ``root`` is None). A copy check reads up to 20 of them: a record is read in one call,
0.06 ms. Features an earlier version stored (a record of another format version, or an ``.npz``
file) are extracted again on first read and replace it: their keypoints came from another
detector setting. Writes go through a temporary file and a rename: a reader sees a whole file or
none.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from agman_milvus.core.copy_features import EarlierFeatures, LocalFeatures, extract

__all__ = ["LocalFeatureCache", "cache_root"]

log = logging.getLogger(__name__)


def cache_root(data_dir: Path) -> Path:
    """Where a deployment's data directory keeps the cache."""
    return Path(data_dir) / "local_features"


class LocalFeatureCache:
    """Local features by image content hash, computed on first use."""

    def __init__(self, root: Path | None, memory_items: int = 256) -> None:
        self.root = Path(root) if root is not None else None
        self._memory: OrderedDict[str, LocalFeatures] = OrderedDict()
        self._limit = memory_items
        self._lock = threading.Lock()

    def path(self, key: str) -> Path | None:
        return self.root / key[:2] / f"{key}.features" if self.root is not None else None

    def get(self, key: str, load: Callable[[], Image.Image]) -> LocalFeatures:
        """The features stored under ``key``, else extracted from ``load()`` and stored."""
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        feats = self._read(key)
        if feats is None:
            feats = extract(load())
            self._write(key, feats)
        feats = dataclasses.replace(feats, work=None)  # the grey work image serves queries only
        with self._lock:
            self._memory[key] = feats
            while len(self._memory) > self._limit:
                self._memory.popitem(last=False)
        return feats

    def _read(self, key: str) -> LocalFeatures | None:
        path = self.path(key)
        if path is None:
            return None
        try:
            return LocalFeatures.from_bytes(bytearray(path.read_bytes()))
        except FileNotFoundError:
            path.with_suffix(".npz").unlink(missing_ok=True)  # an earlier version's file
            return None
        except EarlierFeatures as exc:
            log.debug("%s: %s; recomputing", path, exc)
            return None
        except (OSError, ValueError) as exc:
            log.warning("unreadable local features %s (%s); recomputing", path, exc)
            return None

    def _write(self, key: str, feats: LocalFeatures) -> None:
        path = self.path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(feats.to_bytes())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
