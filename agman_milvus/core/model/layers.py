"""Small building blocks shared by the attribute-conditioned heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-12


def l2_normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Unit vectors along ``dim``; the eps keeps all-zero vectors finite (the reference has none)."""
    return F.normalize(x, p=2.0, dim=dim, eps=EPS)


def spatial_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last two (spatial) dimensions."""
    shape = scores.shape
    return torch.softmax(scores.flatten(-2), dim=-1).view(shape)


class SpatialAttention(nn.Module):
    """CBAM spatial attention: sigmoid(conv7x7([mean_c x, max_c x])), no bias."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate of shape [B, 1, H, W] for a map ``x`` of shape [B, C, H, W]."""
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv1(pooled))

    def from_pooled(self, mean: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        """The same gate from precomputed channel mean/max maps of shape [N, H, W]."""
        return torch.sigmoid(self.conv1(torch.stack([mean, amax], dim=1))).squeeze(1)


class GeM(nn.Module):
    """Generalised-mean pooling over H, W (SSCD-style copy descriptors). Inputs are clamped >= eps."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p, self.eps = p, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)
