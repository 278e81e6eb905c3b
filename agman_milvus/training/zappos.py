"""Readers for the CSN Zappos50k triplet lists (Veit et al., conditional similarity networks).

``filenames.json`` is, despite its name, a plain text file with one image path per line.
``tripletlists/{class,closure,gender,heel}_tripletlist_{split}.txt`` hold lines ``a b c`` that
index it, where **c is the close (positive) image and b the far (negative) one**. The four
conditions (0 class, 1 closure, 2 gender, 3 heel) are concatenated, shuffled with a seeded
numpy Generator and the first ``n_triplets * len(conditions) / 4`` are kept, as CSN does.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from agman_milvus.training.readers import FormatError, Triplet, _ints, _lines, read_filenames

CONDITIONS: tuple[str, ...] = ("class", "closure", "gender", "heel")


def read_zappos_filenames(path: str | Path) -> list[str]:
    """``filenames.json``: one image path per line."""
    return read_filenames(path)


def read_triplet_list(path: str | Path, condition: int) -> list[Triplet]:
    """One ``<condition>_tripletlist_<split>.txt`` file (``a far close`` per line)."""
    triplets: list[Triplet] = []
    for number, fields in _lines(path):
        if len(fields) != 3:
            raise FormatError(f"{path}:{number}: expected 'anchor far close'")
        anchor, far, close = _ints(path, number, fields)
        triplets.append(Triplet(anchor, far, close, condition))
    return triplets


def read_zappos_triplets(
    directory: str | Path,
    split: str,
    n_triplets: int,
    *,
    seed: int = 0,
    conditions: Iterable[int] = range(len(CONDITIONS)),
) -> list[Triplet]:
    """Concatenate the chosen conditions' lists, shuffle (seeded), keep ``n·len/4`` triplets."""
    directory = Path(directory)
    conditions = list(conditions)
    triplets: list[Triplet] = []
    for condition in conditions:
        name = CONDITIONS[condition]
        triplets.extend(read_triplet_list(directory / f"{name}_tripletlist_{split}.txt", condition))
    order = np.random.default_rng(seed).permutation(len(triplets))
    keep = int(n_triplets * len(conditions) / len(CONDITIONS))
    return [triplets[i] for i in order[:keep]]
