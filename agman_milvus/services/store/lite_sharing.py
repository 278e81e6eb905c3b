"""Sharing an embedded Milvus Lite directory between the processes of one machine.

Milvus Lite lets one process open its directory (an exclusive lock), and that process serves
it over gRPC on a port of 127.0.0.1: pymilvus' in-process Lite does, and so does ``agman
milvus-serve``. The holder publishes that address beside the directory
(``milvus.db.serving.json``: the URI and its process id); a process that finds the directory
locked reads it and works over that port instead of failing, so ``agman search`` runs in a
second terminal while ``agman ingest`` holds the catalogue (:class:`JoinedLite`: when that
process lets the directory go, the next call follows it). The file is only trusted for a loopback
address of a live process. A process that joined a dedicated server (``agman milvus-serve``)
never opens the directory itself when that server stops: it waits for a server to serve it again
(a worker that took the directory over would keep the restarted server out).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

__all__ = ["JoinedLite", "Serving", "locked", "publish", "served_uri", "serving_file", "withdraw"]

log = logging.getLogger(__name__)

SUFFIX = ".serving.json"
#: The directories whose record this process withdraws when it exits (a forked child inherits
#: the exit handlers; :func:`withdraw` removes only the exiting process's own record).
_withdrawn_at_exit: set[Path] = set()


class Serving(NamedTuple):
    """Who serves a Milvus Lite directory: the loopback URI, the process id, and whether that
    process is a dedicated server (``agman milvus-serve``) rather than an agman process that
    opened the directory for its own work."""

    uri: str
    pid: int
    server: bool = False


def locked(directory: Path) -> bool:
    """True when another process holds Milvus Lite's exclusive lock on ``directory``."""
    import fcntl

    lock = directory / "LOCK"
    if not lock.exists():
        return False
    with open(lock, "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return False


def serving_file(directory: Path) -> Path:
    """Where the holder of the Milvus Lite ``directory`` publishes its address."""
    return directory.with_name(directory.name + SUFFIX)


def publish(directory: Path, uri: str, pid: int | None = None, server: bool = False) -> None:
    """Record that process ``pid`` (default this one) serves ``directory`` at ``uri``, as a
    dedicated server when ``server``. This process's own record is withdrawn when it exits,
    before Milvus Lite stops its server (exit handlers run last-registered first), so a process
    working over the port sees the directory let go rather than a port that stopped answering."""
    pid = os.getpid() if pid is None else pid
    target = serving_file(directory)
    partial = target.with_name(f"{target.name}.{pid}.tmp")
    partial.write_text(json.dumps({"uri": uri, "pid": pid, "server": server}), encoding="utf-8")
    os.replace(partial, target)  # a reader sees the old record or the new one, never half
    if pid == os.getpid() and directory not in _withdrawn_at_exit:
        _withdrawn_at_exit.add(directory)
        atexit.register(withdraw, directory)


def withdraw(directory: Path) -> None:
    """Remove this process's record for ``directory`` (another process's is left alone)."""
    target = serving_file(directory)
    record = _read(target)
    if record is not None and record.pid == os.getpid():
        target.unlink(missing_ok=True)


def served_uri(directory: Path) -> Serving | None:
    """Who serves ``directory`` (another live process), or None when none has published it."""
    record = _read(serving_file(directory))
    if record is None or record.pid == os.getpid() or not _alive(record.pid):
        return None
    return record


def _read(path: Path) -> Serving | None:
    """A well-formed record (``http://127.0.0.1:<port>`` and a process id), or None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        uri, pid, server = str(data["uri"]), int(data["pid"]), bool(data.get("server", False))
        parts = urlsplit(uri)
        if parts.scheme != "http" or parts.hostname != "127.0.0.1" or not parts.port:
            raise ValueError(f"not a loopback address: {uri!r}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None
    return Serving(uri, pid, server)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


#: pymilvus' loggers that report a failed call (with its traceback) before it is raised.
PYMILVUS_LOGGERS = ("pymilvus.decorators", "pymilvus.client.connection_manager")
#: ``127.0.0.1:<port>`` of each process a :class:`JoinedLite` worked over and then left.
_left: set[str] = set()
_joined: weakref.WeakSet[JoinedLite] = weakref.WeakSet()
#: Per thread, what :func:`failures_handled` marks: a pattern for each block the thread is in
#: (None: every failure).
_handled = threading.local()


@contextlib.contextmanager
def failures_handled(matching: re.Pattern[str] | None = None) -> Iterator[None]:
    """Marks this thread's Milvus calls inside as ones whose failure the caller handles (it makes
    the call again): pymilvus' report of such a failure (an error with its traceback, logged
    before the error is raised) is dropped, every one or those whose text ``matching`` finds, so
    a terminal shows no traceback of a call that went on to succeed (:class:`_HandledFilter`)."""
    outer = getattr(_handled, "patterns", ())
    _handled.patterns = (*outer, matching)
    try:
        yield
    finally:
        _handled.patterns = outer


class _HandledFilter(logging.Filter):
    """Drops pymilvus' reports of failures that are handled: those of calls inside
    :func:`failures_handled`, and those of calls that failed because the process a
    :class:`JoinedLite` worked over let the directory go (while it does, or naming its port
    after): the call is made again on the new connection, so its traceback would only alarm (a
    second ingest's terminal showed eight)."""

    def filter(self, record: logging.LogRecord) -> bool:
        patterns = getattr(_handled, "patterns", ())
        if not patterns and not _joined and not _left:
            return True
        text = _report_text(record)
        if any(pattern is None or pattern.search(text) for pattern in patterns):
            return False
        if any(joined._gone() for joined in list(_joined)):
            return False
        return not any(address in text for address in _left)


def _report_text(record: logging.LogRecord) -> str:
    """A pymilvus report's message with its exception's."""
    return record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")


for _name in PYMILVUS_LOGGERS:  # once, as this module is imported: it passes every report unmarked
    logging.getLogger(_name).addFilter(_HandledFilter())


#: What :class:`JoinedLite` connects to: a client, and who serves the directory it joined (None
#: when this process opened the directory itself).
Connection = tuple[Any, Serving | None]


class JoinedLite:
    """A Milvus client of an embedded Milvus Lite directory that another process serves, over
    the port that process published. It forwards every call to that client. Once that process
    no longer serves the directory (it ended, or closed it: its record is gone), the next call
    is made on a new connection (``connect``, given who served it before: this process opening
    the directory, or the port of whichever process holds it now; after a dedicated server, only
    the port of one that serves it again), so a notebook that joined an ingest's catalogue goes
    on working when the ingest ends. The record is read before each call (a small file), and
    again when a call fails."""

    def __init__(self, directory: Path, connection: Connection,
                 connect: Callable[[Serving | None], Connection]) -> None:
        self._directory = directory
        self._client, self.serving = connection
        self._connect = connect
        self._lock = threading.Lock()
        self._generation = 0
        _joined.add(self)

    def generation(self) -> int:
        """How many times it has connected again (each time to a Milvus Lite with no collection
        loaded yet), connecting again first if the serving process has let the directory go."""
        self._follow_if_gone()
        return self._generation

    @property
    def served(self) -> str | None:
        """The URI it works over (None once this process opened the directory itself)."""
        return self.serving.uri if self.serving is not None else None

    def _gone(self) -> bool:
        """Whether the process it joined no longer serves the directory (it ended, or closed it
        and withdrew its record)."""
        return self.serving is not None and served_uri(self._directory) != self.serving

    def _follow_if_gone(self) -> None:
        if self._gone():
            self._follow(self._client)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            self._follow_if_gone()  # it ended between calls
            client = self._client
            try:
                return getattr(client, name)(*args, **kwargs)
            except Exception:
                if not self._gone():
                    raise
                self._follow(client)  # it let the directory go during the call
            with failures_handled():  # its error reaches the caller, who handles it (loads)
                return getattr(self._client, name)(*args, **kwargs)

        return call

    def _follow(self, failed: Any) -> None:
        """Connect again after the process that served the directory let it go (once, however
        many threads saw ``failed`` fail)."""
        with self._lock:
            if self._client is not failed:
                return
            left = self.serving
            if left is not None:  # later reports naming its port are of calls made again
                log.info("process %d no longer serves the embedded Milvus Lite %s at %s: connecting again",
                         left.pid, self._directory, left.uri)
                _left.add(left.uri.removeprefix("http://"))
            try:
                failed.close()
            except Exception as exc:  # noqa: BLE001 - the old channel is gone either way
                log.debug("closing the old connection: %s", exc)
            self._client, self.serving = self._connect(left)
            self._generation += 1
