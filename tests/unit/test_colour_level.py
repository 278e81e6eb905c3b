"""AG-MAN's colour level: CIELAB conversion and soft per-cell colour histograms."""

from __future__ import annotations

import pytest
import torch

from agman_milvus.core.model.colour import COLOUR_BINS, ColourLevel, _prototypes, srgb_to_lab
from agman_milvus.core.model.transforms import IMAGENET_MEAN, IMAGENET_STD


def _normalised(rgb: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (rgb - mean) / std


@pytest.mark.parametrize(("rgb", "lab"), [
    ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ((1.0, 0.0, 0.0), (53.24, 80.09, 67.20)),   # reference values of sRGB red in CIELAB (D65)
    ((0.0, 0.0, 1.0), (32.30, 79.19, -107.86)),
])
def test_srgb_to_lab_matches_reference_values(rgb, lab) -> None:
    got = srgb_to_lab(torch.tensor(rgb).view(1, 3, 1, 1)).flatten()
    assert torch.allclose(got, torch.tensor(lab), atol=0.05)


def test_cells_hold_the_histogram_of_their_patch() -> None:
    image = torch.zeros(1, 3, 160, 96)
    image[:, 0, :, :48] = 1.0            # left half red, right half black
    histograms = ColourLevel()(_normalised(image), IMAGENET_MEAN, IMAGENET_STD)
    assert histograms.shape == (1, COLOUR_BINS, 5, 3)   # ceil(160 / 32) x ceil(96 / 32)
    assert torch.allclose(histograms.sum(dim=1), torch.ones(1, 5, 3), atol=1e-5)
    grid, spacing = _prototypes()
    red = srgb_to_lab(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)).flatten()
    nearest_red = int(((grid - red) / spacing).square().sum(dim=1).argmin())
    nearest_black = int((grid / spacing).square().sum(dim=1).argmin())
    assert int(histograms[0, :, 2, 0].argmax()) == nearest_red
    assert int(histograms[0, :, 2, 2].argmax()) == nearest_black
    # the middle column straddles both halves: half the red of the left column
    middle, left = histograms[0, nearest_red, :, 1], histograms[0, nearest_red, :, 0]
    assert torch.allclose(middle, left / 2, atol=1e-4)
