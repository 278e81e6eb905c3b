"""Image preprocessing that travels with the model (as open_clip does).

Resize the shorter side to ``size``, centre-crop ``size x size``, scale to [0, 1], normalise with
the ImageNet mean/std: the reference's eval transform (spec §3.3), in PIL + numpy. The resize
never allocates more than :data:`MAX_RESIZED_SQUARES` squares of the output size, whatever the
input's shape (the decoder already refuses extreme aspect ratios; this bounds any other caller).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Largest intermediate image of :func:`resize_center_crop`, in ``size x size`` squares. Shapes
#: up to this aspect ratio follow the reference exactly (resize, then crop); beyond it the same
#: centred region is cut from the source first, so memory stays bounded.
MAX_RESIZED_SQUARES = 32


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
    if new_w * new_h > MAX_RESIZED_SQUARES * size * size:
        left, top = (new_w - size) / 2.0, (new_h - size) / 2.0
        sx, sy = width / new_w, height / new_h
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))
