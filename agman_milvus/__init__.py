"""agman_milvus: attribute-specific fashion image retrieval on Milvus with the AG-MAN model."""

from agman_milvus.config import Settings, get_settings
from agman_milvus.schema import Attribute, AttributeSchema, UnknownAttributeError

__version__ = "0.1.0"

__all__ = ["Attribute", "AttributeSchema", "Client", "Settings", "UnknownAttributeError", "get_settings"]


def __getattr__(name: str):
    # The Client pulls in torch, pymilvus and SQLAlchemy: import it only when asked for.
    if name == "Client":
        from agman_milvus.client import Client

        return Client
    raise AttributeError(f"module 'agman_milvus' has no attribute {name!r}")
