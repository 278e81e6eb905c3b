"""Attribute-conditioned triplet sampling (ASEN's ``TripletGenerator`` logic, made safe).

For each triplet: pick an attribute uniformly, then a value uniformly among that attribute's
values with at least two images (uniform over *values*, so rare values are over-sampled, as in
the reference); anchor and positive are two different images with that value, the negative is
an image of the same attribute with a different value. Attributes with no value of >= 2 images,
or with only one value, are skipped, so sampling can never loop forever; if nothing at all is
sampleable :class:`NothingToSampleError` says why.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

from agman_milvus.core.errors import AgmanError
from agman_milvus.training.readers import Label, Triplet

logger = logging.getLogger(__name__)


class NothingToSampleError(AgmanError, ValueError):
    """No attribute has a value with two images and a second value for negatives."""


class _Pool:
    """Images of one attribute grouped by value (contiguous blocks of ``images``)."""

    def __init__(self, by_value: dict[int, list[int]]) -> None:
        values = sorted(by_value)
        self.images = np.concatenate([np.asarray(sorted(set(by_value[v])), dtype=np.int64)
                                      for v in values])
        sizes = np.asarray([len(set(by_value[v])) for v in values], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.sizes = sizes
        self.values = np.asarray(values, dtype=np.int64)
        self.anchor_values = np.flatnonzero(sizes >= 2)  # indices into values

    @property
    def sampleable(self) -> bool:
        return len(self.anchor_values) > 0 and len(self.values) >= 2


class TripletSampler:
    """Draws (anchor, negative, positive, attribute) triplets from training labels."""

    def __init__(self, labels: Iterable[Label], num_attributes: int) -> None:
        grouped: dict[int, dict[int, list[int]]] = {}
        labels = list(labels)
        #: every image id that appears in the training labels
        self.images: list[int] = sorted({label.image for label in labels})
        for label in labels:
            if not 0 <= label.attribute < num_attributes:
                raise ValueError(f"label {label} has attribute id outside 0..{num_attributes - 1}")
            grouped.setdefault(label.attribute, {}).setdefault(label.value, []).append(label.image)
        self.num_attributes = num_attributes
        self._pools: dict[int, _Pool] = {}
        for attribute, by_value in sorted(grouped.items()):
            pool = _Pool(by_value)
            if pool.sampleable:
                self._pools[attribute] = pool
            else:
                logger.warning("attribute %d cannot form triplets (needs one value with 2 "
                               "images and a second value); skipped", attribute)
        skipped = set(range(num_attributes)) - set(self._pools)
        if skipped:
            logger.warning("no triplets for attribute id(s) %s", sorted(skipped))
        if not self._pools:
            raise NothingToSampleError(
                "no attribute can form a triplet: each needs a value with at least two images "
                "and at least one image with another value"
            )
        self.attributes = np.asarray(sorted(self._pools), dtype=np.int64)

    def sample(self, n: int, rng: np.random.Generator) -> list[Triplet]:
        """``n`` fresh triplets; call again each epoch for re-sampling."""
        chosen = rng.choice(self.attributes, size=n)
        out: list[Triplet] = []
        for attribute in chosen.tolist():
            pool = self._pools[attribute]
            v = int(rng.choice(pool.anchor_values))
            start, size = int(pool.starts[v]), int(pool.sizes[v])
            i, j = rng.choice(size, size=2, replace=False)
            # Negative: uniform over the attribute's images outside the anchor's value block.
            r = int(rng.integers(len(pool.images) - size))
            k = r if r < start else r + size
            out.append(Triplet(int(pool.images[start + i]), int(pool.images[k]),
                               int(pool.images[start + j]), attribute))
        return out
