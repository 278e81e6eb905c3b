"""Public import path of the attribute schema (``from agman_milvus.schema import AttributeSchema``).

The implementation lives in :mod:`agman_milvus.core.schema`.
"""

from agman_milvus.core.schema import Attribute, AttributeSchema, UnknownAttributeError

__all__ = ["Attribute", "AttributeSchema", "UnknownAttributeError"]
