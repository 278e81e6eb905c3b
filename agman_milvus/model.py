"""Public import path of the models (``from agman_milvus.model import build_model``).

The implementation lives in :mod:`agman_milvus.core.model`.
"""

from agman_milvus.core.model import (
    AttributeEmbeddingModel,
    CheckpointError,
    ModelOutput,
    Preprocess,
    build_model,
    create_model_and_transforms,
    list_models,
    load_checkpoint,
    model_version,
    read_checkpoint_config,
    register_model,
    save_checkpoint,
)

__all__ = [
    "AttributeEmbeddingModel", "CheckpointError", "ModelOutput", "Preprocess", "build_model",
    "create_model_and_transforms", "list_models", "load_checkpoint", "model_version",
    "read_checkpoint_config", "register_model", "save_checkpoint",
]
