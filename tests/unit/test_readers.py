"""Reference-format readers on small files written by the tests (LF and CRLF)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agman_milvus.core.schema import AttributeSchema
from agman_milvus.training.readers import (
    DeepFashionLabel,
    FormatError,
    Label,
    deepfashion_value_ids,
    read_deepfashion_labels,
    read_fashionai_label_csv,
    read_filenames,
    read_label_train,
    read_labels,
    read_meta,
    read_retrieval_split,
    rebuild_fashionai_train,
)
from agman_milvus.training.zappos import read_triplet_list, read_zappos_filenames, read_zappos_triplets


def _write(path: Path, lines: list[str], crlf: bool = False) -> Path:
    path.write_bytes(("\r\n" if crlf else "\n").join(lines).encode() + (b"\r\n" if crlf else b"\n"))
    return path


@pytest.mark.parametrize("crlf", [False, True])
def test_filenames_and_labels(tmp_path: Path, crlf: bool) -> None:
    names = _write(tmp_path / "filenames_test.txt", ["a/x.jpg", "b/y.jpg"], crlf)
    assert read_filenames(names) == ["a/x.jpg", "b/y.jpg"]
    train = _write(tmp_path / "label_train.txt", ["0 7 3", "1 1 7 2 4", ""], crlf)
    assert read_label_train(train) == [Label(0, 7, 3), Label(1, 1, 7), Label(1, 2, 4)]
    _write(tmp_path / "query_test.txt", ["0 1 2"], crlf)
    _write(tmp_path / "candidate_test.txt", ["1 1 5", "2 0 0"], crlf)
    split = read_retrieval_split(tmp_path, "test")
    assert split.queries == [Label(0, 1, 2)]
    assert split.candidates == [Label(1, 1, 5), Label(2, 0, 0)]


def test_malformed_lines_name_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match=r"label_train.txt:2"):
        read_label_train(_write(tmp_path / "label_train.txt", ["0 1 2", "1 1"]))
    with pytest.raises(FormatError, match=r"q.txt:1: expected integers"):
        read_labels(_write(tmp_path / "q.txt", ["x 1 2"]))
    with pytest.raises(FormatError, match="blank line"):
        read_filenames(_write(tmp_path / "f.txt", ["a", "", "b"]))


def test_query_candidate_overlap_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / "query_valid.txt", ["3 0 1"])
    _write(tmp_path / "candidate_valid.txt", ["3 0 1"])
    with pytest.raises(FormatError, match="both query and candidate"):
        read_retrieval_split(tmp_path, "valid")


def test_deepfashion_tab_labels_with_trailing_tabs_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "label_test.txt"
    path.write_bytes(b"0\t1\t365\t1\t560\t5\t656\t\t\t\t\r\n1\t4\t156\t\t\t\r\n")
    labels = read_deepfashion_labels(path)
    assert labels == [DeepFashionLabel(0, 0, 365), DeepFashionLabel(0, 0, 560),
                      DeepFashionLabel(0, 4, 656), DeepFashionLabel(1, 3, 156)]
    assert deepfashion_value_ids({0: [560, 365, 12], 4: [656]}) == {12: 0, 365: 1, 560: 2, 656: 0}


def test_meta_json_with_crlf(tmp_path: Path) -> None:
    meta = {"FashionAI": {"ATTRIBUTES": ["skirt_length", "neck_design"],
                          "ATTRIBUTES_NUM": {"skirt_length": 6, "neck_design": 5}}}
    path = tmp_path / "meta.json"
    path.write_bytes(json.dumps(meta, indent=1).replace("\n", "\r\n").encode())
    schema = read_meta(path)
    assert schema.names == ("skirt_length", "neck_design")
    assert schema["neck_design"].num_values == 5


def test_fashionai_label_csv_and_train_rebuild(tmp_path: Path) -> None:
    schema = AttributeSchema.from_dict({"skirt_length": 6, "sleeve_length": 9})
    csv = _write(tmp_path / "label.csv", [
        "Images/sleeve_length_labels/a.jpg,sleeve_length_labels,nnnnynnnn",
        "Images/skirt_length_labels/b.jpg,skirt_length_labels,nmynnn",
        "Images/skirt_length_labels/c.jpg,skirt_length_labels,ynnnnn",
    ], crlf=True)
    records = read_fashionai_label_csv(csv, schema)
    assert [(r.attribute, r.value) for r in records] == [(1, 4), (0, 2), (0, 0)]
    names, labels = rebuild_fashionai_train(
        records, [["fashionAI_attributes_train1/Images/skirt_length_labels/b.jpg"], []])
    assert names == ["Images/sleeve_length_labels/a.jpg", "Images/skirt_length_labels/c.jpg"]
    assert labels == [Label(0, 1, 4), Label(1, 0, 0)]


def test_fashionai_label_csv_errors(tmp_path: Path) -> None:
    schema = AttributeSchema.from_dict({"skirt_length": 6})
    with pytest.raises(FormatError, match="exactly one 'y'"):
        read_fashionai_label_csv(
            _write(tmp_path / "a.csv", ["Images/x.jpg,skirt_length_labels,nnnnnn"]), schema
        )
    with pytest.raises(FormatError, match="6 values"):
        read_fashionai_label_csv(_write(tmp_path / "b.csv", ["Images/x.jpg,skirt_length_labels,ynn"]), schema)


def test_zappos_lists_far_is_negative_close_is_positive(tmp_path: Path) -> None:
    _write(tmp_path / "filenames.json", ["shoes/a.jpg", "shoes/b.jpg", "shoes/c.jpg"], crlf=True)
    assert read_zappos_filenames(tmp_path / "filenames.json")[2] == "shoes/c.jpg"
    first = read_triplet_list(_write(tmp_path / "heel_tripletlist_train.txt", ["0 1 2"]), 3)[0]
    assert (first.anchor, first.negative, first.positive, first.attribute) == (0, 1, 2, 3)
    for condition, name in enumerate(["class", "closure", "gender", "heel"]):
        _write(tmp_path / f"{name}_tripletlist_train.txt",
               [f"{condition} {i} {i + 1}" for i in range(10)])
    triplets = read_zappos_triplets(tmp_path, "train", 20, seed=3)
    assert len(triplets) == 20  # n * len(conditions) / 4 of the 40 concatenated
    assert {t.attribute for t in triplets} <= {0, 1, 2, 3}
    assert all(t.anchor == t.attribute for t in triplets)
    assert triplets == read_zappos_triplets(tmp_path, "train", 20, seed=3)
    assert triplets != read_zappos_triplets(tmp_path, "train", 20, seed=4)
    assert len(read_zappos_triplets(tmp_path, "train", 20, conditions=[0, 1])) == 10
