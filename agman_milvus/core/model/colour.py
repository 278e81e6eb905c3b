"""AG-MAN's lowest level for the product recipe: a map of soft CIELAB colour histograms.

ImageNet trunks are trained to ignore colour (colour jitter is one of their augmentations), so
their maps tell "navy blue" from "black" poorly. This level is parameter-free: the input is
un-normalised to sRGB, area-downsampled to stride 8, converted to CIELAB (D65), and each pixel is
softly assigned to a fixed grid of Lab prototypes (6 lightness x 5 a* x 5 b* = 150 bins,
softmax over squared distances in units of the grid spacing); the assignments are averaged over
cells of the high map's stride (32), so each cell holds the colour histogram of its patch.
AG-MAN appends this map to its fused map, and its attribute-guided attention pools the garment's
cells, not the background's.

Being a pure function of the image, it is cached with the frozen mid maps during training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LIGHTNESS_LEVELS = torch.linspace(5.0, 95.0, 6)
CHROMA_LEVELS = torch.linspace(-60.0, 60.0, 5)
COLOUR_BINS = len(LIGHTNESS_LEVELS) * len(CHROMA_LEVELS) ** 2
PIXEL_STRIDE = 8
CELL_STRIDE = 32

# sRGB (linear) -> XYZ, rows scaled by the D65 white point so that white maps to (1, 1, 1)
_RGB_TO_XYZ = torch.tensor([[0.4124564, 0.3575761, 0.1804375],
                            [0.2126729, 0.7151522, 0.0721750],
                            [0.0193339, 0.1191920, 0.9503041]])
_D65 = torch.tensor([0.95047, 1.0, 1.08883])


def srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] sRGB in [0, 1] -> CIELAB [B, 3, H, W] (L in [0, 100], a*/b* about ±100)."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    matrix = (_RGB_TO_XYZ / _D65[:, None]).to(rgb)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-6) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def _prototypes() -> tuple[torch.Tensor, torch.Tensor]:
    """The Lab grid [P, 3] and its per-axis spacing [3]."""
    grid = torch.cartesian_prod(LIGHTNESS_LEVELS, CHROMA_LEVELS, CHROMA_LEVELS)
    spacing = torch.tensor([float(LIGHTNESS_LEVELS[1] - LIGHTNESS_LEVELS[0]),
                            float(CHROMA_LEVELS[1] - CHROMA_LEVELS[0]),
                            float(CHROMA_LEVELS[1] - CHROMA_LEVELS[0])])
    return grid, spacing


class ColourLevel(nn.Module):
    """Normalised images [B, 3, H, W] -> colour histograms [B, COLOUR_BINS, ⌈H/32⌉, ⌈W/32⌉]."""

    channels = COLOUR_BINS

    def __init__(self) -> None:
        super().__init__()
        grid, spacing = _prototypes()
        # non-persistent: fixed constants, not weights (checkpoints and their digests skip them)
        self.register_buffer("grid", grid / spacing, persistent=False)
        self.register_buffer("spacing", spacing, persistent=False)

    def forward(self, images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
        """``images`` normalised with ``mean`` / ``std`` (per channel)."""
        height, width = images.shape[-2:]
        mean_t = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
        std_t = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
        rgb = (images.float() * std_t + mean_t).clamp(0.0, 1.0)
        rgb = F.adaptive_avg_pool2d(rgb, (math.ceil(height / PIXEL_STRIDE), math.ceil(width / PIXEL_STRIDE)))
        lab = srgb_to_lab(rgb) / self.spacing.view(1, 3, 1, 1)
        pixels = lab.permute(0, 2, 3, 1)                                      # [B, h, w, 3]
        grid = self.grid.expand(images.shape[0], -1, -1)
        distances = torch.cdist(pixels.flatten(1, 2), grid)                  # [B, h*w, P]
        weights = torch.softmax(-distances.square(), dim=-1)
        histogram = weights.transpose(1, 2).reshape(images.shape[0], -1, *pixels.shape[1:3])
        cells = (math.ceil(height / CELL_STRIDE), math.ceil(width / CELL_STRIDE))
        return F.adaptive_avg_pool2d(histogram, cells)
