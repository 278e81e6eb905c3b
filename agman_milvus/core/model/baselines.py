"""The baselines AG-MAN is compared with, behind the same interface.

``asen_v2``: Maryeon/asen's ``ASENet_V2`` (spec §1.5). Trunk cut after layer3 (1024 x 14 x 14);
ASA attends the trunk map itself: M = softmax_hw(Σ_c tanh(BN(conv1 X)) · tanh(T1 a) / √512),
g = Σ_hw X · M (1024-d); ACA m = σ(fc2 ReLU(fc1 [g, ReLU(T2 a)])) with fc1 1536 -> 512 and
fc2 512 -> 1024; e = L2(g · m), 1024-d.

``global``: no attribute conditioning. Trunk map -> 1x1 conv -> average pool -> L2; one vector
shared by every attribute (the plain triplet-network baseline).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from agman_milvus.core.model.backbones import Trunk
from agman_milvus.core.model.base import AttributeEmbeddingModel
from agman_milvus.core.model.layers import l2_normalize, spatial_softmax
from agman_milvus.core.schema import AttributeSchema


class ASENv2(AttributeEmbeddingModel):
    """ASENet_V2: attribute-aware spatial + channel attention over the layer3 map."""

    model_name = "asen_v2"

    def __init__(self, schema: AttributeSchema, trunk: Trunk, embed_dim: int | None = None,
                 image_size: int = 224, attr_dim: int = 512) -> None:
        channels = trunk.high_channels
        if embed_dim not in (None, channels):
            raise ValueError(f"asen_v2 embeds into the trunk's {channels} channels, not {embed_dim}")
        super().__init__(schema, trunk, channels, image_size)
        self.attr_dim = attr_dim
        self.attr_embedding = nn.Embedding(len(schema), attr_dim)
        self.attr_transform1 = nn.Linear(attr_dim, attr_dim)
        self.conv1 = nn.Conv2d(channels, attr_dim, kernel_size=1, bias=True)
        self.img_bn1 = nn.BatchNorm2d(attr_dim)
        self.attr_transform2 = nn.Linear(attr_dim, attr_dim)
        self.fc1 = nn.Linear(channels + attr_dim, attr_dim)
        self.fc2 = nn.Linear(attr_dim, channels)

    def _features(self, images: torch.Tensor):
        mid = self.trunk.forward_mid(images)
        high = self.trunk.forward_high(mid)
        return (high, torch.tanh(self.img_bn1(self.conv1(high)))), mid, high

    def _scores(self, img: torch.Tensor, t: torch.Tensor, pattern: str) -> torch.Tensor:
        return spatial_softmax(torch.einsum(pattern, img, torch.tanh(t)) / math.sqrt(self.attr_dim))

    def _gate(self, g: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        u = F.relu(self.attr_transform2(emb)).expand(*g.shape[:-1], -1)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(torch.cat([g, u], dim=-1)))))

    def _heads(self, inputs, attribute_ids):
        x, img = inputs
        emb = self.attr_embedding(attribute_ids)
        m = self._scores(img, self.attr_transform1(emb), "bchw,bc->bhw")
        g = torch.einsum("bchw,bhw->bc", x, m)
        return l2_normalize(g * self._gate(g, emb))

    def _all_heads(self, inputs):
        x, img = inputs
        emb = self.attr_embedding.weight
        m = self._scores(img, self.attr_transform1(emb), "bchw,kc->bkhw")
        g = torch.einsum("bchw,bkhw->bkc", x, m)
        return l2_normalize(g * self._gate(g, emb.unsqueeze(0)))

    def attention_map(self, images, attribute_ids):
        (_, img), _, _ = self._features(images)
        ids = self.attribute_tensor(attribute_ids, images.shape[0])
        return self._scores(img, self.attr_transform1(self.attr_embedding(ids)), "bchw,bc->bhw")


class GlobalEmbedding(AttributeEmbeddingModel):
    """One attribute-independent vector per image, repeated for every attribute."""

    model_name = "global"

    def __init__(self, schema: AttributeSchema, trunk: Trunk, embed_dim: int = 512,
                 image_size: int = 224) -> None:
        super().__init__(schema, trunk, embed_dim, image_size)
        self.conv1 = nn.Conv2d(trunk.high_channels, embed_dim, kernel_size=1, bias=True)

    def _features(self, images: torch.Tensor):
        mid = self.trunk.forward_mid(images)
        high = self.trunk.forward_high(mid)
        return (l2_normalize(self.conv1(high).mean(dim=(2, 3))),), mid, high

    def _heads(self, inputs, attribute_ids):
        return inputs[0]

    def _all_heads(self, inputs):
        return inputs[0].unsqueeze(1).expand(-1, self.num_attributes, -1)
