"""What every catalog repository shares: its session factory, race-safe inserts, id chunks.

A repository method runs in its own short transaction and returns detached rows (or plain
values), so repositories can be shared by threads. Inserts that may race (two workers
ingesting the same product or image) use ``INSERT ... ON CONFLICT DO NOTHING`` followed by a
select, on PostgreSQL and SQLite alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from agman_milvus.core.errors import AgmanError

__all__ = ["TRANSIENT_SQL_ERRORS", "CatalogError", "Repository", "chunks", "dialect_insert", "utcnow"]

#: Database errors worth retrying: connection lost (server restarting, lock timeouts) or
#: closed under us, connection pool exhausted.
TRANSIENT_SQL_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError, InterfaceError, PoolTimeoutError,
)


class CatalogError(AgmanError, RuntimeError):
    """A catalog operation that cannot proceed (unknown product, database not migrated...)."""


class Repository:
    """Base of the repositories: they open their sessions from one shared factory."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions


def dialect_insert(session: Session, table: Any) -> Any:
    """An ``insert`` for the session's database that supports ``on_conflict_do_nothing``."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise CatalogError(f"unsupported database dialect {name!r}; use PostgreSQL or SQLite")


def chunks(items: Sequence[int], size: int = 1000) -> Iterator[Sequence[int]]:
    """``items`` in slices of at most ``size`` (keeps ``IN (...)`` lists bounded)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def utcnow() -> datetime:
    return datetime.now(UTC)
