"""Vectors in Milvus: one collection per attribute plus one for copy descriptors.

Layout (hidden behind :class:`VectorStore`):

* physical collections ``{prefix}_{attribute.slug}__{version tag}`` and
  ``{prefix}_copy__{version tag}``: each holds vectors of exactly one model version, so a search
  can never mix versions;
* aliases ``{prefix}_{attribute.slug}`` / ``{prefix}_copy`` point at the active version's
  collections; switching models = fill the new version's collections, then :meth:`activate`;
* primary key ``image_id`` = the SQL image id (``auto_id`` off): re-embedding is an upsert;
* ``{prefix}_keypoints``: the copy check's voting keypoints (:mod:`agman_milvus.core.copy_vote`),
  many rows per image under an automatic key, shared by every model version (SIFT does not
  depend on the model); an image's rows are replaced as a whole.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException
from pymilvus.client.types import LoadState

from agman_milvus.core.config import Settings
from agman_milvus.core.errors import AgmanError
from agman_milvus.core.schema import AttributeSchema
from agman_milvus.services.store import lite_sharing
from agman_milvus.services.store.filters import FilterValue, build_filter
from agman_milvus.services.store.milvus_compat import Deployment, probe, quiet_lite_lock_errors

log = logging.getLogger(__name__)

COPY = "copy"
KEYPOINTS = "keypoints"
KEYPOINT_DIM = 128
#: Most voting keypoints stored per image (the checker stores ``copy_vote.VOTE_KEYPOINTS``).
MAX_KEYPOINTS = 512
#: Rows one keypoint query may return (Milvus' largest query window).
KEYPOINT_QUERY_LIMIT = 16384
#: Rows per insert request of keypoints (an image has up to a few hundred).
KEYPOINT_BATCH = 20_000
#: Query vectors per keypoint search request (a screening batch's queries go together).
KEYPOINT_SEARCH_BATCH = 4096
#: HNSW candidates kept while walking the keypoint graph. Voting sums 150 lookups a query, so a
#: short walk loses nothing: on 1,000 catalogue photos' keypoints and 360 edited copies the
#: original was among the 10 most voted for 87.5% with ef 64, 32 and 16 alike, while the search
#: took 61-71, 49 and 41 ms a query beside a training (idle: 57 -> 46 ms at 64 -> 32;
#: docs/benchmarks.md).
KEYPOINT_EF = 32
#: HNSW build of the keypoint collection (the attribute collections': M 16, efConstruction 200).
#: A graph walked this briefly needs no more: on 1,000 catalogue photos' keypoints and 600 edited
#: queries, efConstruction 64 gave the same votes' candidate recall (0.875) and the same verdicts
#: as 200, and Milvus Lite built the graphs in 3.3 s instead of 31.4 s (paid by the first
#: process that opens the catalogue after an ingest, or in the background beside it).
KEYPOINT_HNSW_BUILD = {"M": 16, "efConstruction": 64}
VECTOR_FIELD = "vector"
META_MAX_LENGTH = 512
VERSION_MAX_LENGTH = 64
_PROPERTY_VERSION = "agman.model_version"
_PROPERTY_ROLE = "agman.role"
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_RESERVED_FIELDS = {"image_id", "product_id", "model_version", VECTOR_FIELD}
MAX_TOP_K = 16384  # Milvus limit on limit (topk)
#: Primary-key window of one :meth:`VectorStore.scan` query (a window holds at most this many rows).
SCAN_WINDOW = 8192
#: How Lite ("is in state 'released'; call load()") and servers ("collection not loaded")
#: say that a collection must be loaded first.
_NOT_LOADED = re.compile(r"released|not loaded|call load\(\)", re.IGNORECASE)
T = TypeVar("T")
class VectorStoreError(AgmanError, RuntimeError):
    """A vector store operation that cannot proceed; the message says why."""


class MilvusLiteLockedError(VectorStoreError):
    """The embedded Milvus Lite directory is held by another process."""


@dataclass(frozen=True)
class Hit:
    """One search result: ``score`` is the cosine similarity (higher is closer)."""

    image_id: int
    product_id: int
    score: float


@dataclass(frozen=True)
class VectorRow:
    """Everything stored for one image: one vector per attribute, optionally a descriptor."""

    image_id: int
    product_id: int
    vectors: Mapping[str, Sequence[float] | np.ndarray]
    descriptor: Sequence[float] | np.ndarray | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


# -- opening ---------------------------------------------------------------------------------
_clients: dict[tuple[int, str, str, str], MilvusClient] = {}
_clients_lock = threading.Lock()
_holders: dict[tuple[int, str, str, str], int] = {}  # users of each client (hold_milvus)
#: gRPC options of a client of a Milvus on this machine. pymilvus pings its server every 10 s,
#: with or without a call in flight; Milvus Lite's gRPC server (this process's, or ``agman
#: milvus-serve``) answers a client idle for about 90 s by closing the connection (GOAWAY
#: "too_many_pings", an error line on the client's stderr). A loopback connection cannot drop
#: silently, so its clients do not ping.
_LOOPBACK_GRPC_OPTIONS = {"grpc.keepalive_time_ms": 2**31 - 1, "grpc.keepalive_permit_without_calls": 0}
_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}
#: Seconds a client that joined another process's Milvus Lite waits, once that process let the
#: directory go, for the lock to be freed (its server stops within about 2 s).
RECONNECT_TIMEOUT = 30.0
#: Tries at opening an embedded Milvus Lite directory found unlocked after a failed open: the
#: process holding it may free its lock between the failed open and the check.
OPEN_ATTEMPTS = 3


def _is_local_path(uri: str) -> bool:
    return "://" not in uri


def _is_loopback(uri: str) -> bool:
    """True for Milvus Lite in a directory and for a server URI on this machine's loopback."""
    return _is_local_path(uri) or urlsplit(uri).hostname in _LOOPBACK_HOSTS


def _client_key(settings: Settings) -> tuple[int, str, str, str]:
    """The cache key of this process's client for ``settings``' Milvus URI."""
    return os.getpid(), settings.resolved_milvus_uri, settings.milvus_token, settings.milvus_db_name


def open_milvus(settings: Settings) -> MilvusClient:
    """The process-wide client for ``settings``' Milvus URI (created lazily, once per process).

    The cache key includes the process id, so a client made before ``fork`` is never reused
    in the child. This process publishes the port on which it serves an embedded Milvus Lite
    directory it opens; a directory held by another process is joined over the port that
    process published (a :class:`~agman_milvus.services.store.lite_sharing.JoinedLite` stands in
    for the client, and follows the directory when that process lets it go), and one held by a process
    that published none raises :class:`MilvusLiteLockedError` explaining how to share it.
    """
    key = _client_key(settings)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client, serving = _connect(settings)
            if serving is not None:
                client = lite_sharing.JoinedLite(Path(settings.resolved_milvus_uri), (client, serving),
                                                 lambda left: _reconnect(settings, left))
            _clients[key] = client
        return client


def _client_options(settings: Settings) -> dict[str, Any]:
    """``MilvusClient`` keyword arguments for ``settings``' Milvus (besides its URI)."""
    kwargs: dict[str, Any] = {}
    if settings.milvus_token:
        kwargs["token"] = settings.milvus_token
    if settings.milvus_db_name:
        kwargs["db_name"] = settings.milvus_db_name
    if _is_loopback(settings.resolved_milvus_uri):
        kwargs["grpc_options"] = dict(_LOOPBACK_GRPC_OPTIONS)
    return kwargs


def _connect(settings: Settings) -> lite_sharing.Connection:
    """A new client of ``settings``' Milvus (:func:`open_milvus`), and who serves the embedded
    Milvus Lite it joined (None otherwise)."""
    uri = settings.resolved_milvus_uri
    kwargs = _client_options(settings)
    if _is_local_path(uri):
        return _open_lite(uri, kwargs)
    try:
        return MilvusClient(uri=uri, **kwargs), None
    except Exception as exc:
        raise VectorStoreError(f"cannot connect to Milvus at {uri}: {exc}") from exc


def _open_lite(uri: str, kwargs: dict[str, Any]) -> lite_sharing.Connection:
    """Open the embedded Milvus Lite directory ``uri`` and publish its port, or join the process
    holding its lock. An open that failed on a directory found unlocked right after is tried
    again (up to :data:`OPEN_ATTEMPTS` opens): its holder freed the lock in between."""
    directory = Path(uri)
    directory.parent.mkdir(parents=True, exist_ok=True)
    quiet_lite_lock_errors()
    attempts = 0
    while True:
        attempts += 1
        try:
            client = MilvusClient(uri=uri, **kwargs)
        except Exception as exc:
            if lite_sharing.locked(directory):
                return _join_lite(directory, kwargs, exc)
            if attempts >= OPEN_ATTEMPTS:
                raise VectorStoreError(f"cannot connect to Milvus at {uri}: {exc}") from exc
            log.info("opening Milvus Lite %s failed while its lock was being freed (%s): trying again",
                     uri, exc)
            continue
        _publish_lite(uri)
        return client, None


def _reconnect(settings: Settings, left: lite_sharing.Serving | None) -> lite_sharing.Connection:
    """:func:`_connect` again after the process this one joined (``left``) let the directory
    go: it withdraws its record before it stops serving and frees the lock (a couple of
    seconds), so a directory still locked with no record is waited for, up to
    :data:`RECONNECT_TIMEOUT`. After a dedicated server (``agman milvus-serve`` restarted), only
    a process that serves the directory again is joined: this process never opens it, which
    would keep the restarted server out."""
    directory = Path(settings.resolved_milvus_uri)
    server = left if left is not None and left.server else None
    options = _client_options(settings)
    deadline = time.monotonic() + RECONNECT_TIMEOUT
    while True:
        try:
            return _connect(settings) if server is None else _join_lite(directory, options, None)
        except MilvusLiteLockedError as exc:  # still locked, or nothing (answering) published yet
            if time.monotonic() <= deadline:
                time.sleep(0.2)
                continue
            if server is None:
                raise
            raise VectorStoreError(
                f"the Milvus Lite server of {directory} (`agman milvus-serve`, process {server.pid}) "
                f"stopped and nothing served the directory again within {RECONNECT_TIMEOUT:.0f} s: "
                "start `agman milvus-serve` again") from exc


def _publish_lite(uri: str) -> None:
    """Publish the port on which this process serves the Milvus Lite directory ``uri``."""
    served = _own_lite_uri(uri)
    if served is not None:
        lite_sharing.publish(Path(uri), served)


def _own_lite_uri(uri: str) -> str | None:
    """The ``http://127.0.0.1:<port>`` of this process's server of the Lite directory ``uri``."""
    from milvus_lite.server_manager import server_manager_instance

    return server_manager_instance.start_and_get_uri(uri)  # the running server's address


def _join_lite(directory: Path, kwargs: dict[str, Any], cause: Exception | None) -> lite_sharing.Connection:
    """A client of the process holding ``directory`` over the port it published, and who that
    is; :class:`MilvusLiteLockedError` when it published none or does not answer."""
    serving = lite_sharing.served_uri(directory)
    if serving is not None:
        try:
            client = MilvusClient(uri=serving.uri, **kwargs)
        except Exception as exc:  # noqa: BLE001 - said below, with the lock's explanation
            log.warning("process %d published %s for %s, which did not answer: %s",
                        serving.pid, serving.uri, directory, exc)
        else:
            log.info("Milvus Lite %s is open in process %d: working over its port %s",
                     directory, serving.pid, serving.uri)
            return client, serving
    raise MilvusLiteLockedError(
        f"the embedded Milvus Lite database {directory} is in use by another process "
        "that does not say where it serves it (Milvus Lite allows one process per directory). "
        "For several processes, let `agman milvus-serve` hold it: processes with this data dir "
        "find it (or set AGMAN_MILVUS_URI=http://127.0.0.1:19540)"
    ) from cause


def hold_milvus(settings: Settings) -> None:
    """Count one more user of this process's client for ``settings``' Milvus URI; each user
    gives it back with :func:`release_milvus`."""
    with _clients_lock:
        key = _client_key(settings)
        _holders[key] = _holders.get(key, 0) + 1


def release_milvus(settings: Settings) -> bool:
    """One user fewer of this process's client for ``settings``' Milvus URI. The last user of
    an embedded Milvus Lite directory closes it (:func:`close_milvus`), so that another process
    (the next ``agman`` command) can open it; a server's client stays open for reuse. True when
    it closed; a release without a :func:`hold_milvus` changes nothing."""
    with _clients_lock:
        key = _client_key(settings)
        if key not in _holders:
            log.warning("release_milvus without hold_milvus for %s: nothing to release", key[1])
            return False
        left = _holders.pop(key) - 1
        if left > 0:
            _holders[key] = left
    return left <= 0 and _is_local_path(key[1]) and close_milvus(settings)


def close_milvus(settings: Settings) -> bool:
    """Close and forget this process's client for ``settings``' Milvus URI (True if one was open).

    Needed before deleting an embedded Milvus Lite directory that this process used, so a
    later :func:`open_milvus` on the same path starts afresh instead of reusing a dead client.
    """
    uri = settings.resolved_milvus_uri
    key = _client_key(settings)
    with _clients_lock:
        client = _clients.pop(key, None)
    if client is None:
        return False
    try:
        client.close()
    except Exception as exc:  # noqa: BLE001 - closing is best effort; the entry is gone either way
        log.warning("closing the Milvus client for %s failed: %s", uri, exc)
    if _joined_uri(client) is None:  # this process serves the directory: stop, free the lock
        _release_lite_server(uri)
    return True


def _joined_uri(client: Any) -> str | None:
    """The port of another process's embedded Milvus Lite that ``client`` works over, or None."""
    return client.served if isinstance(client, lite_sharing.JoinedLite) else None


def _release_lite_server(uri: str) -> None:
    """Stop this process's embedded Milvus Lite server for a local ``uri``, which frees the
    directory's lock. pymilvus starts one per path on first use and keeps it, lock included,
    until the process exits, even after ``close()``: another process (the next ``agman``
    command) could not open the directory meanwhile."""
    if not _is_local_path(uri):
        return
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:  # no Milvus Lite installed: nothing embedded to stop
        return
    lite_sharing.withdraw(Path(uri))
    server_manager_instance.release_server(uri)


def lite_server_uri(settings: Settings) -> str | None:
    """The ``http://127.0.0.1:<port>`` on which the embedded Milvus Lite of ``settings`` is
    served (pymilvus' in-process Lite is a gRPC server: this process's, or that of the process
    it joined), for other local processes to search it; None when ``settings`` name a Milvus
    server or this process has not opened it."""
    uri = settings.resolved_milvus_uri
    with _clients_lock:
        client = _clients.get(_client_key(settings))
    joined = _joined_uri(client)
    if joined is not None:
        return joined
    if not (_is_local_path(uri) and client is not None):
        return None
    return _own_lite_uri(uri)


def version_tag(version: str) -> str:
    """``version`` made safe for a collection name (hashed when it had to change)."""
    tag = re.sub(r"[^0-9A-Za-z]+", "_", version).strip("_")
    if tag == version and 0 < len(tag) <= 40:
        return tag
    digest = hashlib.sha1(version.encode("utf-8")).hexdigest()[:10]
    return f"{tag[:28]}_{digest}".strip("_")


# -- the store -------------------------------------------------------------------------------
class VectorStore:
    """Per-attribute Milvus collections of one model version.

    ``schema`` names the attributes; ``embed_dim`` and ``descriptor_dim`` come from the model.
    ``grouping`` forces (True) or disables (False) Milvus grouping search; by default it is
    used where the deployment supports it.
    """

    def __init__(
        self,
        client: MilvusClient,
        schema: AttributeSchema,
        model_version: str,
        *,
        embed_dim: int,
        descriptor_dim: int,
        prefix: str = "agman",
        filter_fields: Sequence[str] = ("category", "brand", "gender", "colour"),
        search_consistency: str = "Bounded",
        grouping: bool | None = None,
    ) -> None:
        if not model_version or len(model_version) > VERSION_MAX_LENGTH:
            raise ValueError(f"model version must be 1-{VERSION_MAX_LENGTH} characters: {model_version!r}")
        for reserved in (COPY, KEYPOINTS):
            if reserved in [a.slug for a in schema]:
                raise ValueError(f"an attribute may not be called {reserved!r}: that name is "
                                 "taken by the copy check's collections")
        for name in filter_fields:
            if not _FIELD_NAME.match(name) or name in _RESERVED_FIELDS:
                raise ValueError(f"invalid filter field name {name!r}")
        if embed_dim < 1 or descriptor_dim < 1:
            raise ValueError("embedding and descriptor dimensions must be positive")
        self.client = client
        self.schema = schema
        self.model_version = model_version
        self.embed_dim = embed_dim
        self.descriptor_dim = descriptor_dim
        self.prefix = prefix
        self.filter_fields = tuple(filter_fields)
        self.search_consistency = search_consistency
        self._grouping = grouping
        self._deployment: Deployment | None = None
        self._tag = version_tag(model_version)
        self._loaded: set[str] = set()
        self._generation = 0  # the connection that loaded them (lite_sharing.JoinedLite)

    @classmethod
    def from_settings(
        cls, settings: Settings, schema: AttributeSchema, model_version: str, *,
        embed_dim: int, descriptor_dim: int, **kwargs: Any,
    ) -> VectorStore:
        return cls(
            open_milvus(settings), schema, model_version, embed_dim=embed_dim,
            descriptor_dim=descriptor_dim, prefix=settings.collection_prefix,
            filter_fields=settings.filter_fields, **kwargs,
        )

    # -- naming --------------------------------------------------------------------------------
    @property
    def deployment(self) -> Deployment:
        if self._deployment is None:
            self._deployment = probe(self.client)
        return self._deployment

    @property
    def uses_grouping(self) -> bool:
        return self.deployment.grouping_search if self._grouping is None else self._grouping

    def _label(self, attribute: int | str) -> str:
        """``"copy"`` or the canonical attribute name (raises UnknownAttributeError)."""
        if attribute == COPY:
            return COPY
        return self.schema[self.schema.resolve(attribute)].name

    def _slug(self, label: str) -> str:
        return COPY if label == COPY else self.schema[label].slug

    def alias(self, attribute: int | str) -> str:
        """The stable name that points at the active version's collection."""
        return f"{self.prefix}_{self._slug(self._label(attribute))}"

    def collection(self, attribute: int | str) -> str:
        """The physical collection of ``attribute`` (or ``"copy"``) for this model version."""
        return f"{self.alias(attribute)}__{self._tag}"

    def collection_names(self) -> dict[str, str]:
        """``{attribute name or "copy": physical collection}`` for this version."""
        labels = [*self.schema.names, COPY]
        return {label: self.collection(label) for label in labels}

    # -- lifecycle -----------------------------------------------------------------------------
    def _collection_schema(self, dim: int) -> Any:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("image_id", DataType.INT64, is_primary=True)
        schema.add_field("product_id", DataType.INT64)
        schema.add_field("model_version", DataType.VARCHAR, max_length=VERSION_MAX_LENGTH)
        for name in self.filter_fields:
            schema.add_field(name, DataType.VARCHAR, max_length=META_MAX_LENGTH)
        schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim)
        return schema

    def ensure_collections(self) -> None:
        """Create this version's collections if missing; the first version becomes active."""
        existing = set(self.client.list_collections())
        for label, name in self.collection_names().items():
            dim = self.descriptor_dim if label == COPY else self.embed_dim
            if name in existing:
                self._check_existing(name, dim)
                continue
            log.info("creating Milvus collection %s (dim %d)", name, dim)
            try:
                self.client.create_collection(
                    name,
                    schema=self._collection_schema(dim),
                    index_params=self.deployment.index_params(self.client, VECTOR_FIELD),
                    consistency_level=self.search_consistency,
                    properties={_PROPERTY_VERSION: self.model_version, _PROPERTY_ROLE: label},
                )
            except MilvusException:
                if name not in self.client.list_collections():
                    raise
                self._check_existing(name, dim)  # another process created it meanwhile
        self._ensure_keypoints(existing)
        if self.active_version() is None:
            self.activate()

    @property
    def keypoint_collection(self) -> str:
        """The physical collection of the copy check's voting keypoints (every version's)."""
        return f"{self.prefix}_{KEYPOINTS}"

    def _ensure_keypoints(self, existing: set[str]) -> None:
        name = self.keypoint_collection
        if name in existing:
            return
        schema = MilvusClient.create_schema(auto_id=True, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("image_id", DataType.INT64)
        schema.add_field("product_id", DataType.INT64)
        schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=KEYPOINT_DIM)
        log.info("creating Milvus collection %s (dim %d)", name, KEYPOINT_DIM)
        try:
            self.client.create_collection(
                name, schema=schema,
                index_params=self.deployment.index_params(self.client, VECTOR_FIELD,
                                                          hnsw=KEYPOINT_HNSW_BUILD),
                consistency_level=self.search_consistency, properties={_PROPERTY_ROLE: KEYPOINTS},
            )
        except MilvusException:
            if name not in self.client.list_collections():
                raise

    def _check_existing(self, name: str, dim: int) -> None:
        desc = self.client.describe_collection(name)
        fields = {f["name"]: f for f in desc["fields"]}
        have = int(fields.get(VECTOR_FIELD, {}).get("params", {}).get("dim", -1))
        missing = [f for f in self.filter_fields if f not in fields]
        if have != dim or missing:
            raise VectorStoreError(
                f"collection {name} exists with a different layout (dim {have}, expected {dim}"
                + (f"; missing filter fields {missing}" if missing else "")
                + "); drop it or use another AGMAN_COLLECTION_PREFIX"
            )

    def existing_collections(self) -> set[str]:
        """This version's physical collections that exist in Milvus."""
        return set(self.collection_names().values()) & set(self.client.list_collections())

    def _prefixed_collections(self) -> list[str]:
        return [c for c in self.client.list_collections() if c.startswith(f"{self.prefix}_")]

    def _aliases(self) -> dict[str, str]:
        """``{alias: collection}`` for this store's aliases that exist.

        Listed per collection: ``describe_alias`` of a missing alias logs an RPC error.
        """
        wanted = {self.alias(label) for label in self.collection_names()}
        out = {}
        for name in self._prefixed_collections():
            for alias in self.client.list_aliases(name).get("aliases", []):
                if alias in wanted:
                    out[alias] = name
        return out

    def active_version(self) -> str | None:
        """The model version the aliases point at (``None`` before any activation)."""
        target = self._aliases().get(self.alias(COPY))
        if target is None:
            return None
        props = self.client.describe_collection(target).get("properties") or {}
        return props.get(_PROPERTY_VERSION)

    @property
    def is_active(self) -> bool:
        return self.active_version() == self.model_version

    def activate(self) -> None:
        """Point every alias at this version's collections (the model switch)."""
        current = self._aliases()
        for label, name in self.collection_names().items():
            alias = self.alias(label)
            if alias not in current:
                try:
                    self.client.create_alias(name, alias)
                except MilvusException:  # created concurrently: point it here
                    self.client.alter_alias(name, alias)
            elif current[alias] != name:
                self.client.alter_alias(name, alias)
        log.info("model version %s is now active for prefix %s", self.model_version, self.prefix)

    def versions(self) -> dict[str, list[str]]:
        """``{model version: [physical collections]}`` for every version under this prefix."""
        out: dict[str, list[str]] = {}
        for name in self._prefixed_collections():
            props = self.client.describe_collection(name).get("properties") or {}
            version = props.get(_PROPERTY_VERSION)
            if version is not None and "__" in name:
                out.setdefault(version, []).append(name)
        return out

    def drop_version(self, version: str) -> list[str]:
        """Drop every collection of an inactive model version; returns their names."""
        if version == self.active_version():
            raise VectorStoreError(f"model version {version!r} is active; activate another first")
        names = self.versions().get(version, [])
        for name in names:
            self.client.drop_collection(name)
        return names

    # -- loading -------------------------------------------------------------------------------
    def _load(self, name: str) -> None:
        """Load ``name`` into memory unless it already is (Lite reopens collections released,
        and a restarted server forgets what was loaded)."""
        state = self.client.get_load_state(name).get("state")
        if state != LoadState.Loaded:
            log.info("loading Milvus collection %s (was %s)", name, getattr(state, "name", state))
            self.client.load_collection(name)
        self._loaded.add(name)

    def _on_loaded(self, name: str, operation: Callable[[], T]) -> T:
        """Run ``operation`` on collection ``name``, loaded first (once per connection); a
        "not loaded" answer (e.g. after a server restart, or on the new connection of a
        :class:`~agman_milvus.services.store.lite_sharing.JoinedLite` that followed the directory
        during the call) loads it again and retries once."""
        self._forget_loaded_if_reconnected()
        if name not in self._loaded:
            self._load(name)
        try:
            with lite_sharing.failures_handled(_NOT_LOADED):  # loaded, then made again below
                return operation()
        except MilvusException as exc:
            if not _NOT_LOADED.search(str(exc)):
                raise
            if self._forget_loaded_if_reconnected():
                log.info("collection %s is not loaded on the new connection; loading it and retrying", name)
            else:
                log.warning("collection %s was released (%s); loading it and retrying", name, exc)
            self._loaded.discard(name)
            self._load(name)
            return operation()

    def _forget_loaded_if_reconnected(self) -> bool:
        """Forget which collections were loaded if the client connected again since (a joined
        Milvus Lite followed its directory: nothing is loaded there yet); True if it had."""
        if not isinstance(self.client, lite_sharing.JoinedLite):
            return False
        generation = self.client.generation()
        if generation == self._generation:
            return False
        self._loaded.clear()
        self._generation = generation
        return True

    # -- writes --------------------------------------------------------------------------------
    def _vector(self, value: Sequence[float] | np.ndarray, dim: int, what: str) -> list[float]:
        arr = np.asarray(value, dtype=np.float32).reshape(-1)
        if arr.shape[0] != dim:
            raise ValueError(f"{what}: expected a {dim}-d vector, got {arr.shape[0]}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{what}: vector has NaN or infinite values")
        return arr.tolist()

    def filter_metadata(self, metadata: Mapping[str, Any]) -> dict[str, str]:
        """The filter-field values stored with a product's vectors."""
        out = {}
        for name in self.filter_fields:
            value = metadata.get(name)
            text = "" if value is None else str(value)
            if len(text.encode("utf-8")) > META_MAX_LENGTH:
                text = text.encode("utf-8")[:META_MAX_LENGTH].decode("utf-8", "ignore")
            out[name] = text
        return out

    def upsert(self, rows: Iterable[VectorRow]) -> int:
        """Write rows into every attribute collection (and copy, when a descriptor is given).

        Idempotent: the image id is the primary key. Returns the number of rows written.
        """
        rows = list(rows)
        if not rows:
            return 0
        names = self.collection_names()
        per_collection: dict[str, list[dict[str, Any]]] = {name: [] for name in names.values()}
        for row in rows:
            base = {"image_id": int(row.image_id), "product_id": int(row.product_id),
                    "model_version": self.model_version, **self.filter_metadata(row.metadata)}
            vectors = {self._label(k): v for k, v in row.vectors.items()}
            missing = [a for a in self.schema.names if a not in vectors]
            if missing:
                raise ValueError(f"image {row.image_id}: no vector for attributes {missing}")
            for attr in self.schema.names:
                vec = self._vector(vectors[attr], self.embed_dim, f"image {row.image_id} {attr}")
                per_collection[names[attr]].append({**base, VECTOR_FIELD: vec})
            if row.descriptor is not None:
                vec = self._vector(row.descriptor, self.descriptor_dim, f"image {row.image_id} descriptor")
                per_collection[names[COPY]].append({**base, VECTOR_FIELD: vec})
        for name, data in per_collection.items():
            if data:
                self._on_loaded(name, lambda name=name, data=data: self.client.upsert(name, data))
                self.deployment.after_write(self.client, name)
        return len(rows)

    def upsert_keypoints(self, rows: Iterable[tuple[int, int, np.ndarray]]) -> int:
        """Replace the voting keypoints of images; ``rows`` are ``(image_id, product_id,
        [n, 128] vectors)``, at most :data:`MAX_KEYPOINTS` each. Returns the number written."""
        rows = list(rows)
        if not rows:
            return 0
        name = self.keypoint_collection
        self._delete_keypoints(f"image_id in {[int(r[0]) for r in rows]}", flush=False)
        data = []
        for image_id, product_id, vectors in rows:
            arr = np.asarray(vectors, np.float32).reshape(-1, KEYPOINT_DIM)
            if len(arr) > MAX_KEYPOINTS:
                raise ValueError(f"image {image_id}: {len(arr)} keypoints, at most {MAX_KEYPOINTS} are kept")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"image {image_id}: keypoint vectors have NaN or infinite values")
            data += [{"image_id": int(image_id), "product_id": int(product_id), VECTOR_FIELD: v}
                     for v in arr.tolist()]
        for start in range(0, len(data), KEYPOINT_BATCH):
            chunk = data[start:start + KEYPOINT_BATCH]
            self._on_loaded(name, lambda chunk=chunk: self.client.insert(name, chunk))
        self.deployment.after_write(self.client, name)
        return len(data)

    def search_keypoints(self, vectors: np.ndarray, top_k: int) -> list[list[int]]:
        """Per query vector, the image ids of its ``top_k`` nearest stored keypoints."""
        queries = np.asarray(vectors, np.float32).reshape(-1, KEYPOINT_DIM)
        if len(queries) == 0:
            return []
        name = self.keypoint_collection
        if name not in self._loaded and name not in self.client.list_collections():
            return [[] for _ in queries]  # a catalogue indexed before voting existed
        out: list[list[int]] = []
        for start in range(0, len(queries), KEYPOINT_SEARCH_BATCH):
            chunk = queries[start:start + KEYPOINT_SEARCH_BATCH].tolist()
            result = self._on_loaded(name, lambda chunk=chunk: self.client.search(
                name, data=chunk, limit=top_k, output_fields=["image_id"],
                search_params=self.deployment.search_params(top_k, ef=KEYPOINT_EF),
                consistency_level=self.search_consistency))
            out.extend([int((h.get("entity") or h)["image_id"]) for h in hits] for hits in result)
        return out

    def keypoint_image_ids(self) -> set[int]:
        """The ids of the images that have voting keypoints stored.

        Read in windows of image ids: a window that could have been cut off by the query limit
        is read again at half the width; sparse windows double, so gaps between ids cost a
        few queries, not one per :data:`KEYPOINT_QUERY_LIMIT` worth of ids.
        """
        name = self.keypoint_collection
        if name not in self._loaded and name not in self.client.list_collections():
            return set()

        def read(expr: str, limit: int = KEYPOINT_QUERY_LIMIT) -> list[int]:
            rows = self._on_loaded(name, lambda: self.client.query(
                name, filter=expr, output_fields=["image_id"], limit=limit, consistency_level="Strong"))
            return [int(r["image_id"]) for r in rows]

        found: set[int] = set()
        start, width = 0, KEYPOINT_QUERY_LIMIT // MAX_KEYPOINTS
        while True:
            ids = read(f"image_id >= {start} and image_id < {start + width}")
            if len(ids) >= KEYPOINT_QUERY_LIMIT and width > 1:
                width //= 2  # maybe cut off: read the window again, narrower
                continue
            found.update(ids)
            start += width
            if not ids and not read(f"image_id >= {start}", 1):
                return found
            if len(ids) < KEYPOINT_QUERY_LIMIT // 4:
                width *= 2

    def delete_keypoints(self, image_ids: Sequence[int], batch_size: int = 1000) -> None:
        """Remove the voting keypoints of ``image_ids``, ``batch_size`` images per request."""
        for start in range(0, len(image_ids), batch_size):
            ids = [int(i) for i in image_ids[start:start + batch_size]]
            self._delete_keypoints(f"image_id in {ids}", flush=start + batch_size >= len(image_ids))

    def _delete_keypoints(self, expr: str, flush: bool = True) -> None:
        """Delete keypoint rows matching ``expr`` (``flush=False``: a write follows that flushes)."""
        name = self.keypoint_collection
        if name not in self._loaded and name not in self.client.list_collections():
            return
        self._on_loaded(name, lambda: self.client.delete(name, filter=expr))
        if flush:
            self.deployment.after_write(self.client, name)

    def delete_images(self, image_ids: Iterable[int]) -> None:
        """Remove images' vectors from every collection of every model version (in requests of
        1,000 ids, so a long list never becomes one oversized delete expression)."""
        ids = [int(i) for i in image_ids]
        if not ids:
            return
        for name in self._all_collections():
            self.delete_from(name, ids)
        self.delete_keypoints(ids)

    def delete_from(self, collection: str, image_ids: Sequence[int], batch_size: int = 1000) -> None:
        """Remove ``image_ids`` from one physical collection, ``batch_size`` ids per request."""
        if not image_ids:
            return
        for start in range(0, len(image_ids), batch_size):
            ids = [int(i) for i in image_ids[start:start + batch_size]]
            self._on_loaded(collection, lambda ids=ids: self.client.delete(collection, ids=ids))
        self.deployment.after_write(self.client, collection)

    def delete_product(self, product_id: int) -> None:
        """Remove every vector of a product, in every collection of every model version."""
        expr = f"product_id == {int(product_id)}"
        for name in self._all_collections():
            self._on_loaded(name, lambda name=name: self.client.delete(name, filter=expr))
            self.deployment.after_write(self.client, name)
        self._delete_keypoints(expr)

    def _all_collections(self) -> list[str]:
        names = self.existing_collections()
        for collections in self.versions().values():
            names.update(collections)
        return sorted(names)

    # -- reads ---------------------------------------------------------------------------------
    def filter_expression(self, filters: Mapping[str, FilterValue] | None) -> str:
        kinds: dict[str, type] = {name: str for name in self.filter_fields}
        kinds["product_id"] = int
        return build_filter(filters, kinds)

    def search(
        self,
        attribute: int | str,
        vectors: Sequence[Sequence[float]] | np.ndarray,
        top_k: int = 10,
        filters: Mapping[str, FilterValue] | None = None,
        one_per_product: bool = True,
        consistency: str | None = None,
    ) -> list[list[Hit]]:
        """Nearest images for each query vector in ``attribute``'s space of this version."""
        name = self.collection(self._label(attribute))
        return self._search(name, vectors, self.embed_dim, top_k, filters, one_per_product, consistency)

    def search_copy(
        self,
        descriptors: Sequence[Sequence[float]] | np.ndarray,
        top_k: int = 10,
        filters: Mapping[str, FilterValue] | None = None,
        consistency: str | None = None,
    ) -> list[list[Hit]]:
        """Nearest copy descriptors (every image, not one per product)."""
        return self._search(self.collection(COPY), descriptors, self.descriptor_dim, top_k,
                            filters, False, consistency)

    def _search(
        self, name: str, vectors: Sequence[Sequence[float]] | np.ndarray, dim: int, top_k: int,
        filters: Mapping[str, FilterValue] | None, one_per_product: bool, consistency: str | None,
    ) -> list[list[Hit]]:
        if not 1 <= top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
        queries = [self._vector(v, dim, "query") for v in np.atleast_2d(np.asarray(vectors, np.float32))]
        expr = self.filter_expression(filters)
        level = consistency or self.search_consistency

        def run(batch: list[list[float]], limit: int, group: bool) -> list[list[Hit]]:
            kwargs: dict[str, Any] = {}
            if group:
                kwargs["group_by_field"] = "product_id"
            result = self._on_loaded(name, lambda: self.client.search(
                name, data=batch, limit=limit, filter=expr,
                output_fields=["image_id", "product_id"],
                search_params=self.deployment.search_params(limit),
                consistency_level=level, **kwargs,
            ))
            return [[_to_hit(h) for h in hits] for hits in result]

        if not one_per_product:
            return run(queries, top_k, False)
        if self.uses_grouping:
            return [dedupe_by_product(hits, top_k) for hits in run(queries, top_k, True)]
        return search_distinct_products(lambda batch, limit: run(batch, limit, False), queries, top_k)

    def get_vectors(self, attribute: int | str, image_ids: Iterable[int],
                    consistency: str | None = None) -> dict[int, np.ndarray]:
        """Stored vectors of ``image_ids`` in ``attribute``'s collection (missing ids absent), read
        at ``consistency`` (default :attr:`search_consistency`, as searches are). Pass "Strong" to
        see every write made before the call: on a Milvus server that waits for the writes to
        reach the query nodes (a time tick: more-like-this took 416 ms against 11 ms on a server)."""
        ids = [int(i) for i in image_ids]
        if not ids:
            return {}
        name = self.collection(self._label(attribute))
        level = consistency or self.search_consistency
        rows = self._on_loaded(name, lambda: self.client.get(
            name, ids=ids, output_fields=["image_id", VECTOR_FIELD], consistency_level=level,
        ))
        return {int(r["image_id"]): np.asarray(r[VECTOR_FIELD], dtype=np.float32) for r in rows}

    def count(self, attribute: int | str) -> int:
        """Rows in ``attribute``'s (or ``"copy"``) collection of this version."""
        name = self.collection(self._label(attribute))
        rows = self._on_loaded(name, lambda: self.client.query(
            name, filter="", output_fields=["count(*)"], consistency_level="Strong",
        ))
        return int(rows[0]["count(*)"])

    def scan(self, collection: str, fields: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
        """Every row of a physical collection (``image_id`` plus ``fields``), by ascending id.

        Read in primary-key windows with strongly consistent queries. Not ``query_iterator``:
        against a 2.3 server, pymilvus 3's iterator may start from a client-side timestamp
        and miss rows written a moment before (measured in the server-stack tier).
        """

        def read(expr: str, limit: int) -> list[dict[str, Any]]:
            return self._on_loaded(collection, lambda: self.client.query(
                collection, filter=expr, output_fields=["image_id", *fields], limit=limit,
                consistency_level="Strong"))

        end = SCAN_WINDOW
        while read(f"image_id >= {end}", 1):  # ids are SQL ids: find a bound above the largest
            end *= 2
        for start in range(0, end, SCAN_WINDOW):
            rows = read(f"image_id >= {start} and image_id < {start + SCAN_WINDOW}", SCAN_WINDOW)
            yield from sorted(rows, key=lambda r: int(r["image_id"]))

    def iter_image_ids(self, collection: str) -> Iterator[tuple[int, str]]:
        """``(image_id, model_version)`` of every row of a physical collection."""
        for row in self.scan(collection, ["model_version"]):
            yield int(row["image_id"]), str(row["model_version"])


def _to_hit(hit: Mapping[str, Any]) -> Hit:
    entity = hit.get("entity") or {}
    image_id = entity.get("image_id", hit.get("image_id", hit.get("id")))
    return Hit(image_id=int(image_id), product_id=int(entity["product_id"]),
               score=float(hit["distance"]))


def dedupe_by_product(hits: Sequence[Hit], top_k: int) -> list[Hit]:
    """Best hit per product, best first, at most ``top_k``."""
    best: dict[int, Hit] = {}
    for hit in hits:
        if hit.product_id not in best or hit.score > best[hit.product_id].score:
            best[hit.product_id] = hit
    return sorted(best.values(), key=lambda h: -h.score)[:top_k]


def search_distinct_products(
    run: Any, queries: list[list[float]], top_k: int, factor: int = 4
) -> list[list[Hit]]:
    """One hit per product without grouping search: over-fetch, de-duplicate, fetch more.

    ``run(queries, limit)`` returns raw hits per query. A query is finished when it has
    ``top_k`` distinct products or the collection returned fewer than ``limit`` hits
    (exhausted); unfinished queries are retried with a larger limit, up to Milvus's maximum.
    """
    results: list[list[Hit] | None] = [None] * len(queries)
    pending = list(range(len(queries)))
    limit = min(MAX_TOP_K, top_k * factor)
    while pending:
        raw = run([queries[i] for i in pending], limit)
        still = []
        for i, hits in zip(pending, raw, strict=True):
            distinct = dedupe_by_product(hits, top_k)
            if len(distinct) >= top_k or len(hits) < limit or limit >= MAX_TOP_K:
                results[i] = distinct
            else:
                still.append(i)
        pending = still
        limit = min(MAX_TOP_K, limit * factor)
    return [r or [] for r in results]
