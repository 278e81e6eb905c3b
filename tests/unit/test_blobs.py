"""agman_milvus.services.blobs: content addressing, idempotency, atomic writes, traversal refusal."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agman_milvus.services.blobs import (
    BlobCorruptError,
    BlobNotFoundError,
    BlobStore,
    InvalidBlobIdError,
    is_blob_uri,
    parse_blob_uri,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".tmp-*")] if root.exists() else []


def test_put_get_layout_and_uri(store: BlobStore) -> None:
    data = b"\x89PNG pretend image bytes"
    sha = store.put(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.path(sha) == store.root / sha[:2] / sha[2:4] / sha
    assert store.path(sha).read_bytes() == data == store.get(sha) == store.get(sha, verify=True)
    assert store.exists(sha) and sha in store
    assert stat.S_IMODE(store.path(sha).stat().st_mode) == 0o600  # private to the service user
    for folder in (store.root, store.path(sha).parent, store.path(sha).parent.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    uri = store.uri(sha)
    assert uri == f"blob://{sha}" and is_blob_uri(uri) and parse_blob_uri(uri) == sha
    assert store.open_uri(uri) == data
    assert store.put(bytearray(data)) == store.put(memoryview(data)) == sha
    assert list(store.iter_ids()) == [sha]


def test_put_is_idempotent_and_does_not_rewrite(store: BlobStore) -> None:
    sha = store.put(b"same bytes")
    before = store.path(sha).stat()
    assert store.put(b"same bytes") == sha
    after = store.path(sha).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in store.root.rglob("*") if p.is_file()) == [sha]


def test_put_repairs_a_torn_file(store: BlobStore) -> None:
    data = os.urandom(10_000)
    sha = BlobStore.sha256(data)
    store.path(sha).parent.mkdir(parents=True)
    store.path(sha).write_bytes(data[:1234])  # e.g. left by a non-atomic writer
    with pytest.raises(BlobCorruptError):
        store.get(sha, verify=True)
    assert store.put(data) == sha
    assert store.get(sha, verify=True) == data


def test_delete_and_missing(store: BlobStore) -> None:
    sha = store.put(b"to be deleted")
    assert store.delete(sha) is True
    assert store.delete(sha) is False
    assert not store.exists(sha) and sha not in store
    with pytest.raises(BlobNotFoundError) as info:
        store.get(sha)
    assert isinstance(info.value, LookupError) and sha in str(info.value)
    with pytest.raises(BlobNotFoundError):
        store.open_uri(BlobStore.uri(sha))
    assert store.put(b"to be deleted") == sha  # the kept directories are reused


BAD_IDS = [
    "../../etc/passwd",
    "ab/../../../../etc/passwd",
    "/etc/passwd",
    "",
    "a" * 63,
    "a" * 65,
    "A" * 64,  # ids are canonical lower-case
    "g" * 64,
    "a" * 64 + "/x",
    "a" * 62 + "..",
    "..",
]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_invalid_ids_are_refused_everywhere(store: BlobStore, bad: str) -> None:
    for call in (store.path, store.get, store.exists, store.delete, BlobStore.uri):
        with pytest.raises(InvalidBlobIdError) as info:
            call(bad)
        assert isinstance(info.value, ValueError) and "64 lower-case hex" in str(info.value)
    with pytest.raises(InvalidBlobIdError):
        store.open_uri("blob://" + bad)
    assert bad not in store
    assert not store.root.exists()  # nothing was created anywhere


def test_non_string_ids_and_bad_uris(store: BlobStore) -> None:
    with pytest.raises(InvalidBlobIdError):
        store.path(None)  # type: ignore[arg-type]
    for uri in ("file:///etc/passwd", "blob:/" + "a" * 64, "a" * 64):
        with pytest.raises(InvalidBlobIdError):
            store.open_uri(uri)
    assert 123 not in store


def test_readers_never_see_a_partial_blob(store: BlobStore) -> None:
    """A reader polling the final paths while a writer stores big blobs sees all or nothing."""
    blobs = [bytes([i]) * (4 * 1024 * 1024) + os.urandom(64) for i in range(6)]
    shas = [BlobStore.sha256(b) for b in blobs]
    done = threading.Event()
    seen: set[str] = set()
    problems: list[str] = []

    def reader() -> None:
        while True:
            finished = done.is_set()  # read before scanning, so a late put is not missed
            for sha in shas:
                path = store.path(sha)
                if sha in seen or not path.exists():
                    continue
                data = path.read_bytes()
                if hashlib.sha256(data).hexdigest() != sha:
                    problems.append(f"{sha[:12]}: saw {len(data):,} bytes")
                seen.add(sha)
            if finished:
                if len(seen) < len(shas):
                    problems.append("writer finished but blobs are missing")
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for data in blobs:
            store.put(data)
    finally:
        done.set()
        thread.join(timeout=30)
    assert problems == []
    assert seen == set(shas)
    assert _tmp_files(store.root) == []


def test_concurrent_puts_of_the_same_bytes(store: BlobStore) -> None:
    data = os.urandom(256 * 1024)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(store.put(data))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) == {BlobStore.sha256(data)}
    assert store.get(results[0], verify=True) == data
    assert _tmp_files(store.root) == []


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    """A write that really fails (file size limit, EFBIG) leaves neither blob nor temp file."""
    root = tmp_path / "blobs"
    script = (
        "import resource, signal, sys\n"
        "from agman_milvus.services.blobs import BlobStore\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "store = BlobStore(sys.argv[1])\n"
        "try:\n"
        "    store.put(b'x' * 1_000_000)\n"
        "except OSError as exc:\n"
        "    print('failed', exc.errno)\n"
        "else:\n"
        "    print('stored')\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True,
                         text=True, timeout=60, check=True).stdout.strip()
    assert out.startswith("failed")
    store = BlobStore(root)
    sha = BlobStore.sha256(b"x" * 1_000_000)
    assert not store.exists(sha)
    assert _tmp_files(root) == []
    assert list(store.iter_ids()) == []


def test_iter_ids_skips_temp_and_stray_files(store: BlobStore) -> None:
    shas = {store.put(f"blob {i}".encode()) for i in range(5)}
    some = next(iter(shas))
    (store.path(some).parent / ".tmp-leftover").write_bytes(b"partial")
    (store.root / "README").write_text("not a blob")
    assert set(store.iter_ids()) == shas
    assert set(BlobStore(store.root / "nowhere").iter_ids()) == set()


def test_sweep_orphans_removes_unreferenced_old_blobs_only(store: BlobStore) -> None:
    kept, orphan, young = (store.put(f"blob {name}".encode()) for name in ("kept", "orphan", "young"))
    old = os.stat(store.path(kept)).st_mtime - 7200
    for sha in (kept, orphan):
        os.utime(store.path(sha), (old, old))
    stale_tmp = store.path(kept).parent / ".tmp-crashed"
    stale_tmp.write_bytes(b"partial")
    os.utime(stale_tmp, (old, old))
    asked: list[list[str]] = []

    def referenced(ids: list[str]) -> set[str]:
        asked.append(list(ids))
        return {kept} & set(ids)

    assert store.sweep_orphans(referenced, dry_run=True) == [orphan]
    assert store.exists(orphan) and stale_tmp.exists()
    assert store.sweep_orphans(referenced, min_age=3600) == [orphan]
    assert not store.exists(orphan) and store.exists(kept) and store.exists(young)  # young: in flight
    assert not stale_tmp.exists()
    assert all(young not in ids for ids in asked)
    assert store.sweep_orphans(referenced, min_age=0) == [young]
    assert BlobStore(store.root / "nowhere").sweep_orphans(referenced) == []
