"""The value head: learned value proxies per attribute, and the retrieval vector they shape.

The product recipe trains each attribute embedding ``e`` (unit vector) as a normalised-softmax
classifier of the attribute's *value*: logits ``scale · cos(e, proxy_v)``. At inference the head
blends ``e`` with the value posterior mapped back onto the unit proxies:

    p = softmax(scale · cos(e, P)),   s = normalize(p @ normalize(P)),
    out = normalize((1 - weight) · e + weight · s)

``weight = 0`` returns ``e`` unchanged; ``weight = 1`` ranks by the posterior alone (two images of
the same confident value get the same vector), in between the posterior decides *which value*
and ``e`` still orders the images within it. The output has the embedding's size, so Milvus
collections are unchanged. Scale and weight are buffers: they are part of the weights digest,
so a checkpoint's model version changes with them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from agman_milvus.core.model.layers import l2_normalize


class ValueHead(nn.Module):
    """``value_counts[k]`` proxies of size ``dim`` for attribute k, plus the inference blend."""

    def __init__(
        self, value_counts: Sequence[int], dim: int, scale: float = 16.0, weight: float = 0.0
    ) -> None:
        super().__init__()
        self.proxies = nn.ParameterList(
            nn.Parameter(torch.randn(max(1, n), dim) * 0.01) for n in value_counts)
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("weight", torch.tensor(0.0))
        self.set_weight(weight)

    def set_weight(self, weight: float) -> None:
        """Blend ``weight`` of the posterior into the retrieval vectors from now on (in [0, 1])."""
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"value head weight must lie in [0, 1], got {weight}")
        self.weight.fill_(float(weight))

    def logits(self, embeddings: torch.Tensor, attribute: int) -> torch.Tensor:
        """Value logits [B, V] of unit embeddings [B, D] for one attribute."""
        return self.scale * embeddings @ F.normalize(self.proxies[attribute], dim=1).T

    def blend(self, embeddings: torch.Tensor, attribute: int) -> torch.Tensor:
        """Retrieval vectors [B, D] of unit embeddings [B, D] for one attribute."""
        if float(self.weight) == 0.0:
            return embeddings
        proxies = F.normalize(self.proxies[attribute].to(embeddings.dtype), dim=1)
        posterior = torch.softmax(self.scale * embeddings @ proxies.T, dim=1)
        snapped = l2_normalize(posterior @ proxies)
        return l2_normalize((1.0 - self.weight) * embeddings + self.weight * snapped)

    def forward(self, embeddings: torch.Tensor, attribute_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Retrieval vectors for [B, K, D] (all attributes) or [B, D] with one id per image."""
        out = torch.empty_like(embeddings)
        if attribute_ids is None:
            for k in range(embeddings.shape[1]):
                out[:, k] = self.blend(embeddings[:, k], k)
            return out
        for k in attribute_ids.unique().tolist():
            rows = attribute_ids == k
            out[rows] = self.blend(embeddings[rows], k)
        return out

    def config(self) -> dict[str, float]:
        return {"scale": float(self.scale), "weight": float(self.weight)}
