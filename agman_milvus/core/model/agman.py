"""AG-MAN (Xiao & Yamasaki): attribute-guided multi-level attention network.

Shapes for a 224 input (spec §1.1): the trunk's mid (layer2) and high (layer3) maps are fused
into F = concat[L3, L3 + conv1_1(maxpool(L2))] (2048 x 14 x 14 for ResNet-50). The retrieval
branch: V = conv1(w * F); ASA map M = softmax_hw(Σ_c tanh(BN(V)) · SiLU(T1 a) / √512);
V1 = V · w1 · M; V2 = V1 · CBAM(V1); g = Σ_hw V2; ACA m = σ(fc2 ReLU(fc1 [g, SiLU(T2 a)]));
g1 = g · w2 · m; g2 = g1 · ReLU(mask[a]); e = g2 / ||g2||. The classification branch
(layer4 -> avgpool -> Linear(2048 -> A)) predicts the attribute *type* and runs in training only;
with the product recipe's late tap points (see :mod:`agman_milvus.core.model.backbones`) the
trunk has no top stage and the model no classification branch; ``taps="late_fine"`` adds the
stride-8 stage's map to the fusion as a third level.

Note: w2 multiplies g right before the L2 normalisation, so it cancels out and its gradient is
zero; it is kept for parameter-for-parameter fidelity with the reference.

Fixed here (spec §7): no hard-coded 14x14 (broadcasting and adaptive pooling, any input size);
an eps in the L2 normalisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from agman_milvus.core.model.backbones import MultiLevelFusion, Trunk
from agman_milvus.core.model.base import AttributeEmbeddingModel, AttributeIds, ModelOutput
from agman_milvus.core.model.layers import SpatialAttention, l2_normalize, spatial_softmax
from agman_milvus.core.schema import AttributeSchema


def csn_masks(num_attributes: int, dim: int) -> nn.Embedding:
    """CSN-style masks: every entry 0.1, block [i·L, (i+1)·L) of row i set to 1, L = int(dim / A).

    Trainable, as in the reference (whose comment says otherwise).
    """
    masks = nn.Embedding(num_attributes, dim)
    block = int(dim / num_attributes)
    with torch.no_grad():
        masks.weight.fill_(0.1)
        for i in range(num_attributes):
            masks.weight[i, i * block : (i + 1) * block] = 1.0
    return masks


class AGMANHead(nn.Module):
    """The attribute-conditioned part of AG-MAN, from the fused map to unit embeddings."""

    def __init__(self, in_channels: int, num_attributes: int, dim: int = 512) -> None:
        super().__init__()
        self.dim = dim
        self.attr_embedding = nn.Embedding(num_attributes, dim)  # shared by ASA and ACA
        self.attr_transform1 = nn.Linear(dim, dim)
        self.conv1 = nn.Conv2d(in_channels, dim, kernel_size=1, bias=True)
        self.img_bn1 = nn.BatchNorm2d(dim)
        self.sa = SpatialAttention(kernel_size=7)
        self.attr_transform2 = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(2 * dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.w = nn.Parameter(torch.tensor(1.0))
        self.w1 = nn.Parameter(torch.tensor(1.0))
        self.w2 = nn.Parameter(torch.tensor(1.0))
        self.masks = csn_masks(num_attributes, dim)

    def project(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attribute-independent part: V = conv1(w·F) and the attention image tanh(BN(V))."""
        v = self.conv1(self.w * fused)
        return v, torch.tanh(self.img_bn1(v))

    def attention(self, img: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """ASA softmax map [B, H, W] for one attribute per image."""
        t = F.silu(self.attr_transform1(self.attr_embedding(ids)))
        scores = torch.einsum("bchw,bc->bhw", img, t) / math.sqrt(self.dim)
        return spatial_softmax(scores)

    def forward(self, v: torch.Tensor, img: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Unit embeddings [B, D], following the paper's steps literally."""
        emb = self.attr_embedding(ids)
        v1 = v * self.w1 * self.attention(img, ids).unsqueeze(1)
        v2 = v1 * self.sa(v1)
        g = v2.sum(dim=(2, 3))
        u = F.silu(self.attr_transform2(emb))
        m = torch.sigmoid(self.fc2(F.relu(self.fc1(torch.cat([g, u], dim=1)))))
        g2 = g * self.w2 * m * F.relu(self.masks(ids))
        return l2_normalize(g2)

    def forward_all(self, v: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        """Unit embeddings [B, K, D] for all K attributes, without materialising K copies of V.

        V1 = V·s with s = w1·M a per-position scalar, so mean_c V1 = s·mean_c V and
        max_c V1 = s·max_c V (s >= 0) or s·min_c V (s < 0); g = Σ_hw V·(s·CBAM).
        """
        batch, _, height, width = v.shape
        k = self.masks.num_embeddings
        emb = self.attr_embedding.weight
        t = F.silu(self.attr_transform1(emb))                                   # [K, D]
        scores = torch.einsum("bchw,kc->bkhw", img, t) / math.sqrt(self.dim)
        s = self.w1 * spatial_softmax(scores)                                   # [B, K, H, W]
        v_mean = v.mean(dim=1, keepdim=True)
        v_max, v_min = v.amax(dim=1, keepdim=True), v.amin(dim=1, keepdim=True)
        mean = s * v_mean
        amax = torch.where(s >= 0, s * v_max, s * v_min)
        gate = self.sa.from_pooled(mean.reshape(-1, height, width), amax.reshape(-1, height, width))
        weights = s * gate.view(batch, k, height, width)
        g = torch.einsum("bchw,bkhw->bkc", v, weights)                          # [B, K, D]
        u = F.silu(self.attr_transform2(emb)).unsqueeze(0).expand(batch, -1, -1)
        m = torch.sigmoid(self.fc2(F.relu(self.fc1(torch.cat([g, u], dim=2)))))
        g2 = g * self.w2 * m * F.relu(self.masks.weight)
        return l2_normalize(g2)


class AGMAN(AttributeEmbeddingModel):
    """AG-MAN: multi-level trunk + attribute-type classifier + AGMANHead."""

    model_name = "agman"
    has_classifier = True
    uses_fine_level = True

    def __init__(self, schema: AttributeSchema, trunk: Trunk, embed_dim: int = 512,
                 image_size: int = 224) -> None:
        super().__init__(schema, trunk, embed_dim, image_size)
        if not trunk.has_top and trunk.taps == "paper":
            raise ValueError("AG-MAN needs the trunk's top stage for its classification branch")
        # Late tap points (the product recipe) have no top stage: no attribute-type branch.
        self.has_classifier = trunk.has_top
        self.fusion = MultiLevelFusion(trunk.mid_channels, trunk.high_channels, trunk.fine_channels)
        if self.has_classifier:
            self.fc_embed = nn.Linear(trunk.top_channels, len(schema))
        self.head = AGMANHead(2 * trunk.high_channels, len(schema), embed_dim)

    def _maps(self, images: torch.Tensor):
        fine, mid = self.trunk.forward_levels(images)
        high = self.trunk.forward_high(mid)
        fused, x_local = self.fusion(mid, high, fine)
        return mid, high, fused, x_local

    def _features(self, images: torch.Tensor):
        mid, high, fused, _ = self._maps(images)
        return self.head.project(fused), mid, high

    def _heads(self, inputs, attribute_ids):
        return self.head(*inputs, attribute_ids)

    def _all_heads(self, inputs):
        return self.head.forward_all(*inputs)

    def forward(self, images: torch.Tensor, attribute_ids: AttributeIds) -> ModelOutput:
        """Training forward: embeddings plus attribute-type logits from the layer4 branch."""
        _, _, fused, x_local = self._maps(images)
        ids = self.attribute_tensor(attribute_ids, images.shape[0])
        if not self.has_classifier:
            return ModelOutput(self.head(*self.head.project(fused), ids), None)
        top = self.trunk.forward_top(x_local)
        logits = self.fc_embed(F.adaptive_avg_pool2d(top, 1).flatten(1))
        return ModelOutput(self.head(*self.head.project(fused), ids), logits)

    def attention_map(self, images: torch.Tensor, attribute_ids: AttributeIds) -> torch.Tensor:
        """``w1 · M``: the ASA map for each image's attribute, [B, H, W]."""
        (_, img), _, _ = self._features(images)
        ids = self.attribute_tensor(attribute_ids, images.shape[0])
        return self.head.w1 * self.head.attention(img, ids)
