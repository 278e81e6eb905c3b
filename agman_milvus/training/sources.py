"""A training/evaluation data source: schema, train labels and retrieval splits with their images.

Two kinds: a generic product catalog CSV (:mod:`agman_milvus.training.catalog_split`) and a reference
dataset directory in the ASEN layout (``meta.json`` one level up or beside it,
``filenames_<split>.txt``, ``label_train.txt``, ``query_/candidate_<split>.txt``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agman_milvus.core.schema import AttributeSchema
from agman_milvus.training.catalog_split import read_catalog, split_catalog
from agman_milvus.training.datasets import ImageTable
from agman_milvus.training.readers import (
    Label,
    RetrievalSplit,
    read_filenames,
    read_label_train,
    read_meta,
    read_retrieval_split,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSource:
    """Everything a training or evaluation run reads."""

    schema: AttributeSchema
    train: list[Label]
    train_table: ImageTable
    valid: RetrievalSplit | None
    valid_table: ImageTable
    test: RetrievalSplit | None
    test_table: ImageTable

    def split(self, name: str) -> tuple[RetrievalSplit, ImageTable]:
        """``valid`` or ``test`` with its image table."""
        split = {"valid": self.valid, "test": self.test}.get(name)
        if split is None:
            raise ValueError(f"this data source has no {name!r} split")
        return split, self.valid_table if name == "valid" else self.test_table


def catalog_source(
    csv_path: str | Path,
    attributes: Sequence[str],
    *,
    min_count: int = 10,
    seed: int = 0,
    test_fraction: float = 0.3,
    valid_fraction: float = 0.1,
    query_fraction: float = 0.2,
    image_root: str | Path | None = None,
    fold_valid: bool = False,
) -> DataSource:
    """A catalog CSV split by the deterministic hash rule of :mod:`agman_milvus.training.catalog_split`.

    ``fold_valid``: the valid images join the training images with every label they have, and
    the source has no valid split (a run then keeps its last epoch); the test split is the same.
    """
    catalog = read_catalog(csv_path, attributes, min_count=min_count, root=image_root)
    split = split_catalog(catalog, seed=seed, test_fraction=test_fraction,
                          valid_fraction=valid_fraction, query_fraction=query_fraction)
    table = ImageTable(catalog.root, catalog.paths)
    train, valid = split.train, split.valid
    if fold_valid:
        valid_images = {lab.image for lab in valid.queries + valid.candidates}
        train, valid = train + [lab for lab in catalog.labels if lab.image in valid_images], None
        logger.info("valid split folded into training: %d images, %d labels more", len(valid_images),
                    len(train) - len(split.train))
    return DataSource(catalog.schema, train, table, valid, table, split.test, table)


def reference_source(
    directory: str | Path,
    image_root: str | Path,
    *,
    dataset: str | None = None,
    meta: str | Path | None = None,
) -> DataSource:
    """A reference dataset directory (e.g. ``refdata/FashionAI``); images under ``image_root``.

    ``label_train.txt`` needs its ``filenames_train.txt`` (FashionAI: rebuild it with
    :func:`agman_milvus.training.readers.rebuild_fashionai_train`). Missing train files give an
    evaluation-only source.
    """
    directory = Path(directory)
    dataset = dataset or directory.name
    meta_path = Path(meta) if meta else next(
        (p for p in (directory / "meta.json", directory.parent / "meta.json") if p.exists()), None)
    if meta_path is None:
        raise FileNotFoundError(f"no meta.json in {directory} or its parent; pass meta=")
    schema = read_meta(meta_path, dataset)

    def table(split: str) -> ImageTable:
        path = directory / f"filenames_{split}.txt"
        return ImageTable(image_root, read_filenames(path) if path.exists() else [])

    train: list[Label] = []
    train_table = table("train")
    if (directory / "label_train.txt").exists() and len(train_table):
        train = read_label_train(directory / "label_train.txt")
    else:
        logger.warning("%s: no filenames_train.txt + label_train.txt; evaluation only", directory)

    def split(name: str) -> RetrievalSplit | None:
        return read_retrieval_split(directory, name) if (directory / f"query_{name}.txt").exists() else None

    return DataSource(
        schema, train, train_table, split("valid"), table("valid"), split("test"), table("test")
    )
