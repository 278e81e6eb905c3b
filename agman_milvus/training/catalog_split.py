"""Generic product catalogs: a CSV with an image path column and one column per attribute.

This is the format of ``fashion-products/manifest.csv`` (``file,id,gender,...``). From it we
build an :class:`AttributeSchema` and deterministic train / valid / test splits.

Schema rule: for each chosen attribute column, a value is kept if at least ``min_count``
images carry it (empty cells and ``NA``/``nan`` count as missing); kept values are ordered by
name. An image whose value was dropped simply has no label for that attribute.

Split rule (deterministic from ``seed`` and the image id only, so adding or removing other
rows never moves an image): ``h = sha256(f"{seed}:{image_id}")`` read as three independent
uniform numbers from its bytes,

* ``u0 = bytes[0:8]``: ``u0 < test_fraction`` -> test, ``< test_fraction + valid_fraction``
  -> valid, otherwise train;
* ``u1 = bytes[8:16]``: an eval (valid/test) image is labelled with ONE of its attributes,
  number ``floor(u1 * n_labels)`` in schema order among those it has;
* ``u2 = bytes[16:24]``: an eval image is a query if ``u2 < query_fraction`` else a candidate.

Train images keep every attribute they have (like DeepFashion); each eval image appears
exactly once, as a query or as a candidate (like FashionAI). Images with no kept label at all
are left out.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agman_milvus.core.schema import Attribute, AttributeSchema
from agman_milvus.training.readers import FormatError, Label, RetrievalSplit

logger = logging.getLogger(__name__)

_MISSING = {"", "na", "nan", "none", "null"}


@dataclass(frozen=True)
class Catalog:
    """Images of a catalog and their (attribute, value) labels; ``Label.image`` indexes ``paths``."""

    root: Path
    paths: list[str]
    ids: list[str]
    schema: AttributeSchema
    labels: list[Label]

    def image_path(self, image: int) -> Path:
        return self.root / self.paths[image]


@dataclass(frozen=True)
class CatalogSplit:
    """Train labels (several per image allowed) and two retrieval splits (one label per image)."""

    train: list[Label]
    valid: RetrievalSplit
    test: RetrievalSplit


def read_catalog(
    csv_path: str | Path,
    attributes: Sequence[str],
    *,
    path_column: str = "file",
    id_column: str | None = "id",
    min_count: int = 10,
    root: str | Path | None = None,
) -> Catalog:
    """Read a catalog CSV; image paths are relative to ``root`` (default: the CSV's folder)."""
    csv_path = Path(csv_path)
    with open(csv_path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        needed = [path_column, *attributes] + ([id_column] if id_column else [])
        missing = [c for c in needed if c not in columns]
        if missing:
            raise FormatError(f"{csv_path}: missing column(s) {missing}; columns are {columns}")
        rows = list(reader)
    if not rows:
        raise FormatError(f"{csv_path}: no rows")

    def cell(row: dict[str, str], column: str) -> str | None:
        value = (row.get(column) or "").strip()
        return None if value.lower() in _MISSING else value

    kept: list[Attribute] = []
    for name in attributes:
        counts = Counter(v for row in rows if (v := cell(row, name)) is not None)
        values = sorted(v for v, n in counts.items() if n >= min_count)
        dropped = sorted(v for v, n in counts.items() if n < min_count)
        if dropped:
            logger.info("%s: dropped %d rare value(s) (< %d images): %s",
                        name, len(dropped), min_count, ", ".join(dropped[:10]))
        if not values:
            raise FormatError(f"{csv_path}: attribute {name!r} has no value with >= {min_count} images")
        kept.append(Attribute(name, tuple(values)))
    schema = AttributeSchema(tuple(kept))
    index = [{v: i for i, v in enumerate(a.values)} for a in kept]

    paths: list[str] = []
    ids: list[str] = []
    labels: list[Label] = []
    seen: set[str] = set()
    for number, row in enumerate(rows, start=2):
        path = cell(row, path_column)
        image_id = cell(row, id_column) if id_column else path
        if path is None or image_id is None:
            raise FormatError(f"{csv_path}:{number}: empty {path_column!r} or id")
        if image_id in seen:
            raise FormatError(f"{csv_path}:{number}: duplicate image id {image_id!r}")
        seen.add(image_id)
        image = len(paths)
        paths.append(path)
        ids.append(image_id)
        for attribute, name in enumerate(attributes):
            value = index[attribute].get(cell(row, name) or "")
            if value is not None:
                labels.append(Label(image, attribute, value))
    return Catalog(Path(root) if root else csv_path.parent, paths, ids, schema, labels)


def _uniforms(seed: int, image_id: str) -> tuple[float, float, float]:
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    scale = float(2**64)
    return tuple(int.from_bytes(digest[i : i + 8], "big") / scale for i in (0, 8, 16))  # type: ignore[return-value]


def split_catalog(
    catalog: Catalog,
    *,
    seed: int = 0,
    test_fraction: float = 0.3,
    valid_fraction: float = 0.1,
    query_fraction: float = 0.2,
) -> CatalogSplit:
    """Deterministic train / valid / test split (rule in the module docstring)."""
    if not 0 <= test_fraction + valid_fraction < 1:
        raise ValueError("test_fraction + valid_fraction must be in [0, 1)")
    if not 0 < query_fraction < 1:
        raise ValueError("query_fraction must be in (0, 1)")
    per_image: dict[int, list[Label]] = {}
    for label in catalog.labels:
        per_image.setdefault(label.image, []).append(label)
    train: list[Label] = []
    evals: dict[str, tuple[list[Label], list[Label]]] = {"valid": ([], []), "test": ([], [])}
    for image, labels in per_image.items():
        u0, u1, u2 = _uniforms(seed, catalog.ids[image])
        if u0 >= test_fraction + valid_fraction:
            train.extend(labels)
            continue
        queries, candidates = evals["test" if u0 < test_fraction else "valid"]
        labels = sorted(labels, key=lambda lab: lab.attribute)
        chosen = labels[min(int(u1 * len(labels)), len(labels) - 1)]
        (queries if u2 < query_fraction else candidates).append(chosen)
    split = CatalogSplit(
        train=train,
        valid=RetrievalSplit(*evals["valid"]),
        test=RetrievalSplit(*evals["test"]),
    )
    logger.info(
        "catalog split: %d train labels, valid %d/%d, test %d/%d (query/candidate)",
        len(train), len(split.valid.queries), len(split.valid.candidates),
        len(split.test.queries), len(split.test.candidates),
    )
    return split
