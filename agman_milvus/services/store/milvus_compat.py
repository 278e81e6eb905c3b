"""Every difference between Milvus Lite and a Milvus server that agman relies on, in one place.

Measured with milvus-lite 3.2.2 and a milvus 2.3.5 server (``tests/integration/test_vectors.py``
checks each point on both):

* milvus-lite 3.2.2 silently ignores index build params passed flat (``params={"M": 16}``);
  only the nested form ``params={"params": {...}}`` reaches it. A 2.3.5 server needs them flat
  (HNSW without ``efConstruction`` is rejected there).
* Lite searches rows that were not flushed by a slow Python path, so writers flush after
  every batch there. On a server a flush is a costly seal (seconds) that visibility does not
  need, so it is skipped.
* Lite has no binary vectors and no HAMMING metric, which is why perceptual hashes live in
  SQL, not in Milvus.
* Grouping search (``group_by_field``) exists in Lite and in servers from 2.4 on; older
  servers need over-fetching plus de-duplication (done in :mod:`agman_milvus.services.store.vectors`).
* Lite does not implement ``filter_params`` (expression templates); both accept escaped string
  literals, see :mod:`agman_milvus.services.store.filters`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pymilvus import MilvusClient

log = logging.getLogger(__name__)

HNSW_BUILD = {"M": 16, "efConstruction": 200}
LITE_VERSION_PREFIX = "milvus_lite"


@dataclass(frozen=True)
class Deployment:
    """What kind of Milvus a client talks to, and what it supports."""

    version: str
    lite: bool
    grouping_search: bool

    @property
    def binary_vectors(self) -> bool:
        """Lite rejects BINARY_VECTOR fields, so 64-bit perceptual hashes are kept in SQL."""
        return not self.lite

    def index_params(self, client: MilvusClient, field: str, metric: str = "COSINE",
                     hnsw: Mapping[str, int] = HNSW_BUILD) -> Any:
        """HNSW index params (``hnsw``: M and efConstruction) for ``field`` in the form this
        deployment honours."""
        params = client.prepare_index_params()
        build: dict[str, Any] = {"params": dict(hnsw)} if self.lite else dict(hnsw)
        params.add_index(field_name=field, index_type="HNSW", metric_type=metric, params=build)
        return params

    def search_params(self, top_k: int, metric: str = "COSINE", ef: int = 64) -> dict[str, Any]:
        """HNSW search params: the graph walk keeps ``ef`` candidates (at least ``top_k``)."""
        return {"metric_type": metric, "params": {"ef": max(ef, top_k)}}

    def after_write(self, client: MilvusClient, collection: str) -> None:
        """Make fresh writes cheap to search: flush on Lite, nothing on a server."""
        if self.lite:
            client.flush(collection)


def _server_supports_grouping(version: str) -> bool:
    match = re.search(r"(\d+)\.(\d+)", version)
    if not match:
        return False
    return (int(match.group(1)), int(match.group(2))) >= (2, 4)


class _LiteUnimplementedFilter(logging.Filter):
    """Drops the in-process Lite server's "Method not implemented" tracebacks: pymilvus asks it
    for a timestamp (AllocTimestamp) after each index creation, Lite does not implement it and
    the client carries on, so a fresh deployment would otherwise log one traceback per index."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, NotImplementedError)


class _LiteLockFilter(logging.Filter):
    """Drops Milvus Lite's traceback when its data directory is held by another process: the
    store raises :class:`~agman_milvus.services.store.vectors.MilvusLiteLockedError` saying how
    to share it, so the traceback would only bury that message."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return type(error).__name__ != "DataDirLockedError"


def quiet_lite_lock_errors() -> None:
    """Install :class:`_LiteLockFilter` on Milvus Lite's server manager logger (idempotent)."""
    lite_log = logging.getLogger("milvus_lite.server_manager")
    if not any(isinstance(f, _LiteLockFilter) for f in lite_log.filters):
        lite_log.addFilter(_LiteLockFilter())


def quiet_lite_server_logs() -> None:
    """Install :class:`_LiteUnimplementedFilter` on gRPC's server logger (idempotent)."""
    grpc_log = logging.getLogger("grpc._server")
    if not any(isinstance(f, _LiteUnimplementedFilter) for f in grpc_log.filters):
        grpc_log.addFilter(_LiteUnimplementedFilter())


def probe(client: MilvusClient) -> Deployment:
    """Ask the server what it is; decides index form, flushing and grouping search."""
    version = str(client.get_server_version())
    lite = version.startswith(LITE_VERSION_PREFIX)
    if lite:
        quiet_lite_server_logs()
    deployment = Deployment(
        version=version, lite=lite, grouping_search=lite or _server_supports_grouping(version)
    )
    log.debug("milvus deployment: %s", deployment)
    return deployment
