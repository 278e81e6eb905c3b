"""Triplet sampler (spec §3.2): validity, seeding, uniform attributes, no hangs on bad pools."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from agman_milvus.training.readers import Label
from agman_milvus.training.sampler import NothingToSampleError, TripletSampler


def _labels() -> list[Label]:
    labels = []
    # attribute 0: values 0 (images 0-9), 1 (10-11), 2 (12: single image, never an anchor value)
    labels += [Label(i, 0, 0) for i in range(10)] + [Label(10, 0, 1), Label(11, 0, 1), Label(12, 0, 2)]
    # attribute 1 (multi-label images, DeepFashion-like): values 0 (0-4) and 1 (5-20)
    labels += [Label(i, 1, 0) for i in range(5)] + [Label(i, 1, 1) for i in range(5, 21)]
    return labels


def test_triplets_are_valid() -> None:
    labels = _labels()
    value = {(lab.image, lab.attribute): lab.value for lab in labels}
    triplets = TripletSampler(labels, num_attributes=2).sample(2000, np.random.default_rng(0))
    assert len(triplets) == 2000
    for t in triplets:
        assert t.anchor != t.positive
        assert value[t.anchor, t.attribute] == value[t.positive, t.attribute]
        assert value[t.negative, t.attribute] != value[t.anchor, t.attribute]


def test_attributes_and_values_are_uniform() -> None:
    triplets = TripletSampler(_labels(), 2).sample(4000, np.random.default_rng(1))
    attrs = Counter(t.attribute for t in triplets)
    assert abs(attrs[0] - 2000) < 200
    values = _labels()
    lookup = {(lab.image, lab.attribute): lab.value for lab in values}
    anchor_values = Counter(lookup[t.anchor, 0] for t in triplets if t.attribute == 0)
    # value 2 has one image: never an anchor; values 0 and 1 drawn equally often (per value).
    assert set(anchor_values) == {0, 1}
    assert abs(anchor_values[0] - anchor_values[1]) < 0.15 * attrs[0]
    # the single image of value 2 is still used as a negative
    assert any(t.negative == 12 for t in triplets)


def test_same_seed_same_triplets_and_epochs_differ() -> None:
    sampler = TripletSampler(_labels(), 2)
    a = sampler.sample(50, np.random.default_rng([7, 1]))
    b = sampler.sample(50, np.random.default_rng([7, 1]))
    c = sampler.sample(50, np.random.default_rng([7, 2]))
    assert a == b and a != c


def test_unsampleable_attribute_is_skipped() -> None:
    labels = _labels() + [Label(30, 2, 0), Label(31, 2, 1)]  # attribute 2: singletons only
    triplets = TripletSampler(labels, 3).sample(300, np.random.default_rng(0))
    assert {t.attribute for t in triplets} == {0, 1}


def test_nothing_sampleable_raises_clear_error() -> None:
    with pytest.raises(NothingToSampleError, match="at least two images"):
        TripletSampler([Label(0, 0, 0), Label(1, 0, 1)], 1)
    with pytest.raises(NothingToSampleError):  # one value only: no negatives
        TripletSampler([Label(0, 0, 0), Label(1, 0, 0)], 1)
    with pytest.raises(NothingToSampleError):
        TripletSampler([], 2)


def test_attribute_out_of_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="outside"):
        TripletSampler([Label(0, 3, 0)], 2)
