"""The readers on the real reference split files: counts must equal the spec's tables (§5.3)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from agman_milvus.training.readers import (
    read_deepfashion_labels,
    read_fashionai_label_csv,
    read_filenames,
    read_label_train,
    read_meta,
    read_retrieval_split,
    rebuild_fashionai_train,
)

pytestmark = pytest.mark.realdata

FASHIONAI_TEST_QUERIES = [422, 623, 535, 422, 341, 289, 703, 265]
FASHIONAI_TEST_CANDIDATES = [1703, 2383, 2088, 1722, 1401, 1269, 2734, 1100]
FASHIONAI_TRAIN = [17428, 24546, 20563, 17199, 13961, 12782, 26770, 11086]
DEEPFASHION_TEST_QUERIES = [1008, 1483, 1097, 1022, 915]
DEEPFASHION_TEST_CANDIDATES = [4271, 5914, 4364, 4030, 3521]


@pytest.fixture(scope="module")
def refdata(shared_dir: Path) -> Path:
    path = shared_dir / "refdata"
    if not path.is_dir():
        pytest.skip("shared/refdata is absent")
    return path


def _per_attribute(labels, n: int) -> list[int]:
    counts = Counter(label.attribute for label in labels)
    return [counts[a] for a in range(n)]


def test_meta(refdata: Path) -> None:
    fashionai = read_meta(refdata / "meta.json", "FashionAI")
    assert fashionai.names[0] == "skirt_length" and fashionai.names[-1] == "neck_design"
    assert [a.num_values for a in fashionai] == [6, 9, 8, 6, 5, 5, 10, 5]
    assert [a.num_values for a in read_meta(refdata / "meta.json", "DeepFashion")] == [
        156,
        218,
        180,
        216,
        230,
    ]


def test_fashionai_test_split_counts(refdata: Path) -> None:
    split = read_retrieval_split(refdata / "FashionAI", "test")
    assert _per_attribute(split.queries, 8) == FASHIONAI_TEST_QUERIES
    assert _per_attribute(split.candidates, 8) == FASHIONAI_TEST_CANDIDATES


@pytest.mark.parametrize("dataset,n", [("FashionAI", 18000), ("DeepFashion", 27625)])
@pytest.mark.parametrize("split_name", ["valid", "test"])
def test_every_image_exactly_once(refdata: Path, dataset: str, n: int, split_name: str) -> None:
    split = read_retrieval_split(refdata / dataset, split_name)  # refuses query/candidate overlap
    images = [label.image for label in split.queries + split.candidates]
    assert sorted(images) == list(range(n))
    assert len(read_filenames(refdata / dataset / f"filenames_{split_name}.txt")) == n
    assert 0.19 < len(split.queries) / n < 0.21


def test_fashionai_train_counts(refdata: Path) -> None:
    labels = read_label_train(refdata / "FashionAI" / "label_train.txt")
    assert len(labels) == 144_335
    assert _per_attribute(labels, 8) == FASHIONAI_TRAIN


@pytest.mark.parametrize("split_name", ["valid", "test"])
def test_fashionai_label_csv_agrees_with_split(refdata: Path, split_name: str) -> None:
    base = refdata / "FashionAI"
    schema = read_meta(refdata / "meta.json", "FashionAI")
    records = read_fashionai_label_csv(
        base / "asen_dev_branch" / split_name / "Annotations" / "label.csv", schema
    )
    filenames = read_filenames(base / f"filenames_{split_name}.txt")
    assert len(records) == len(filenames) == 18000
    assert all(name.endswith(record.path) for name, record in zip(filenames, records, strict=True))
    split = read_retrieval_split(base, split_name)
    expected = {label.image: (label.attribute, label.value) for label in split.queries + split.candidates}
    assert all(expected[i] == (r.attribute, r.value) for i, r in enumerate(records))
    # Rebuilding the train list from these records excludes all of them.
    names, labels = rebuild_fashionai_train(records, [filenames])
    assert names == [] and labels == []


def test_deepfashion_counts_and_value_rank_rule(refdata: Path) -> None:
    base = refdata / "DeepFashion"
    split = read_retrieval_split(base, "test")
    assert _per_attribute(split.queries, 5) == DEEPFASHION_TEST_QUERIES
    assert _per_attribute(split.candidates, 5) == DEEPFASHION_TEST_CANDIDATES
    by_image: dict[int, dict[int, list[int]]] = {}
    for label in read_deepfashion_labels(base / "label_test.txt"):
        by_image.setdefault(label.image, {}).setdefault(label.attribute, []).append(label.global_id)
    pairs: dict[int, dict[int, int]] = {}
    for label in split.queries + split.candidates:
        ids = by_image[label.image][label.attribute]  # the split's attribute is one of its types
        if len(ids) == 1:
            seen = pairs.setdefault(label.attribute, {}).setdefault(ids[0], label.value)
            assert seen == label.value
    for mapping in pairs.values():  # value id = rank of the global id within its type
        values = [mapping[g] for g in sorted(mapping)]
        assert values == sorted(values) and len(set(values)) == len(values)
    assert sum(len(m) for m in pairs.values()) > 600
