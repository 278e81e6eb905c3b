"""A small model registry in timm's style: ``build_model(name, ...)`` and ``list_models()``."""

from __future__ import annotations

from collections.abc import Callable

from agman_milvus.core.model.agman import AGMAN
from agman_milvus.core.model.backbones import build_trunk
from agman_milvus.core.model.base import AttributeEmbeddingModel
from agman_milvus.core.model.baselines import ASENv2, GlobalEmbedding
from agman_milvus.core.schema import AttributeSchema

Builder = Callable[..., AttributeEmbeddingModel]
_MODELS: dict[str, tuple[type[AttributeEmbeddingModel], bool]] = {}


def register_model(name: str, cls: type[AttributeEmbeddingModel], *, needs_top: bool) -> None:
    """Register a model class; ``needs_top`` keeps the trunk's top stage (classifier branch)."""
    _MODELS[name] = (cls, needs_top)


register_model("agman", AGMAN, needs_top=True)
register_model("asen_v2", ASENv2, needs_top=False)
register_model("global", GlobalEmbedding, needs_top=False)


def list_models() -> list[str]:
    return sorted(_MODELS)


def build_model(
    name: str,
    *,
    schema: AttributeSchema,
    backbone: str = "resnet50",
    pretrained: str | None = None,
    image_size: int = 224,
    embed_dim: int | None = None,
    taps: str = "paper",
) -> AttributeEmbeddingModel:
    """Build a registered model.

    Args:
        name: one of :func:`list_models` (``agman``, ``asen_v2``, ``global``).
        schema: the attributes (and value names) the model embeds.
        backbone: ``resnet50`` (the paper's), ``mobilenet_v2`` or ``efficientnet_lite0/1/2``.
        pretrained: ``None`` for random init, ``"imagenet"`` for the trunk's ImageNet weights
            from local files (:mod:`agman_milvus.core.model.weights`).
        image_size: the square input size of the model's preprocessing.
        embed_dim: embedding size (default: 512; ``asen_v2`` always uses the trunk's channels).
        taps: the trunk's tap points, ``paper`` or ``late`` (the product recipe's; no top stage).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    cls, needs_top = _MODELS[name]
    trunk = build_trunk(backbone, with_top=needs_top, pretrained=pretrained, taps=taps)
    kwargs: dict[str, object] = {"image_size": image_size}
    if embed_dim is not None or cls is not ASENv2:
        kwargs["embed_dim"] = 512 if embed_dim is None else embed_dim
    model = cls(schema, trunk, **kwargs)
    return model.eval()
