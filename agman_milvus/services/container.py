"""The long-lived services of one process, built from :class:`Settings` once and lazily.

``Services`` holds the Embedder, the SQL Catalog, the Milvus VectorStore and the BlobStore.
Nothing is built until first used, so a Celery parent can import this freely and fork: the
model, the database engine and the Milvus client are created in the process that uses them.
A ``Services`` object notices when it is used in another process than the one that built its
parts (after ``fork``) and builds fresh ones there.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from agman_milvus.core.config import Settings, get_settings
from agman_milvus.core.errors import ConfigurationError

if TYPE_CHECKING:
    from agman_milvus.services.blobs import BlobStore
    from agman_milvus.services.embedding import Embedder
    from agman_milvus.services.store.catalog import Catalog
    from agman_milvus.services.store.vectors import VectorStore

logger = logging.getLogger(__name__)

__all__ = ["DeploymentError", "Services", "check_shared_deployment", "get_services", "reset_services"]


class Services:
    """Lazily built Embedder, Catalog, VectorStore and BlobStore for one :class:`Settings`.

    ``embedder`` may be given (an already built :class:`Embedder`, e.g. around an in-memory
    model); otherwise it is loaded from ``settings.resolved_checkpoint``. ``settings.threads``,
    when set, limits the whole process's CPU threads once the embedder is first needed
    (:func:`~agman_milvus.core.runtime.limit_threads`).
    """

    def __init__(self, settings: Settings | None = None, *, embedder: Embedder | None = None) -> None:
        self.settings = settings or get_settings()
        self._given_embedder = embedder
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._embedder: Embedder | None = embedder
        self._catalog: Catalog | None = None
        self._vectors: VectorStore | None = None
        self._blobs: BlobStore | None = None
        self._model_registered = False
        self._holds_milvus = False  # this object counts as a user of the process's Milvus client

    def _check_fork(self) -> None:
        """Forget everything built in another process (never reuse it after fork)."""
        if self._pid != os.getpid():
            logger.debug("services used in a new process %d: rebuilding lazily", os.getpid())
            self._pid = os.getpid()
            self._embedder = self._given_embedder
            self._catalog = None
            self._vectors = None
            self._model_registered = False
            self._holds_milvus = False

    @property
    def embedder(self) -> Embedder:
        """The Embedder (the model itself loads on first use)."""
        with self._lock:
            self._check_fork()
            if self._embedder is None:
                from agman_milvus.services.embedding import Embedder

                s = self.settings
                if s.threads is not None:  # the process's CPU work (model, copy checks) starts here
                    from agman_milvus.core.runtime import limit_threads

                    limit_threads(s.threads)
                self._embedder = Embedder(
                    checkpoint=s.resolved_checkpoint, device=s.device, batch_size=s.batch_size,
                    compile=s.compile, precision=s.precision,
                )
            return self._embedder

    @property
    def catalog(self) -> Catalog:
        """The SQL catalog (the embedded SQLite file is migrated automatically)."""
        with self._lock:
            self._check_fork()
            if self._catalog is None:
                from agman_milvus.services.store.catalog import open_catalog

                self._catalog = open_catalog(self.settings)
            return self._catalog

    @property
    def blobs(self) -> BlobStore:
        with self._lock:
            if self._blobs is None:
                from agman_milvus.services.blobs import BlobStore

                self._blobs = BlobStore(self.settings.blob_dir)
            return self._blobs

    @property
    def vectors(self) -> VectorStore:
        """The Milvus collections of the embedder's model version (created if missing).

        Building this loads the model (the collections' dimensions and names come from it) and
        records the model version in the catalog, making it active when none is.
        """
        with self._lock:
            self._check_fork()
            if self._vectors is None:
                from agman_milvus.services.store.vectors import VectorStore

                emb = self.embedder
                store = VectorStore.from_settings(
                    self.settings, emb.schema, emb.version,
                    embed_dim=emb.embed_dim, descriptor_dim=emb.descriptor_dim,
                )
                store.ensure_collections()
                self._vectors = store
                self._hold_milvus()
                self._register_model()
            return self._vectors

    def active_vectors(self) -> VectorStore | None:
        """The VectorStore of the catalog's active model version, without loading any model
        (for deletes and metadata updates); ``None`` when no model version is active yet."""
        with self._lock:
            self._check_fork()
            if self._vectors is not None:
                return self._vectors
        record = self.catalog.model_versions.active()
        if record is None:
            return None
        from agman_milvus.core.schema import AttributeSchema
        from agman_milvus.services.store.vectors import VectorStore

        store = VectorStore.from_settings(
            self.settings, AttributeSchema.from_json(record.attribute_schema), record.version,
            embed_dim=record.embed_dim, descriptor_dim=record.descriptor_dim,
        )
        with self._lock:
            self._hold_milvus()
        return store

    def _hold_milvus(self) -> None:
        """Count this object as a user of the process's Milvus client (once), so that
        :meth:`close` can give an embedded Milvus Lite directory back."""
        if not self._holds_milvus:
            from agman_milvus.services.store.vectors import hold_milvus

            hold_milvus(self.settings)
            self._holds_milvus = True

    def _register_model(self) -> None:
        if self._model_registered:
            return
        emb = self.embedder
        model = emb.model
        catalog = self.catalog
        checkpoint = self.settings.resolved_checkpoint
        catalog.model_versions.register(
            emb.version, name=str(getattr(model, "model_name", "unknown")),
            backbone=str(getattr(model, "backbone_name", "unknown")),
            attribute_schema=emb.schema.to_json(), embed_dim=emb.embed_dim,
            descriptor_dim=emb.descriptor_dim,
            checkpoint_path=str(checkpoint) if checkpoint is not None else None,
        )
        active = catalog.model_versions.active()
        if active is None:
            catalog.model_versions.set_active(emb.version)
            logger.info("model version %s registered and made active", emb.version)
        elif active.version != emb.version:
            logger.warning(
                "this process embeds with model %s but the active model is %s; its vectors go to "
                "the %s collections (activate it once they are filled)",
                emb.version, active.version, emb.version,
            )
        self._model_registered = True

    def close(self) -> None:
        """Dispose of the database engine and give the Milvus client back. The client is shared
        per process: the last user of an embedded Milvus Lite directory closes it, so another
        process (the next ``agman`` command) can open the directory."""
        with self._lock:
            if self._pid == os.getpid():
                if self._catalog is not None:
                    self._catalog.dispose()
                if self._holds_milvus:
                    from agman_milvus.services.store.vectors import release_milvus

                    release_milvus(self.settings)
            self._catalog = None
            self._vectors = None
            self._holds_milvus = False


_default: dict[int, Services] = {}
_default_lock = threading.Lock()


def get_services(settings: Settings | None = None) -> Services:
    """The process-wide :class:`Services` for the environment's settings (or ``settings``).

    With explicit ``settings`` a new object is returned each call; cache it yourself.
    """
    if settings is not None:
        return Services(settings)
    with _default_lock:
        pid = os.getpid()
        services = _default.get(pid)
        if services is None:
            _default.clear()
            services = _default[pid] = Services(get_settings())
        return services


def reset_services() -> None:
    """Forget the process-wide services (tests; after changing the environment)."""
    with _default_lock:
        for services in _default.values():
            services.close()
        _default.clear()


class DeploymentError(ConfigurationError):
    """Settings that cannot work together; the message says what to change."""


def check_shared_deployment(settings: Settings) -> None:
    """With a broker, workers and producers are separate processes: they need a shared Milvus.

    Milvus Lite (the embedded default) lets one process open its directory; the others work
    over the port it publishes (``agman milvus-serve``, or any process holding it). A broker
    without ``AGMAN_MILVUS_URI`` therefore needs a process that serves the data dir's Milvus
    Lite already; without one, fail fast and say how to fix it.
    """
    if not (settings.broker_url and settings.embedded):
        return
    from agman_milvus.services.store import lite_sharing

    directory = Path(settings.resolved_milvus_uri)
    if lite_sharing.served_uri(directory) is None:
        raise DeploymentError(
            "AGMAN_BROKER_URL is set but AGMAN_MILVUS_URI is not, and no process serves the "
            f"embedded Milvus Lite database ({directory}): it can be opened by one process only, "
            "so Celery workers cannot share it. Start `agman milvus-serve` with the same data dir "
            "first (processes with that data dir find it), or point AGMAN_MILVUS_URI at a Milvus "
            "server, or unset AGMAN_BROKER_URL to ingest in-process."
        )
