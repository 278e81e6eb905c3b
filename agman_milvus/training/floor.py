"""The untrained floor: ImageNet backbone features, global-average pooled, no training.

Every attribute gets the same vector (the final stage of the ImageNet trunk, average pooled and
L2-normalised), so this measures what generic ImageNet similarity gives per attribute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from agman_milvus.core.schema import AttributeSchema


class PooledImageNetFeatures(nn.Module):
    """``embed(images, ids)`` = L2(avgpool(top stage of an ImageNet trunk)); ids are ignored."""

    model_name = "imagenet_floor"
    has_classifier = False

    def __init__(self, schema: AttributeSchema, backbone: str = "mobilenet_v2", image_size: int = 224,
                 pretrained: str | None = "imagenet") -> None:
        super().__init__()
        from agman_milvus.core.model.backbones import build_trunk
        from agman_milvus.core.model.transforms import Preprocess

        self.schema = schema
        self.trunk = build_trunk(backbone, with_top=True, pretrained=pretrained)
        self.preprocess = Preprocess(image_size, self.trunk.mean, self.trunk.std)
        self.eval()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled top-stage features [B, C] of the frozen trunk."""
        top = self.trunk.forward_top(self.trunk.forward_high(self.trunk.forward_mid(images)))
        return F.adaptive_avg_pool2d(top, 1).flatten(1).float()

    def embed(self, images: torch.Tensor, attribute_ids: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.features(images), dim=1)
