"""Real processes for the worker tests: a shared Milvus Lite server and Celery workers.

Everything binds 127.0.0.1 and is stopped by PID. Each worker runs ``agman worker`` (the real
command) with its own environment, so it reads its settings exactly as in production.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support import listening

REDIS_URL = os.environ.get("AGMAN_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_available(url: str = REDIS_URL) -> bool:
    """False when no Redis listens (skip); True when it answers PING; a Redis that is up but
    refuses us raises (the run fails instead of skipping)."""
    if not listening(url, 6379):
        return False
    import redis

    return bool(redis.Redis.from_url(url, socket_connect_timeout=5).ping())


def delete_redis_keys(prefix: str, url: str = REDIS_URL) -> None:
    """Remove every key a test's Celery apps made (they all start with ``prefix``)."""
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)


def wait_until(predicate: Callable[[], bool], timeout: float, poll: float = 0.1, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(poll)


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@contextmanager
def milvus_lite_server(data_dir: Path, timeout: float = 60.0) -> Iterator[str]:
    """``milvus-lite server`` on a free loopback port; yields its URI."""
    port = free_port()
    log = open(data_dir.parent / f"milvus-lite-{port}.log", "ab")
    proc = subprocess.Popen(
        [str(BIN / "milvus-lite"), "server", "--data-dir", str(data_dir), "--host", "127.0.0.1",
         "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: proc.poll() is not None or _port_open(port), timeout, what="milvus-lite")
        if proc.poll() is not None:
            raise RuntimeError(f"milvus-lite server exited with {proc.returncode}")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class Worker:
    """One ``agman worker`` process with its own environment and log file."""

    def __init__(self, env: dict[str, str], log_path: Path, *, pool: str = "solo",
                 queues: str = "agman.gpu,agman.default", concurrency: int = 1) -> None:
        self.env = env
        self.log_path = log_path
        self.argv = [str(BIN / "agman"), "worker", "-Q", queues, "-P", pool, "-c", str(concurrency),
                     "-n", f"t{uuid.uuid4().hex[:6]}@%h", "-l", "info", "--no-compile"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> Worker:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            return " ready." in self.log_path.read_text(errors="replace")[offset:]

        wait_until(ready, timeout, poll=0.2, what="the worker to be ready")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no cleanup, no acknowledgement, as when a machine dies."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait()  # type: ignore[union-attr]

    def stop(self, timeout: float = 30.0) -> None:
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        try:
            self.proc.wait(timeout=timeout)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            self.kill()


def tiny_checkpoint(path: Path, image_size: int = 64) -> Path:
    """A real, small AG-MAN model (MobileNetV2 backbone, random init) saved to ``path``."""
    from agman_milvus.core.model import build_model, save_checkpoint
    from agman_milvus.core.schema import AttributeSchema

    schema = AttributeSchema.from_dict({"colour": ["red", "green", "blue"], "sleeve": ["short", "long"]})
    model = build_model("agman", schema=schema, backbone="mobilenet_v2", image_size=image_size)
    save_checkpoint(model, path)
    return path
