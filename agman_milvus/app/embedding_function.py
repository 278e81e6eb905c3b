"""``AgmanEmbeddingFunction``: the AG-MAN model behind pymilvus.model's embedding-function interface.

It subclasses ``pymilvus.model.base.BaseEmbeddingFunction`` when ``pymilvus[model]`` is
installed, else a local base with the same method names, so code written for
``pymilvus.model`` embedding functions works with images::

    ef = AgmanEmbeddingFunction()                            # AGMAN_CHECKPOINT, or the demo model
    docs = ef.encode_documents(["a.jpg", "b.jpg"])          # {attribute: [np.ndarray, ...]}
    queries = ef.encode_queries(["q.jpg"], "sleeve_length")  # [np.ndarray]
    client.search("agman_sleeve_length", data=queries, limit=10)

    sleeves = AgmanEmbeddingFunction(attribute="sleeve_length")  # a drop-in for pymilvus code
    docs, queries = sleeves(["a.jpg", "b.jpg"]), sleeves.encode_queries(["q.jpg"])

Vectors are float32, 1-D and L2-normalised (the collections use COSINE).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from agman_milvus.core.config import get_settings
from agman_milvus.core.images import ImageSource
from agman_milvus.core.model import AttributeEmbeddingModel
from agman_milvus.services.embedding import Embedder
from agman_milvus.services.fetch import load_image

__all__ = ["AgmanEmbeddingFunction", "BaseEmbeddingFunction"]

log = logging.getLogger(__name__)

try:  # the ecosystem's base class, when pymilvus[model] is installed
    from pymilvus.model.base import BaseEmbeddingFunction  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the installation

    class BaseEmbeddingFunction:  # type: ignore[no-redef]
        """Local stand-in for ``pymilvus.model.base.BaseEmbeddingFunction`` (same names)."""

        def __call__(self, texts):  # noqa: ANN001, ANN204
            raise NotImplementedError

        def encode_queries(self, queries):  # noqa: ANN001, ANN201
            raise NotImplementedError


class AgmanEmbeddingFunction(BaseEmbeddingFunction):
    """Images -> attribute-specific embeddings (one vector per attribute per image).

    Args:
        checkpoint: a model checkpoint (``.safetensors``); default: ``AGMAN_CHECKPOINT``, else
            the demo model (as everywhere in agman_milvus).
        attribute: bind the function to one attribute, so it behaves like any pymilvus
            embedding function (``ef(images)`` and ``ef.encode_queries(images)`` return one
            vector per image). Unbound, documents come as ``{attribute: vectors}`` and queries
            need an attribute.
        model: an already built :class:`AttributeEmbeddingModel` (tests, notebooks).
        device: ``cpu``, ``cuda`` or ``auto`` (default: ``AGMAN_DEVICE``).
        batch_size: images per forward pass (default: ``AGMAN_BATCH_SIZE``).
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        *,
        attribute: str | None = None,
        model: AttributeEmbeddingModel | None = None,
        device: str | None = None,
        batch_size: int | None = None,
        embedder: Embedder | None = None,
    ) -> None:
        if embedder is None:
            settings = get_settings()
            if model is None and checkpoint is None:
                checkpoint = settings.resolved_checkpoint
            embedder = Embedder(model, checkpoint=checkpoint, device=device or settings.device,
                                batch_size=batch_size or settings.batch_size, precision=settings.precision)
        self._embedder = embedder
        self.attribute = None if attribute is None else self._embedder.schema[attribute].name

    # -- properties ----------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Size of every attribute vector."""
        return self._embedder.embed_dim

    @property
    def descriptor_dim(self) -> int:
        """Size of the copy-detection descriptor."""
        return self._embedder.descriptor_dim

    @property
    def attributes(self) -> tuple[str, ...]:
        """The attribute names, in the model's order."""
        return self._embedder.schema.names

    @property
    def model_version(self) -> str:
        return self._embedder.version

    # -- encoding ------------------------------------------------------------------------------
    def encode_documents(
        self, images: Sequence[ImageSource], attribute: str | None = None
    ) -> list[np.ndarray] | dict[str, list[np.ndarray]]:
        """Vectors for images to be stored: ``{attribute: [vector per image]}``, or only one
        attribute's list when one is named (or bound). One backbone pass per image either way."""
        pil = _load_all(images)
        attribute = attribute or self.attribute
        if attribute is not None:
            return _rows(self._embedder.embed(pil, attribute))
        embeddings = self._embedder.encode(pil).embeddings  # [N, K, D]
        return {name: _rows(embeddings[:, k]) for k, name in enumerate(self.attributes)}

    def encode_queries(
        self, images: Sequence[ImageSource], attribute: str | None = None
    ) -> list[np.ndarray]:
        """Query vectors for ``attribute`` (default: the bound one), in the documents' space."""
        attribute = attribute or self.attribute
        if attribute is None:
            raise ValueError(
                "name the attribute to query (encode_queries(images, attribute)) or bind one "
                f"(AgmanEmbeddingFunction(attribute=...)); attributes: {', '.join(self.attributes)}"
            )
        return _rows(self._embedder.embed(_load_all(images), attribute))

    def encode_copy_descriptors(self, images: Sequence[ImageSource]) -> list[np.ndarray]:
        """Copy-detection descriptors (for the ``{prefix}_copy`` collection)."""
        return _rows(self._embedder.encode(_load_all(images)).descriptors)

    def __call__(
        self, images: Sequence[ImageSource], attribute: str | None = None
    ) -> list[np.ndarray] | dict[str, list[np.ndarray]]:
        return self.encode_documents(images, attribute)


def _load_all(images: Sequence[ImageSource]) -> list:
    if isinstance(images, (str, bytes, Path)) or hasattr(images, "getpixel"):
        raise TypeError("pass a list of images (paths, URIs, bytes or PIL images), not one image")
    return [load_image(im) for im in images]


def _rows(matrix: np.ndarray) -> list[np.ndarray]:
    return [np.ascontiguousarray(row, dtype=np.float32) for row in matrix]
