"""Finding a picture pasted into another (core/pasted.py) and verifying a copy through it."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from agman_milvus.core import copy_verify as cv
from agman_milvus.core.copy_features import extract, pixel_block
from agman_milvus.core.copy_scoring import SURE
from agman_milvus.core.pasted import pasted_region
from agman_milvus.usecases.copyright import QueryLook, inspect_query, query_views
from tests.unit.test_copy_verify import textured


def grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"))


def photo(seed: int, size: tuple[int, int], detail_px: int = 10) -> Image.Image:
    """A photo-like picture: smooth colour blobs and detail of about ``detail_px``, no long
    straight edges."""
    rng = np.random.default_rng(seed)
    blobs = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
        size, Image.Resampling.BICUBIC), np.float32)
    cells = (max(2, size[1] // detail_px), max(2, size[0] // detail_px))
    detail = np.asarray(Image.fromarray(rng.integers(0, 256, cells, dtype=np.uint8)).resize(
        size, Image.Resampling.BICUBIC), np.float32)
    return Image.fromarray(np.clip(0.85 * blobs + 0.15 * detail[..., None], 0, 255).astype(np.uint8))


def product_on_white(seed: int, size: int = 300) -> Image.Image:
    """A catalogue-style photo: a textured garment shape on a white backdrop."""
    im = Image.new("RGB", (size, size), "white")
    mask = Image.new("L", (size, size), 0)
    outline = [(90, 40), (210, 40), (250, 120), (220, 270), (80, 270), (50, 120)]
    ImageDraw.Draw(mask).polygon(outline, fill=255)
    im.paste(photo(seed, (size, size)), (0, 0), mask)
    return im


@pytest.mark.parametrize("box", [(60, 50, 300, 290), (0, 120, 200, 330), (150, 20, 380, 180)])
def test_a_picture_pasted_into_a_photo_is_found(box: tuple[int, int, int, int]) -> None:
    canvas = ImageEnhance.Brightness(photo(7, (420, 360))).enhance(0.6)  # a frame that shows
    x0, y0, x1, y1 = box
    canvas.paste(photo(8, (x1 - x0, y1 - y0)), (x0, y0))
    found = pasted_region(grey(canvas))
    assert found is not None
    assert np.allclose(found, box, atol=4), found


@pytest.mark.parametrize("shape", [(300, 300), (450, 600), (4000, 3000)])
def test_the_frame_is_placed_on_the_boundary_at_any_size(shape: tuple[int, int]) -> None:
    """The frame is found on a 256 px copy; each side lands on the pixel boundary of the step,
    not half a work pixel before it (16 px on a 4,000 px photo)."""
    h, w = shape
    grey_image = np.zeros(shape, np.uint8)
    grey_image[h // 4:3 * h // 4, w // 4:3 * w // 4] = 200
    px = max(h, w) / 256  # one pixel where the frame is found
    assert np.allclose(pasted_region(grey_image), (w // 4, h // 4, 3 * w // 4, 3 * h // 4), atol=px / 2)


def test_a_padded_picture_is_found_and_plain_pictures_frame_nothing() -> None:
    padded = ImageOps.expand(product_on_white(1), 50, fill=(40, 90, 160))
    assert np.allclose(pasted_region(grey(padded)), (50, 50, 350, 350), atol=4)
    assert pasted_region(grey(product_on_white(2))) is None
    assert pasted_region(grey(photo(3, (300, 300)))) is None
    stripes = np.tile(np.repeat(np.array([30, 220], np.uint8), 6), 40)[:300]
    assert pasted_region(np.tile(stripes, (300, 1))) is None  # straight edges, but everywhere
    assert pasted_region(np.zeros((10, 400), np.uint8)) is None


def test_catalogue_photos_seldom_frame_a_region(shared_dir: Path) -> None:
    files = sorted((shared_dir / "data" / "fashion-products" / "images").glob("*.jpg"))
    sample = random.Random(0).sample(files, 100)
    framed = sum(pasted_region(grey(Image.open(f))) is not None for f in sample)
    assert framed <= 6  # 4: rectangular products (wallets, folded shirts) on white


def test_a_copy_pasted_small_verifies_through_its_region() -> None:
    """A product photo rotated and pasted small into a large photo: at verification size the
    whole query shows it about 120 px wide; the region alone shows it at full size. The
    verification through the region is kept, in the whole query's pixels."""
    original = Image.new("RGB", (240, 240), (235, 235, 235))
    mask = Image.new("L", original.size, 0)
    ImageDraw.Draw(mask).ellipse((70, 70, 170, 170), fill=255)
    original.paste(textured(21, 240), (0, 0), mask)
    canvas = ImageEnhance.Brightness(photo(22, (800, 640), detail_px=40)).enhance(0.6)
    canvas.paste(original.rotate(20, expand=True, fillcolor=(255, 255, 255)).resize((220, 220)), (400, 266))
    box = pasted_region(grey(canvas))
    assert box is not None and np.allclose(box, (400, 266, 620, 486), atol=8), box
    plain = cv.verify(extract(canvas), extract(original))
    framed = cv.verify(extract(canvas, pasted=box), extract(original))
    assert plain.score < SURE and framed.score > plain.score + 0.1 and framed.inliers > 2 * plain.inliers
    centre = np.asarray(framed.region).mean(axis=0)
    assert np.allclose(centre, (510, 376), atol=10)  # the original's outline, in the whole query
    lines = np.asarray(framed.lines)
    assert ((lines[:, 0] > 400) & (lines[:, 0] < 620) & (lines[:, 1] > 266) & (lines[:, 1] < 486)).all()
    # an unrelated picture does not align at all, the picture alone (extracted once) neither
    query = extract(canvas, pasted=box)
    assert cv.verify(query, extract(textured(23, 240))).score < 0.1
    assert query._pasted is not None and query.pasted() is query._pasted


def test_a_query_framing_a_picture_searches_it_alone_too() -> None:
    canvas = photo(31, (300, 300))
    canvas.paste(photo(32, (120, 120)), (100, 90))
    box = pasted_region(grey(canvas))
    views = query_views(canvas, QueryLook(pasted=box))
    assert len(views) == 4 and views[3].size == (box[2] - box[0], box[3] - box[1])
    assert len(query_views(canvas)) == 3


def pixelated(image: Image.Image, block: int) -> Image.Image:
    small = image.resize((image.width // block, image.height // block), Image.Resampling.BILINEAR)
    return small.resize(image.size, Image.Resampling.NEAREST)


def product_on(backdrop: tuple[int, int, int], seed: int) -> Image.Image:
    """A catalogue-style photo: a textured garment shape on a plain coloured backdrop."""
    im = Image.new("RGB", (240, 240), backdrop)
    mask = Image.new("L", im.size, 0)
    outline = [(80, 40), (160, 40), (200, 110), (175, 210), (65, 210), (40, 110)]
    ImageDraw.Draw(mask).polygon(outline, fill=255)
    im.paste(photo(seed, (240, 240), detail_px=30), (0, 0), mask)
    return im


def test_a_pixelated_picture_pasted_at_another_aspect_verifies_through_its_region() -> None:
    """A product photo pixelated (12 px blocks), then pasted stretched (10 x 14 px blocks) into
    a photo: the photo around it keeps the whole query off the grid, so the region's blocks are
    found alone, scaled away in its stage-1 view and smoothed away in its dense alignment."""
    pink = (220, 170, 220)
    original = product_on(pink, 41)
    canvas = ImageEnhance.Brightness(photo(42, (420, 460), detail_px=6)).enhance(0.8)
    canvas.paste(pixelated(original, 12).resize((200, 280), Image.Resampling.BICUBIC), (110, 90))
    look = inspect_query(canvas)
    assert look.block == 0.0 and look.pasted is not None
    assert np.allclose(look.pasted, (110, 90, 310, 370), atol=4), look
    assert look.pasted_block == pytest.approx(np.sqrt(10 * 14), rel=0.1)
    assert pixel_block(grey(query_views(canvas, look)[3])) == 0.0  # its blocks scaled away

    query = extract(canvas, look.block, look.pasted, look.pasted_block)
    found = cv.verify(query, extract(original))
    assert found.smoothed_score > 0.8 and found.method == "dense", found
    assert cv.verify(extract(canvas), extract(original)).rank < 0.3  # the whole query alone
    assert cv.verify(query, extract(product_on(pink, 43))).rank < 0.3  # another product
