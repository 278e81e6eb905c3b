"""Fixtures for the storage integration tests: real SQLite/PostgreSQL, Milvus Lite, Milvus server.

* ``database_url``: parametrized over SQLite (a file in tmp_path) and PostgreSQL (a throwaway
  database on 127.0.0.1:5432, created per session, emptied per test; skipped when PostgreSQL
  is unreachable).
* ``milvus_client``: parametrized over Milvus Lite (a directory under the session tmp dir) and a
  real ``milvus==2.3.5`` server, which only runs under ``tests/server_stack_tier.sh``
  (``AGMAN_TEST_MILVUS_SERVER=1`` inside a loopback-only network namespace).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import listening

PG_ADMIN_URL = os.environ.get("AGMAN_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
SERVER_ENV = "AGMAN_TEST_MILVUS_SERVER"


# -- SQL -------------------------------------------------------------------------------------
def _pg_available() -> bool:
    """False when no PostgreSQL listens (skip); True when it answers; a server that is up but
    refuses us raises (the run fails: a misconfigured service must not look like a skip)."""
    if not listening(PG_ADMIN_URL, 5432):
        return False
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, connect_timeout=5):
        return True


def _pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql)


def _sqlalchemy_pg_url(db: str) -> str:
    base = PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://", 1)
    return base.rsplit("/", 1)[0] + f"/{db}"


class PostgresDatabases:
    """Creates throwaway PostgreSQL databases and drops them all at the end of the session."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def create(self) -> str:
        name = f"agman_test_{uuid.uuid4().hex[:12]}"
        _pg_admin(f'CREATE DATABASE "{name}"')
        self.names.append(name)
        return _sqlalchemy_pg_url(name)

    def drop_all(self) -> None:
        for name in self.names:
            _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[PostgresDatabases]:
    if os.environ.get(SERVER_ENV) == "1" or not _pg_available():
        pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN_URL}")
    dbs = PostgresDatabases()
    yield dbs
    dbs.drop_all()


@pytest.fixture(scope="session")
def pg_catalog_url(pg_databases: PostgresDatabases) -> str:
    """One migrated PostgreSQL database for the session (emptied by ``database_url``)."""
    from agman_milvus.services.store.migrate import upgrade

    url = pg_databases.create()
    upgrade(url)
    return url


def _truncate_all(url: str) -> None:
    from sqlalchemy import text

    from agman_milvus.services.store.engine import create_catalog_engine
    from agman_milvus.services.store.tables import Base

    engine = create_catalog_engine(url)
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty catalog database: SQLite file or PostgreSQL."""
    if request.param == "sqlite":
        from agman_milvus.services.store.migrate import upgrade

        url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
        upgrade(url)
        return url
    url = request.getfixturevalue("pg_catalog_url")
    _truncate_all(url)
    return url


@pytest.fixture
def catalog(database_url: str) -> Iterator[Catalog]:  # noqa: F821
    from agman_milvus.services.store.catalog import Catalog
    from agman_milvus.services.store.engine import create_catalog_engine

    cat = Catalog(create_catalog_engine(database_url))
    yield cat
    cat.dispose()


@pytest.fixture
def sqlite_catalog(tmp_path: Path) -> Iterator[Catalog]:  # noqa: F821
    from agman_milvus.services.store.catalog import Catalog
    from agman_milvus.services.store.engine import create_catalog_engine
    from agman_milvus.services.store.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    upgrade(url)
    cat = Catalog(create_catalog_engine(url))
    yield cat
    cat.dispose()


# -- Milvus ----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def lite_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusClient]:  # noqa: F821
    if os.environ.get(SERVER_ENV) == "1":
        pytest.skip("Milvus Lite tests run in the default tier")
    from pymilvus import MilvusClient

    client = MilvusClient(str(tmp_path_factory.mktemp("lite") / "milvus.db"))
    yield client
    client.close()


@pytest.fixture(scope="session")
def server_client(milvus_server_uri: str) -> Iterator[MilvusClient]:  # noqa: F821
    from pymilvus import MilvusClient

    client = MilvusClient(uri=milvus_server_uri)
    yield client
    client.close()


@pytest.fixture(params=["lite", pytest.param("server", marks=pytest.mark.milvus_server)])
def milvus_client(request: pytest.FixtureRequest) -> MilvusClient:  # noqa: F821
    return request.getfixturevalue("lite_client" if request.param == "lite" else "server_client")


@pytest.fixture
def collection_prefix(milvus_client: MilvusClient) -> Iterator[str]:  # noqa: F821
    """A unique collection prefix; its collections and aliases are dropped afterwards."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    yield prefix
    for alias in milvus_client.list_aliases().get("aliases", []):
        if alias.startswith(prefix + "_"):
            milvus_client.drop_alias(alias)
    for name in milvus_client.list_collections():
        if name.startswith(prefix + "_"):
            milvus_client.drop_collection(name)
