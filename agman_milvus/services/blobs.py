"""Content-addressed blob directory: image bytes stored under their SHA-256.

Layout: ``root/ab/cd/<sha256 hex>`` (two levels of fan-out keep directories small). Writes go
to a temporary file in the target directory and are moved into place with ``os.replace``, so
a reader sees either nothing or the whole blob, never a partial file; writing the same bytes
twice is a no-op. A blob is addressed in URIs as ``blob://<sha256 hex>``.

Ids are validated (exactly 64 lower-case hex digits) before any path is built, so no id can
reach outside ``root``. Temporary files left by a crash are named ``.tmp-*`` and ignored by
:meth:`BlobStore.iter_ids`.

Blobs are private to the service user: files are written 0600 and the folders created 0700.
:meth:`BlobStore.sweep_orphans` removes blobs (and stale temporary files) that no catalog row
references; ``agman reconcile`` runs it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from agman_milvus.core.errors import AgmanError

__all__ = [
    "BLOB_SCHEME",
    "BlobCorruptError",
    "BlobError",
    "BlobNotFoundError",
    "BlobStore",
    "InvalidBlobIdError",
    "is_blob_uri",
    "parse_blob_uri",
]

logger = logging.getLogger(__name__)

BLOB_SCHEME = "blob://"
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_TMP_PREFIX = ".tmp-"
_FILE_MODE = 0o600
_DIR_MODE = 0o700


class BlobError(AgmanError):
    """Base class of blob store errors."""


class InvalidBlobIdError(BlobError, ValueError):
    """A string that is not a blob id (64 lower-case hex digits) or not a blob:// URI."""


class BlobNotFoundError(BlobError, LookupError):
    """No blob with that id in the store."""


class BlobCorruptError(BlobError):
    """A stored blob's bytes no longer hash to its id."""


def _check_id(sha: str) -> str:
    if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
        shown = repr(sha) if len(repr(sha)) <= 80 else repr(sha)[:77] + "..."
        raise InvalidBlobIdError(
            f"invalid blob id {shown}: expected a SHA-256 as 64 lower-case hex digits"
        )
    return sha


def is_blob_uri(value: object) -> bool:
    """True when ``value`` is a string starting with ``blob://``."""
    return isinstance(value, str) and value.startswith(BLOB_SCHEME)


def parse_blob_uri(uri: str) -> str:
    """``blob://<sha>`` -> ``<sha>`` (validated)."""
    if not is_blob_uri(uri):
        raise InvalidBlobIdError(f"not a blob URI: {uri!r} (expected blob://<sha256 hex>)")
    return _check_id(uri[len(BLOB_SCHEME):])


class BlobStore:
    """A directory of immutable blobs addressed by the SHA-256 of their bytes."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"BlobStore({str(self.root)!r})"

    # -- addressing ---------------------------------------------------------------------------

    @staticmethod
    def sha256(data: bytes | bytearray | memoryview) -> str:
        """The id ``data`` would be stored under."""
        return hashlib.sha256(data).hexdigest()

    def path(self, sha: str) -> Path:
        """Where the blob ``sha`` lives (whether or not it exists)."""
        _check_id(sha)
        return self.root / sha[:2] / sha[2:4] / sha

    @staticmethod
    def uri(sha: str) -> str:
        """``blob://<sha>`` for a blob id."""
        return BLOB_SCHEME + _check_id(sha)

    # -- reading and writing ------------------------------------------------------------------

    def put(self, data: bytes | bytearray | memoryview) -> str:
        """Store ``data`` and return its SHA-256 hex id. Idempotent and atomic."""
        return self.put_new(data)[0]

    def put_new(self, data: bytes | bytearray | memoryview) -> tuple[str, bool]:
        """Like :meth:`put`, and say whether the blob was written now (False: it was there)."""
        data = bytes(data)
        sha = self.sha256(data)
        target = self.path(sha)
        try:
            if target.stat().st_size == len(data):
                return sha, False
            logger.warning("blob %s has the wrong size on disk; rewriting it", sha)
        except FileNotFoundError:
            pass
        self._make_dirs(target.parent)
        fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=target.parent)  # 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp_name, _FILE_MODE)
            os.replace(tmp_name, target)
        except BaseException:
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
            raise
        _fsync_dir(target.parent)
        logger.debug("stored blob %s (%d bytes)", sha, len(data))
        return sha, True

    def _make_dirs(self, directory: Path) -> None:
        """Create ``directory`` and its parents up to and including ``root``, each 0700."""
        missing = []
        for folder in (directory, directory.parent, self.root):
            if folder.is_dir():
                break
            missing.append(folder)
        directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        for folder in missing:  # mkdir's mode is masked by the umask; parents get the default
            os.chmod(folder, _DIR_MODE)

    def get(self, sha: str, *, verify: bool = False) -> bytes:
        """The bytes of blob ``sha``; ``verify=True`` re-hashes them (BlobCorruptError)."""
        path = self.path(sha)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobNotFoundError(f"no blob {sha} in {self.root}") from None
        if verify and self.sha256(data) != sha:
            raise BlobCorruptError(
                f"blob {sha} in {self.root} is corrupt: its bytes hash differently"
            )
        return data

    def exists(self, sha: str) -> bool:
        """True when blob ``sha`` is stored."""
        return self.path(sha).is_file()

    def delete(self, sha: str) -> bool:
        """Remove blob ``sha``; False when it was not there. Directories are kept (a
        concurrent :meth:`put` may be about to write into them)."""
        try:
            self.path(sha).unlink()
        except FileNotFoundError:
            return False
        return True

    def open_uri(self, uri: str, *, verify: bool = False) -> bytes:
        """The bytes behind a ``blob://<sha>`` URI."""
        return self.get(parse_blob_uri(uri), verify=verify)

    def iter_ids(self) -> Iterator[str]:
        """Every stored blob id (unordered); temporary files are skipped."""
        if not self.root.is_dir():
            return
        for first in self.root.iterdir():
            if not (first.is_dir() and len(first.name) == 2):
                continue
            for second in first.iterdir():
                if not second.is_dir():
                    continue
                for entry in second.iterdir():
                    name = entry.name
                    if _SHA_RE.fullmatch(name) and name[:4] == first.name + second.name:
                        yield name

    def sweep_orphans(
        self,
        referenced: Callable[[list[str]], Iterable[str]],
        *,
        min_age: float = 3600.0,
        dry_run: bool = False,
        chunk: int = 500,
    ) -> list[str]:
        """Remove blobs no catalog row references; returns their ids.

        ``referenced(ids)`` answers which of ``ids`` some row still names (asked ``chunk`` ids
        at a time). Blobs and ``.tmp-*`` files younger than ``min_age`` seconds are left alone:
        an ingest writes the blob just before its row. ``dry_run`` only lists them.
        """
        cutoff = time.time() - min_age
        removed: list[str] = []
        batch: list[str] = []

        def settle() -> None:
            keep = set(referenced(batch))
            for sha in batch:
                if sha not in keep and (dry_run or self.delete(sha)):
                    removed.append(sha)
            batch.clear()

        for sha in self.iter_ids():
            if _mtime(self.path(sha)) < cutoff:
                batch.append(sha)
                if len(batch) >= chunk:
                    settle()
        if batch:
            settle()
        if not dry_run:
            self._sweep_temp_files(cutoff)
        if removed:
            logger.info("%s %d orphan blobs", "found" if dry_run else "removed", len(removed))
        return removed

    def _sweep_temp_files(self, cutoff: float) -> None:
        """Delete ``.tmp-*`` files a crashed write left behind (older than ``cutoff``)."""
        if not self.root.is_dir():
            return
        for tmp in self.root.glob(f"??/??/{_TMP_PREFIX}*"):
            if _mtime(tmp) < cutoff:
                try:
                    tmp.unlink()
                except FileNotFoundError:
                    pass

    def __contains__(self, sha: object) -> bool:
        return isinstance(sha, str) and bool(_SHA_RE.fullmatch(sha)) and self.exists(sha)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")  # gone meanwhile: never swept


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
