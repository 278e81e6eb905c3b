"""The record by which a process that holds an embedded Milvus Lite says where it serves it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agman_milvus.services.store import lite_sharing


@pytest.fixture()
def live_pid() -> int:
    """A live process other than this one (this test's parent)."""
    return os.getppid()


def test_a_live_holders_record_is_followed_and_withdrawn_by_it_alone(tmp_path: Path, live_pid: int) -> None:
    directory = tmp_path / "milvus.db"
    assert lite_sharing.served_uri(directory) is None
    lite_sharing.publish(directory, "http://127.0.0.1:41000", pid=live_pid)
    assert lite_sharing.served_uri(directory) == ("http://127.0.0.1:41000", live_pid, False)  # not a server
    lite_sharing.withdraw(directory)  # not this process's record: it stays
    assert lite_sharing.serving_file(directory).exists()
    lite_sharing.publish(directory, "http://127.0.0.1:41001")
    assert lite_sharing.served_uri(directory) is None  # this process's own record is not a holder
    lite_sharing.withdraw(directory)
    assert not lite_sharing.serving_file(directory).exists()
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("record", [
    {"uri": "http://10.0.0.5:19530"},  # not this machine's loopback
    {"uri": "https://127.0.0.1:19530"},
    {"uri": "http://127.0.0.1"},  # no port
    {"uri": "http://127.0.0.1:port"},
    {"pid": "not a number"},
    "not a record",
])
def test_a_record_that_is_not_a_loopback_address_of_a_process_is_ignored(
        tmp_path: Path, live_pid: int, record: object) -> None:
    directory = tmp_path / "milvus.db"
    text = json.dumps({"uri": "http://127.0.0.1:41000", "pid": live_pid, **record}) if isinstance(
        record, dict) else record
    lite_sharing.serving_file(directory).write_text(text, encoding="utf-8")
    assert lite_sharing.served_uri(directory) is None


def test_a_record_of_a_process_that_ended_is_ignored(tmp_path: Path) -> None:
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    lite_sharing.publish(tmp_path / "milvus.db", "http://127.0.0.1:41000", pid=ended.pid)
    assert lite_sharing.served_uri(tmp_path / "milvus.db") is None


def test_a_process_withdraws_its_record_when_it_exits(tmp_path: Path) -> None:
    """A holder that ends without closing (a screening child, a notebook's kernel) withdraws
    its record before Milvus Lite stops serving, so the processes working over its port follow
    the directory instead of failing on a port that stopped answering."""
    directory = tmp_path / "milvus.db"
    subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        from pathlib import Path
        from agman_milvus.services.store import lite_sharing
        lite_sharing.publish(Path({str(directory)!r}), "http://127.0.0.1:41000")
        assert lite_sharing.serving_file(Path({str(directory)!r})).exists()
    """)], check=True)
    assert not lite_sharing.serving_file(directory).exists()


def test_pymilvus_reports_are_dropped_once_the_joined_process_let_the_directory_go(
        tmp_path: Path, live_pid: int) -> None:
    """The call that failed is made again on a new connection: pymilvus' traceback of it is not
    shown, while the joined process serves the directory its reports are."""
    import logging

    directory = tmp_path / "milvus.db"
    lite_sharing.publish(directory, "http://127.0.0.1:41000", pid=live_pid)
    serving = lite_sharing.Serving("http://127.0.0.1:41000", live_pid)
    joined = lite_sharing.JoinedLite(directory, (object(), serving), connect=lambda left: (object(), None))
    logger = logging.getLogger("pymilvus.decorators")
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 1,
                               "RPC error: [insert_rows], WAL already closed", (), None)
    assert logger.filter(record)
    lite_sharing.withdraw(directory)  # not this process's record: still there
    lite_sharing.serving_file(directory).unlink()  # the joined process closed the directory
    assert not logger.filter(record)
    joined.generation()  # the next call connects again: this process holds it now
    assert logger.filter(record)
    failed = logger.makeRecord(logger.name, logging.ERROR, __file__, 1,
                               "Fail connecting to server on 127.0.0.1:41000", (), None)
    assert not logger.filter(failed)  # a report naming the port it left, from another thread


def test_a_call_made_again_on_the_new_connection_is_not_reported_twice(
        tmp_path: Path, live_pid: int, caplog: pytest.LogCaptureFixture) -> None:
    """The holder lets the directory go during a call: the call is made again on the new
    connection, where pymilvus' report of its failure (a collection not loaded there yet) is
    dropped and the error reaches the caller, which loads it and retries."""
    import logging

    directory = tmp_path / "milvus.db"
    logger = logging.getLogger("pymilvus.decorators")

    class Left:
        def search(self) -> None:
            lite_sharing.serving_file(directory).unlink()  # the holder lets the directory go
            raise ConnectionError("Fail connecting to server on 127.0.0.1:41000")

        def close(self) -> None:
            pass

    class New(Left):
        def search(self) -> None:
            logger.error("RPC error: [search], collection is in state 'released'")
            raise RuntimeError("collection is in state 'released'")

    lite_sharing.publish(directory, "http://127.0.0.1:41000", pid=live_pid)
    serving = lite_sharing.Serving("http://127.0.0.1:41000", live_pid)
    joined = lite_sharing.JoinedLite(directory, (Left(), serving), connect=lambda left: (New(), None))
    with caplog.at_level(logging.ERROR, logger="pymilvus"), pytest.raises(RuntimeError, match="released"):
        joined.search()
    assert joined.generation() == 1 and not caplog.records
    with caplog.at_level(logging.ERROR, logger="pymilvus"), pytest.raises(RuntimeError):
        joined.search()  # a call of its own on the new connection is reported as ever
    assert [r.getMessage() for r in caplog.records] == [
        "RPC error: [search], collection is in state 'released'"]
