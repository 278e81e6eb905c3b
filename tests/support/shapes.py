"""A tiny generated catalogue for training tests: a coloured background (attribute ``colour``)
with a light or dark square (attribute ``mark``), 56 px JPEGs and a ``file,id,colour,mark``
manifest."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
MARKS = {"light": (245, 245, 245), "dark": (15, 15, 15)}


def draw_shape(mark: str, colour: tuple[int, int, int], rng: np.random.Generator) -> Image.Image:
    """A jittered ``colour`` background with a ``mark`` square of random size and place."""
    jitter = rng.integers(-12, 13, size=3)
    background = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, jitter, strict=True))
    image = Image.new("RGB", (56, 56), background)
    size = int(rng.integers(18, 28))
    x, y = (int(v) for v in rng.integers(2, 54 - size, size=2))
    ImageDraw.Draw(image).rectangle((x, y, x + size, y + size), fill=MARKS[mark])
    return image


def write_shapes_catalog(root: Path, count: int, *, broken: bool = False) -> Path:
    """``count`` images under ``root/images`` (colours and marks cycling) and their manifest;
    ``broken`` adds one file that is not a JPEG. Returns the manifest's path."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        colour, mark = list(COLOURS)[i % 3], list(MARKS)[(i // 3) % 2]
        draw_shape(mark, COLOURS[colour], rng).save(root / "images" / f"{i}.jpg", quality=92)
        rows.append([f"images/{i}.jpg", f"p{i}", colour, mark])
    if broken:
        (root / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        rows.append(["images/broken.jpg", "broken", "red", "circle"])
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "id", "colour", "mark"])
        writer.writerows(rows)
    return root / "manifest.csv"
