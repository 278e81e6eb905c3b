"""The demo catalog: seeded, procedurally drawn product photos and a manifest CSV.

The manifest has the layout of ``fashion-products/manifest.csv`` (``file,id,<columns>,
productDisplayName``), so :func:`agman_milvus.training.catalog_split.read_catalog` reads it and the demo
runs the same code path on it as on a real catalog:

=====================  =====================================================================
``file``               image path relative to the manifest (``images/000001.jpg``)
``id``                 image id, unique (the real manifest has one image per product, so
                       there it is also the product id)
``product_id``         product id; a few products have two photos, which share it
``gender``, ``brand``  metadata for filters
``category``           t-shirt, dress, jacket, trousers, skirt, shoe
``colour``             black, white, grey, red, blue, green, yellow, pink
``pattern``            plain, stripes, dots, checks
``sleeve_length``      sleeveless, short, long for t-shirts, dresses and jackets; an EMPTY
                       cell for the others, which ``read_catalog`` treats as "no label"
``productDisplayName`` a title such as ``Kestrel Women Red Striped Long-Sleeve T-Shirt``
=====================  =====================================================================

Some products are colour variants of the one before (same cut, pattern and fit, another
colour): near-identical items that only the colour attribute tells apart. Images are licence
clean: nothing is copied from any dataset. ``catalog.json`` beside the manifest records how the
catalog was made, so :func:`ensure_catalog` regenerates only when something changed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from agman_milvus.app.demo.garments import (
    CATEGORIES,
    COLOURS,
    PATTERNS,
    SLEEVE_LENGTHS,
    TOPS,
    Garment,
    Shot,
    render,
)

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "demo-catalog/1"
DEMO_ATTRIBUTES = ("category", "colour", "pattern", "sleeve_length")
"""The attribute columns of the demo manifest, in model schema order."""
MANIFEST_COLUMNS = ("file", "id", "product_id", "gender", "brand", *DEMO_ATTRIBUTES, "productDisplayName")
BRANDS = ("Kestrel", "Northwind", "Lumen", "Arbor", "Solstice", "Marlowe")
GENDERS = ("Men", "Women", "Unisex")

_VARIANT_PROBABILITY = 0.12
_TWO_PHOTO_PROBABILITY = 0.08
_PATTERN_WEIGHTS = (0.31, 0.23, 0.23, 0.23)
_LIGHT_ACCENTS = ((244, 242, 232), (250, 250, 250), (236, 214, 120))
_DARK_ACCENTS = ((28, 36, 86), (30, 30, 32), (150, 28, 40))
_TITLE_PATTERN = {"plain": "", "stripes": "Striped", "dots": "Polka Dot", "checks": "Checked"}
_TITLE_SLEEVE = {"sleeveless": "Sleeveless", "short": "Short-Sleeve", "long": "Long-Sleeve"}
_TITLE_CATEGORY = {"t-shirt": "T-Shirt", "dress": "Dress", "jacket": "Jacket", "trousers": "Trousers",
                   "skirt": "Skirt", "shoe": "Shoes"}


@dataclass(frozen=True)
class Product:
    """A product of the demo catalog: its garment and metadata."""

    product_id: int
    garment: Garment
    brand: str
    gender: str

    @property
    def title(self) -> str:
        g = self.garment
        words = [self.brand, self.gender, g.colour.title(), _TITLE_PATTERN[g.pattern],
                 _TITLE_SLEEVE.get(g.sleeve_length or "", ""), _TITLE_CATEGORY[g.category]]
        return " ".join(w for w in words if w)


@dataclass(frozen=True)
class DemoItem:
    """One manifest row: an image of a product."""

    image_id: int
    file: str
    product: Product

    def row(self) -> dict[str, str]:
        g = self.product.garment
        return {
            "file": self.file, "id": str(self.image_id), "product_id": str(self.product.product_id),
            "gender": self.product.gender, "brand": self.product.brand, "category": g.category,
            "colour": g.colour, "pattern": g.pattern, "sleeve_length": g.sleeve_length or "",
            "productDisplayName": self.product.title,
        }


@dataclass(frozen=True)
class DemoCatalog:
    """A generated catalog on disk."""

    root: Path
    items: list[DemoItem]
    seed: int
    image_size: int
    seconds: float
    """Time it took to generate (0 when an existing catalog was reused)."""

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def attributes(self) -> tuple[str, ...]:
        return DEMO_ATTRIBUTES


# -- sampling ----------------------------------------------------------------------------------
def _luminance(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def sample_garment(rng: np.random.Generator, colour: str | None = None) -> Garment:
    """A random garment (``colour`` forced when given)."""
    category = str(rng.choice(CATEGORIES))
    colour = colour or str(rng.choice(list(COLOURS)))
    pattern = str(rng.choice(PATTERNS, p=_PATTERN_WEIGHTS))
    sleeve = None
    if category in TOPS:
        weights = (0.25, 0.15, 0.6) if category == "jacket" else (1 / 3, 1 / 3, 1 / 3)
        sleeve = str(rng.choice(SLEEVE_LENGTHS, p=weights))
    garment = Garment(
        category=category, colour=colour, pattern=pattern, sleeve_length=sleeve,
        length=float(rng.uniform(0.88, 1.12)), width=float(rng.uniform(0.88, 1.12)),
        shade=tuple(float(v) for v in rng.uniform(-1, 1, 3)),  # type: ignore[arg-type]
        pattern_scale=float(rng.uniform(0.8, 1.3)),
        pattern_angle=int(rng.choice([0, 90])) if pattern == "stripes" else 0,
    )
    return _with_accent(garment, rng)


def _with_accent(garment: Garment, rng: np.random.Generator) -> Garment:
    """Pick a stripe/dot/check colour that contrasts with the garment's colour."""
    options = _DARK_ACCENTS if _luminance(garment.rgb) > 150 else _LIGHT_ACCENTS
    accent = options[int(rng.integers(len(options)))]
    return replace(garment, accent=accent)


def colour_variant(garment: Garment, rng: np.random.Generator) -> Garment:
    """The same garment in another colour (cut, fit and pattern unchanged)."""
    others = [c for c in COLOURS if c != garment.colour]
    return _with_accent(replace(garment, colour=str(rng.choice(others))), rng)


def sample_shot(rng: np.random.Generator) -> Shot:
    """A random studio photo setting: backdrop, props, pose, light and camera."""
    tint = rng.uniform(0, 255, 3)
    if rng.random() < 0.2:
        level = rng.uniform(70, 120)
    else:
        level = rng.uniform(175, 235)
    top = np.clip(0.72 * level + 0.28 * tint, 0, 255)
    bottom = np.clip(top * rng.uniform(0.8, 1.0), 0, 255)
    props = []
    for _ in range(int(rng.choice([0, 0, 1, 2]))):
        x = float(rng.choice([rng.uniform(0.04, 0.22), rng.uniform(0.78, 0.96)]))
        props.append((str(rng.choice(["disc", "box"])),
                      tuple(int(v) for v in rng.integers(0, 256, 3)),
                      (x, float(rng.uniform(0.05, 0.95))), float(rng.uniform(0.08, 0.22))))
    scale = float(rng.uniform(0.85, 1.2))
    slack = (1.25 - scale) / 2 * 0.6
    folds = tuple(((float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.25, 0.75))),
                   (float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.25, 0.75))))
                  for _ in range(int(rng.integers(0, 4))))
    return Shot(
        background=(tuple(int(v) for v in top), tuple(int(v) for v in bottom)),  # type: ignore[arg-type]
        floor=float(rng.uniform(0.72, 0.9)) if rng.random() < 0.35 else None,
        angle=float(np.clip(rng.normal(0, 6), -15, 15)),
        scale=scale,
        offset=(float(rng.uniform(-slack, slack)), float(rng.uniform(-slack, slack))),
        light=(float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.05, 0.3))),
        props=tuple(props),  # type: ignore[arg-type]
        brightness=float(rng.uniform(0.88, 1.12)),
        contrast=float(rng.uniform(0.85, 1.15)),
        white_balance=tuple(float(v) for v in 1 + rng.normal(0, 0.03, 3)),  # type: ignore[arg-type]
        noise=float(rng.uniform(1.5, 6.0)),
        folds=folds,
        quality=int(rng.integers(78, 96)),
    )


def sample_products(n_images: int, seed: int = 0) -> list[tuple[Product, int]]:
    """Products and how many photos each gets, ``n_images`` photos in all (deterministic)."""
    if n_images < 1:
        raise ValueError("a catalog needs at least one image")
    rng = np.random.default_rng([seed, 0])
    plan: list[tuple[Product, int]] = []
    total = 0
    while total < n_images:
        product_id = len(plan) + 1
        previous = plan[-1][0] if plan else None
        if previous is not None and rng.random() < _VARIANT_PROBABILITY:
            product = Product(
                product_id, colour_variant(previous.garment, rng), previous.brand, previous.gender
            )
        else:
            garment = sample_garment(rng)
            gender = (
                "Women"
                if garment.category in ("dress", "skirt")
                else str(rng.choice(GENDERS, p=(0.4, 0.4, 0.2)))
            )
            product = Product(product_id, garment, str(rng.choice(BRANDS)), gender)
        photos = min(2 if rng.random() < _TWO_PHOTO_PROBABILITY else 1, n_images - total)
        plan.append((product, photos))
        total += photos
    return plan


# -- writing -----------------------------------------------------------------------------------
def _render_one(job: tuple[DemoItem, int, int, Path]) -> None:
    item, seed, size, root = job
    rng = np.random.default_rng([seed, 1, item.image_id])
    shot = sample_shot(rng)
    image = render(item.product.garment, shot, size, rng)
    path = root / item.file
    image.save(path, format="JPEG", quality=shot.quality, optimize=False)


def generate_catalog(out_dir: str | Path, n_images: int = 600, *, seed: int = 0, image_size: int = 224,
                     threads: int = 2) -> DemoCatalog:
    """Draw ``n_images`` product photos into ``out_dir/images`` and write ``manifest.csv``.

    The same (``n_images``, ``seed``, ``image_size``) always gives byte-identical files. The
    first ``k`` products do not depend on ``n_images``.
    """
    if image_size < 32:
        raise ValueError("image_size must be at least 32 pixels")
    started = time.perf_counter()
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    items = _items_from_plan(n_images, seed)
    jobs = [(item, seed, image_size, root) for item in items]
    if threads > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(_render_one, jobs))
    else:
        for job in jobs:
            _render_one(job)
    manifest = root / "manifest.csv"
    with open(manifest, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(item.row() for item in items)
    seconds = time.perf_counter() - started
    info = {"generator": GENERATOR_VERSION, "seed": seed, "images": n_images, "image_size": image_size,
            "products": len({i.product.product_id for i in items}),
            "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()}
    (root / "catalog.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    logger.info("generated demo catalog: %d images of %d products in %.1f s (%s)",
                len(items), info["products"], seconds, root)
    return DemoCatalog(root, items, seed, image_size, seconds)


def ensure_catalog(out_dir: str | Path, n_images: int = 600, *, seed: int = 0, image_size: int = 224,
                   threads: int = 2) -> DemoCatalog:
    """The catalog in ``out_dir``, generated only when missing or made with other settings."""
    root = Path(out_dir)
    marker = root / "catalog.json"
    wanted = {"generator": GENERATOR_VERSION, "seed": seed, "images": n_images, "image_size": image_size}
    if marker.is_file():
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = {}
        manifest = root / "manifest.csv"
        same = all(info.get(k) == v for k, v in wanted.items())
        if same and manifest.is_file() and \
                hashlib.sha256(manifest.read_bytes()).hexdigest() == info.get("manifest_sha256"):
            items = _items_from_plan(n_images, seed)
            if all((root / item.file).is_file() for item in items):
                logger.info("reusing demo catalog in %s (%d images)", root, len(items))
                return DemoCatalog(root, items, seed, image_size, 0.0)
        logger.info("demo catalog in %s is stale or incomplete; regenerating", root)
        shutil.rmtree(root)  # only ever a directory this module made (it holds catalog.json)
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} exists, is not empty and is not a demo catalog; choose another directory"
        )
    return generate_catalog(root, n_images, seed=seed, image_size=image_size, threads=threads)


def _items_from_plan(n_images: int, seed: int) -> list[DemoItem]:
    items: list[DemoItem] = []
    for product, photos in sample_products(n_images, seed):
        for _ in range(photos):
            image_id = len(items) + 1
            items.append(DemoItem(image_id, f"images/{image_id:06d}.jpg", product))
    return items
