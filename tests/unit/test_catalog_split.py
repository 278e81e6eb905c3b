"""Catalog CSV -> schema and deterministic train / valid / test splits."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from agman_milvus.training.catalog_split import read_catalog, split_catalog
from agman_milvus.training.readers import FormatError


def _write_catalog(path: Path, n: int = 400) -> Path:
    colours = ["Red", "Blue", "Green", "Black"]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "id", "colour", "shape", "usage"])
        for i in range(n):
            shape = "Circle" if i % 2 else "Square"
            if i == 5:
                shape = "Star"  # a rare value (1 image): dropped by min_count
            usage = "" if i % 3 == 0 else "Casual"  # missing cells
            writer.writerow([f"images/{i}.jpg", str(1000 + i), colours[i % 4], shape, usage])
    return path


def test_schema_keeps_values_with_min_count(tmp_path: Path) -> None:
    catalog = read_catalog(_write_catalog(tmp_path / "m.csv"), ["colour", "shape", "usage"], min_count=5)
    assert catalog.schema.names == ("colour", "shape", "usage")
    assert catalog.schema["colour"].values == ("Black", "Blue", "Green", "Red")
    assert catalog.schema["shape"].values == ("Circle", "Square")  # "Star" dropped
    assert catalog.schema["usage"].values == ("Casual",)
    image5 = {lab.attribute for lab in catalog.labels if lab.image == 5}
    assert image5 == {0, 2}  # no shape label, still coloured; usage present (5 % 3 != 0)
    assert catalog.image_path(0) == tmp_path / "images/0.jpg"


def test_missing_column_and_no_values_are_errors(tmp_path: Path) -> None:
    path = _write_catalog(tmp_path / "m.csv", n=20)
    with pytest.raises(FormatError, match="missing column"):
        read_catalog(path, ["colour", "pattern"])
    with pytest.raises(FormatError, match="no value with >= 100"):
        read_catalog(path, ["colour"], min_count=100)


def test_split_is_deterministic_disjoint_and_one_label_per_eval_image(tmp_path: Path) -> None:
    catalog = read_catalog(
        _write_catalog(tmp_path / "m.csv", n=1000), ["colour", "shape", "usage"], min_count=5
    )
    split = split_catalog(catalog, seed=0, test_fraction=0.3, valid_fraction=0.1, query_fraction=0.2)
    again = split_catalog(catalog, seed=0, test_fraction=0.3, valid_fraction=0.1, query_fraction=0.2)
    assert split == again
    train_images = {lab.image for lab in split.train}
    eval_sets = []
    for part in (split.valid, split.test):
        images = [lab.image for lab in part.queries + part.candidates]
        assert len(images) == len(set(images))  # every eval image exactly once
        eval_sets.append(set(images))
    assert not (eval_sets[0] & eval_sets[1]) and not (train_images & (eval_sets[0] | eval_sets[1]))
    n_eval = len(eval_sets[0]) + len(eval_sets[1])
    assert 0.33 < n_eval / 1000 < 0.47
    n_test = len(eval_sets[1])
    assert 0.25 < n_test / 1000 < 0.35
    queries = len(split.test.queries) + len(split.valid.queries)
    assert 0.14 < queries / n_eval < 0.26
    # train images keep all their labels (several attributes per image)
    per_image = {}
    for lab in split.train:
        per_image.setdefault(lab.image, set()).add(lab.attribute)
    assert max(len(a) for a in per_image.values()) == 3
    # eval images are spread over attributes
    assert {lab.attribute for lab in split.test.queries + split.test.candidates} == {0, 1, 2}
    # a different seed gives a different split
    assert split_catalog(catalog, seed=1).test != split.test


def test_split_depends_only_on_seed_and_image_id(tmp_path: Path) -> None:
    full = read_catalog(_write_catalog(tmp_path / "m.csv", n=300), ["colour"], min_count=1)
    part = read_catalog(_write_catalog(tmp_path / "p.csv", n=150), ["colour"], min_count=1)

    def assignment(catalog, split):
        out = {}
        for name, labels in (("train", split.train), ("vq", split.valid.queries),
                             ("vc", split.valid.candidates), ("tq", split.test.queries),
                             ("tc", split.test.candidates)):
            for lab in labels:
                out[catalog.ids[lab.image]] = name
        return out

    a = assignment(full, split_catalog(full, seed=5))
    b = assignment(part, split_catalog(part, seed=5))
    assert all(a[image_id] == where for image_id, where in b.items())


def test_bad_fractions_are_rejected(tmp_path: Path) -> None:
    catalog = read_catalog(_write_catalog(tmp_path / "m.csv", n=20), ["colour"], min_count=1)
    with pytest.raises(ValueError):
        split_catalog(catalog, test_fraction=0.7, valid_fraction=0.4)
    with pytest.raises(ValueError):
        split_catalog(catalog, query_fraction=0.0)
