"""Image preprocessing that travels with the model (as open_clip does).

Resize the shorter side to ``size``, centre-crop ``size x size``, scale to [0, 1], normalise with
the ImageNet mean/std: the reference's eval transform (spec §3.3), in PIL + numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """PIL image -> float tensor [3, size, size]."""

    size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    hflip: bool = False

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = resize_center_crop(image.convert("RGB"), self.size)
        if self.hflip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = (array - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self(image) for image in images])


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (torchvision's Resize(int) rounding), then a centred square crop."""
    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))
