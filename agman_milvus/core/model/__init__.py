"""AG-MAN and its baselines behind one interface; see :func:`build_model`."""

from agman_milvus.core.model._registry import build_model, list_models, register_model
from agman_milvus.core.model.base import AttributeEmbeddingModel, ModelOutput
from agman_milvus.core.model.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_version,
    read_checkpoint_config,
    save_checkpoint,
)
from agman_milvus.core.model.transforms import Preprocess

__all__ = [
    "AttributeEmbeddingModel",
    "CheckpointError",
    "ModelOutput",
    "Preprocess",
    "build_model",
    "create_model_and_transforms",
    "list_models",
    "load_checkpoint",
    "model_version",
    "read_checkpoint_config",
    "register_model",
    "save_checkpoint",
]


def create_model_and_transforms(name: str, **kwargs) -> tuple[AttributeEmbeddingModel, Preprocess]:
    """open_clip-style: the model and its preprocessing in one call (``kwargs`` as build_model)."""
    model = build_model(name, **kwargs)
    return model, model.preprocess
