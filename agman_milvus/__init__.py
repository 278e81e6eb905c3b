"""agman_milvus: attribute-specific fashion image retrieval on Milvus with the AG-MAN model.

The public API, by stable import path (the layers behind it are described in the README):

* ``agman_milvus``: :class:`Client`, :class:`AgmanEmbeddingFunction`, :class:`Settings`,
  :class:`AttributeSchema`, the errors :class:`AgmanError` and :class:`InvalidProductError`;
* ``agman_milvus.model``: ``build_model``, ``list_models``, ``load_checkpoint``,
  ``save_checkpoint`` ...;
* ``agman_milvus.schema``: :class:`AttributeSchema` and its errors.

Names are imported on first use, so importing a light submodule (e.g. the worker queue names)
does not load pydantic, torch, pymilvus or SQLAlchemy.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "AgmanEmbeddingFunction": "agman_milvus.app.embedding_function",
    "AgmanError": "agman_milvus.core.errors",
    "Attribute": "agman_milvus.core.schema",
    "AttributeSchema": "agman_milvus.core.schema",
    "Client": "agman_milvus.app.client",
    "InvalidProductError": "agman_milvus.core.errors",
    "Settings": "agman_milvus.core.config",
    "UnknownAttributeError": "agman_milvus.core.schema",
    "get_settings": "agman_milvus.core.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'agman_milvus' has no attribute {name!r}")
