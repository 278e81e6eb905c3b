"""Readers for the reference (ASEN / AG-MAN) split files.

Every reader strips *all* surrounding whitespace from each line and splits on any whitespace,
so CRLF files (the copies distributed with ASEN++), tab-separated DeepFashion labels with
trailing tabs, and LF files all read the same. Blank lines are skipped; a malformed line raises
:class:`FormatError` naming the file and the line number.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from agman_milvus.core.errors import AgmanError
from agman_milvus.core.schema import AttributeSchema

logger = logging.getLogger(__name__)


class FormatError(AgmanError, ValueError):
    """A split or label file does not have the expected format."""


class Label(NamedTuple):
    """One (image, attribute, value) annotation; ids are 0-based."""

    image: int
    attribute: int
    value: int


class Triplet(NamedTuple):
    """A triplet in sampler order: anchor, negative (far), positive (close), attribute id."""

    anchor: int
    negative: int
    positive: int
    attribute: int


@dataclass(frozen=True)
class RetrievalSplit:
    """A FashionAI-style evaluation split: disjoint queries and candidates, one label each."""

    queries: list[Label]
    candidates: list[Label]

    def __post_init__(self) -> None:
        overlap = {q.image for q in self.queries} & {c.image for c in self.candidates}
        if overlap:
            raise FormatError(
                f"{len(overlap)} images are both query and candidate (e.g. {min(overlap)})"
            )


def _lines(path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, whitespace-split fields) for each non-blank line."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if fields:
                yield number, fields


def _ints(path: str | Path, number: int, fields: Sequence[str]) -> list[int]:
    try:
        return [int(f) for f in fields]
    except ValueError:
        raise FormatError(f"{path}:{number}: expected integers, got {' '.join(fields)!r}") from None


def read_meta(path: str | Path, dataset: str = "FashionAI") -> AttributeSchema:
    """The attribute schema of ``dataset`` in a reference ``meta.json``."""
    return AttributeSchema.from_meta_json(path, dataset)


def read_filenames(path: str | Path) -> list[str]:
    """``filenames_*.txt``: one relative image path per line; the 0-based line index is the id."""
    names: list[str] = []
    with open(path, encoding="utf-8-sig", newline="") as handle:
        for number, line in enumerate(handle, start=1):
            name = line.strip()
            if not name:
                raise FormatError(f"{path}:{number}: blank line would shift every image id")
            names.append(name)
    return names


def read_label_train(path: str | Path) -> list[Label]:
    """``label_train.txt``: ``img attr val [attr val ...]``, one Label per (attr, val) pair."""
    labels: list[Label] = []
    for number, fields in _lines(path):
        values = _ints(path, number, fields)
        if len(values) < 3 or len(values) % 2 == 0:
            raise FormatError(f"{path}:{number}: expected 'img attr val [attr val ...]'")
        image = values[0]
        for i in range(1, len(values), 2):
            labels.append(Label(image, values[i], values[i + 1]))
    return labels


def read_labels(path: str | Path) -> list[Label]:
    """``query_*.txt`` / ``candidate_*.txt``: exactly ``img attr val`` per line."""
    labels: list[Label] = []
    for number, fields in _lines(path):
        if len(fields) != 3:
            raise FormatError(f"{path}:{number}: expected 'img attr val', got {len(fields)} fields")
        labels.append(Label(*_ints(path, number, fields)))
    return labels


def read_retrieval_split(directory: str | Path, split: str) -> RetrievalSplit:
    """``query_<split>.txt`` and ``candidate_<split>.txt`` of one dataset directory."""
    directory = Path(directory)
    return RetrievalSplit(
        queries=read_labels(directory / f"query_{split}.txt"),
        candidates=read_labels(directory / f"candidate_{split}.txt"),
    )


class DeepFashionLabel(NamedTuple):
    """One DeepFashion annotation: attribute type (0-based) and the global attribute id."""

    image: int
    attribute: int
    global_id: int


def read_deepfashion_labels(path: str | Path) -> list[DeepFashionLabel]:
    """DeepFashion ``label_*.txt``: ``img (type_1based global_id)*``, tab separated.

    The type is converted to a 0-based attribute id. The value id inside an attribute is the
    rank of ``global_id`` among that type's global ids (see :func:`deepfashion_value_ids`).
    """
    labels: list[DeepFashionLabel] = []
    for number, fields in _lines(path):
        values = _ints(path, number, fields)
        if len(values) % 2 == 0:
            raise FormatError(f"{path}:{number}: expected 'img type id [type id ...]'")
        for i in range(1, len(values), 2):
            if values[i] < 1:
                raise FormatError(f"{path}:{number}: attribute type {values[i]} is not 1-based")
            labels.append(DeepFashionLabel(values[0], values[i] - 1, values[i + 1]))
    return labels


def deepfashion_value_ids(global_ids_by_attribute: dict[int, Sequence[int]]) -> dict[int, int]:
    """Map each global DeepFashion attribute id to its value id (rank within its type)."""
    mapping: dict[int, int] = {}
    for ids in global_ids_by_attribute.values():
        for rank, gid in enumerate(sorted(set(ids))):
            mapping[gid] = rank
    return mapping


class FashionAIRecord(NamedTuple):
    """One row of a FashionAI ``Annotations/label.csv``."""

    path: str
    attribute: int
    value: int


def read_fashionai_label_csv(path: str | Path, schema: AttributeSchema) -> list[FashionAIRecord]:
    """FashionAI ``label.csv`` rows ``Images/<attr>_labels/x.jpg,<attr>_labels,nnynn``.

    The value is the 0-based position of the single ``y`` (``m`` = maybe is ignored).
    """
    records: list[FashionAIRecord] = []
    for number, fields in _lines(path):
        parts = "".join(fields).split(",")
        if len(parts) != 3:
            raise FormatError(f"{path}:{number}: expected 'path,attr_labels,marks'")
        image, task, marks = parts
        name = task.removesuffix("_labels")
        attribute = schema.index(name)
        if marks.count("y") != 1:
            raise FormatError(f"{path}:{number}: expected exactly one 'y' in {marks!r}")
        if len(marks) != schema[attribute].num_values:
            raise FormatError(
                f"{path}:{number}: {len(marks)} marks but {name} has "
                f"{schema[attribute].num_values} values"
            )
        records.append(FashionAIRecord(image, attribute, marks.index("y")))
    return records


def rebuild_fashionai_train(
    records: Sequence[FashionAIRecord], excluded_filenames: Sequence[Sequence[str]]
) -> tuple[list[str], list[Label]]:
    """The FashionAI train list: every label.csv image not listed in a valid/test filename list.

    ``records`` come from the raw ``Annotations/label.csv`` of train1/train2 (paths may carry a
    ``fashionAI_attributes_trainN/`` prefix or not); ``excluded_filenames`` are the contents of
    ``filenames_valid.txt`` and ``filenames_test.txt``. Returns (filenames, labels) where the
    label image ids index the returned filenames, like ``filenames_train.txt`` would.
    """
    excluded = {_image_key(name) for names in excluded_filenames for name in names}
    filenames: list[str] = []
    labels: list[Label] = []
    seen: set[str] = set()
    for record in records:
        key = _image_key(record.path)
        if key in excluded or key in seen:
            continue
        seen.add(key)
        labels.append(Label(len(filenames), record.attribute, record.value))
        filenames.append(record.path)
    logger.info("rebuilt FashionAI train: %d images (%d excluded)", len(filenames), len(excluded))
    return filenames, labels


def _image_key(path: str) -> str:
    """``Images/<attr>_labels/<hash>.jpg`` regardless of a ``fashionAI_attributes_*`` prefix."""
    index = path.find("Images/")
    return path[index:] if index >= 0 else path
