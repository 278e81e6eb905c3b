"""What the use cases over a deployment share: their services, and reading a query image."""

from __future__ import annotations

from typing import Any, Self

from PIL import Image

from agman_milvus.core.config import Settings
from agman_milvus.core.images import ImageSource, decode_image_bytes
from agman_milvus.services.blobs import BlobStore, is_blob_uri
from agman_milvus.services.embedding import Embedder
from agman_milvus.services.fetch import load_image
from agman_milvus.services.store.catalog import Catalog
from agman_milvus.services.store.vectors import VectorStore

__all__ = ["UseCase", "load_query_image"]


def load_query_image(
    source: ImageSource, *, settings: Settings | None = None, blobs: BlobStore | None = None
) -> Image.Image:
    """Decode a query: path, ``file://``/``http(s)://`` URI, bytes, PIL image or ``blob://``."""
    if is_blob_uri(source):
        if blobs is None:
            raise ValueError(f"cannot read {source}: no blob store configured")
        return decode_image_bytes(blobs.open_uri(str(source)), settings=settings, source=str(source))
    return load_image(source, settings=settings)


class UseCase:
    """The services a use case works with: the model, Milvus, the SQL catalog (and blobs)."""

    def __init__(
        self,
        embedder: Embedder,
        vectors: VectorStore,
        catalog: Catalog,
        *,
        settings: Settings | None = None,
        blobs: BlobStore | None = None,
    ) -> None:
        self.embedder = embedder
        self.vectors = vectors
        self.catalog = catalog
        self.settings = settings
        self.blobs = blobs

    @classmethod
    def from_services(cls, services: Any) -> Self:
        """Built from a :class:`agman_milvus.services.container.Services`."""
        return cls(services.embedder, services.vectors, services.catalog,
                   settings=services.settings, blobs=services.blobs)

    def load_image(self, source: ImageSource) -> Image.Image:
        """A query image (:func:`load_query_image`) under this deployment's limits and blobs."""
        return load_query_image(source, settings=self.settings, blobs=self.blobs)
