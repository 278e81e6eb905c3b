"""agman_milvus: attribute-specific fashion image retrieval on Milvus with the AG-MAN model.

The public API, by stable import path (the layers behind it are described in the README):

* ``agman_milvus``: :class:`Client`, :class:`AgmanEmbeddingFunction`, :class:`Settings`,
  :class:`AttributeSchema`;
* ``agman_milvus.model``: ``build_model``, ``list_models``, ``load_checkpoint``,
  ``save_checkpoint`` ...;
* ``agman_milvus.schema``: :class:`AttributeSchema` and its errors.
"""

from agman_milvus.core.config import Settings, get_settings
from agman_milvus.core.schema import Attribute, AttributeSchema, UnknownAttributeError

__version__ = "0.1.0"

__all__ = [
    "AgmanEmbeddingFunction", "Attribute", "AttributeSchema", "Client", "Settings",
    "UnknownAttributeError", "get_settings",
]


def __getattr__(name: str) -> object:
    # Client and AgmanEmbeddingFunction pull in torch, pymilvus and SQLAlchemy: import on demand.
    if name == "Client":
        from agman_milvus.app.client import Client

        return Client
    if name == "AgmanEmbeddingFunction":
        from agman_milvus.app.embedding_function import AgmanEmbeddingFunction

        return AgmanEmbeddingFunction
    raise AttributeError(f"module 'agman_milvus' has no attribute {name!r}")
