"""Images of a training catalog: the triplet dataset for training, decoding for the engine.

Images are decoded by the project's one safe decoder, :func:`agman_milvus.core.images.load_image`.
An image that fails to decode is logged and skipped. In training, ``__getitem__`` returns
``None`` and :func:`collate_skipping` drops it (a triplet is dropped whole) and reports how many
it dropped, so a trainer can count them across DataLoader worker processes. Evaluation and the
feature cache embed through :mod:`agman_milvus.core.engine`, whose decode functions build on
:func:`decode_image`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from agman_milvus.core.engine import Decoded
from agman_milvus.training.readers import Triplet

logger = logging.getLogger(__name__)

Transform = Callable[[Image.Image], torch.Tensor]


class TrainTransform:
    """The model's eval transform (resize, centre crop, normalise) with a random horizontal flip.

    Flipping the decoded image before the deterministic crop is the same as flipping after it
    (the crop is centred), so this equals the reference Resize -> CenterCrop -> HFlip.
    """

    def __init__(self, preprocess: Transform, flip_probability: float = 0.5) -> None:
        self.preprocess = preprocess
        self.flip_probability = flip_probability

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if float(torch.rand(())) < self.flip_probability:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self.preprocess(image)


class ImageTable:
    """Maps an integer image id to a file: ``root / relative[id]``."""

    def __init__(self, root: str | Path, relative: Sequence[str]) -> None:
        self.root = Path(root)
        self.relative = list(relative)

    def __len__(self) -> int:
        return len(self.relative)

    def path(self, image: int) -> Path:
        return self.root / self.relative[image]


def decode_image(table: ImageTable, image: int, transform: Transform) -> Decoded:
    """Decode and transform one image: its tensor, or the failure (logged as a warning)."""
    from agman_milvus.core.images import ImageError, load_image

    path = table.path(image)
    try:
        picture = load_image(path)
    except (ImageError, OSError) as error:
        logger.warning("skipping image %d (%s): %s", image, path, error)
        return Decoded(failure=str(error))
    return Decoded(transform(picture))


def load_tensor(table: ImageTable, image: int, transform: Transform) -> torch.Tensor | None:
    """Decode and transform one image; ``None`` (with a warning) when it cannot be decoded."""
    return decode_image(table, image, transform).inputs  # type: ignore[return-value]


class TripletDataset(Dataset):
    """Items ``(anchor, negative, positive, attribute)`` image tensors, or ``None``."""

    def __init__(self, triplets: Sequence[Triplet], table: ImageTable, transform: Transform) -> None:
        self.triplets = list(triplets)
        self.table = table
        self.transform = transform

    def __len__(self) -> int:
        return len(self.triplets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...] | None:
        triplet = self.triplets[index]
        images = []
        for image in (triplet.anchor, triplet.negative, triplet.positive):
            tensor = load_tensor(self.table, image, self.transform)
            if tensor is None:
                return None
            images.append(tensor)
        return (*images, torch.tensor(triplet.attribute, dtype=torch.long))


def collate_skipping(batch: list[tuple[torch.Tensor, ...] | None]) -> tuple[list[torch.Tensor], int]:
    """Stack the decodable items field by field; returns (fields, number of dropped items)."""
    kept = [item for item in batch if item is not None]
    dropped = len(batch) - len(kept)
    if not kept:
        return [], dropped
    return [torch.stack(field) for field in zip(*kept, strict=True)], dropped
