"""The SQL catalog: one :class:`Catalog` owns the engine and a repository per concern.

``catalog.products``, ``catalog.images``, ``catalog.model_versions`` and
``catalog.screening_jobs`` are the only door to SQL: every query and session lives in them, and
each method runs in its own short transaction and returns detached rows or plain values, so a
:class:`Catalog` can be shared by threads. Code outside the store imports the catalog's row and
value types from here.
"""

from __future__ import annotations

from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from agman_milvus.core.config import Settings
from agman_milvus.services.store.engine import create_catalog_engine
from agman_milvus.services.store.images import (
    LIVE_STATUSES,
    ImageFeatures,
    ImageInfo,
    ImageRepository,
    IndexedSource,
)
from agman_milvus.services.store.migrate import ensure_at_head, upgrade
from agman_milvus.services.store.model_versions import ModelVersionRepository
from agman_milvus.services.store.products import PRODUCT_FIELDS, ProductRepository
from agman_milvus.services.store.repository import TRANSIENT_SQL_ERRORS, CatalogError
from agman_milvus.services.store.screening_jobs import JobNotFoundError, ScreeningJobRepository
from agman_milvus.services.store.tables import (
    Image,
    ImageStatus,
    JobStatus,
    ModelRecord,
    Product,
    ScreeningChunk,
    ScreeningJob,
    ScreeningMatch,
)

__all__ = [
    "LIVE_STATUSES", "PRODUCT_FIELDS", "TRANSIENT_SQL_ERRORS", "Catalog", "CatalogError", "Image",
    "ImageFeatures", "ImageInfo", "ImageStatus", "IndexedSource", "JobNotFoundError", "JobStatus",
    "ModelRecord", "Product", "ScreeningChunk", "ScreeningJob", "ScreeningMatch", "open_catalog",
]


class Catalog:
    """The SQL catalog over ``engine`` (see :func:`open_catalog`): one repository per concern."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        sessions = sessionmaker(engine, expire_on_commit=False)
        self.products = ProductRepository(sessions)
        self.images = ImageRepository(sessions)
        self.model_versions = ModelVersionRepository(sessions)
        self.screening_jobs = ScreeningJobRepository(sessions)

    def dispose(self) -> None:
        self.engine.dispose()


def open_catalog(settings: Settings, *, migrate: bool | None = None) -> Catalog:
    """Open the catalog named by ``settings``.

    ``migrate=None`` (default) upgrades the embedded SQLite file to the newest schema
    automatically and only *checks* a configured database, which is upgraded explicitly
    with ``agman db upgrade``.
    """
    url = settings.resolved_database_url
    engine = create_catalog_engine(url)
    if migrate is None:
        migrate = settings.database_url is None
    if migrate:
        upgrade(url, engine=engine)
    else:
        ensure_at_head(engine)
    return Catalog(engine)
