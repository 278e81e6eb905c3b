"""Storage: the SQL catalog (source of truth) and the Milvus vector store."""

from agman_milvus.services.store.catalog import Catalog, CatalogError, ImageInfo, ImageStatus, open_catalog
from agman_milvus.services.store.filters import FilterError, build_filter
from agman_milvus.services.store.migrate import CatalogNotMigratedError
from agman_milvus.services.store.vectors import (
    COPY,
    Hit,
    MilvusLiteLockedError,
    VectorRow,
    VectorStore,
    VectorStoreError,
    open_milvus,
)

__all__ = [
    "COPY", "Catalog", "CatalogError", "CatalogNotMigratedError", "FilterError", "Hit",
    "ImageInfo", "ImageStatus", "MilvusLiteLockedError", "VectorRow", "VectorStore",
    "VectorStoreError", "build_filter", "open_catalog", "open_milvus",
]
