"""Suite-wide fixtures: the shared real data (skipped when absent) and the real Milvus server
(started only in the loopback-only server-stack tier, ``tests/server_stack_tier.sh``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
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


SERVER_ENV = "AGMAN_TEST_MILVUS_SERVER"
SERVER_PORT = 19530


def _only_loopback() -> bool:
    """True when this process's network namespace has no interface but ``lo``."""
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    return {line.split(":", 1)[0].strip() for line in lines} <= {"lo"}


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"milvus-server exited early with code {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"milvus-server did not open port {port} within {timeout:.0f} s")


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


class MilvusServer:
    """The tier's ``milvus-server`` process (a wrapper that runs the Milvus binary as its child);
    :meth:`freeze` makes it stop answering for a while (the fault tier)."""

    def __init__(self, exe: Path, data: Path) -> None:
        self.exe, self.data = exe, data
        self.proc: subprocess.Popen[bytes] | None = None
        self.uri = f"http://127.0.0.1:{SERVER_PORT}"

    def start(self) -> None:
        with open(self.data / "server.log", "ab") as log:
            self.proc = subprocess.Popen([str(self.exe), "--data", str(self.data)], stdout=log,
                                         stderr=subprocess.STDOUT)
        try:
            _wait_for_port(SERVER_PORT, self.proc, timeout=120)
        except (RuntimeError, TimeoutError) as exc:
            tail = (self.data / "server.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{exc}; the end of its log:\n{tail}") from exc

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        children = _children(proc.pid)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for child in children:  # SIGINT normally takes the child down; never leave an orphan
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass
        # The Milvus binary may take a while to shut down: wait for it, kill it after 60 s.
        deadline = time.monotonic() + 60
        while any(_running(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        for child in children:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc = None

    def freeze(self, seconds: float) -> None:
        """SIGSTOP the server (wrapper and binary) for ``seconds``, then SIGCONT: Milvus stops
        answering without losing its state. (Restarting milvus-lite 2.3.5 with data did not come
        back within 6 minutes here, so the fault tier freezes it instead.)"""
        assert self.proc is not None
        pids = [self.proc.pid, *_children(self.proc.pid)]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusServer]:
    """A real Milvus 2.3.5 standalone, started only in the loopback-only server tier."""
    if os.environ.get(SERVER_ENV) != "1":
        pytest.skip(f"set {SERVER_ENV}=1 and run tests/server_stack_tier.sh for the server tier")
    if not _only_loopback():
        pytest.fail("refusing to start milvus-server: it binds all interfaces and this network "
                    "namespace has more than loopback; run tests/server_stack_tier.sh")
    exe = Path(sys.executable).with_name("milvus-server")
    if not exe.exists():
        pytest.skip("milvus-server is not installed (pip install 'milvus==2.3.5')")
    data = Path(os.environ.get("AGMAN_TEST_MILVUS_DATA") or tmp_path_factory.mktemp("milvus-server"))
    data.mkdir(parents=True, exist_ok=True)
    server = MilvusServer(exe, data)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def milvus_server_uri(milvus_server: MilvusServer) -> str:
    return milvus_server.uri
