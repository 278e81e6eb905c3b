"""agman_milvus.core.phash: stability under re-encoding, separation, agreement with imagehash."""

from __future__ import annotations

import io
import itertools

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageDraw

from agman_milvus.core.images import load_image
from agman_milvus.core.phash import from_signed64, hamming, phash, to_signed64
from tests.support import require_shared

SIZE = 128
# (gradient direction, shape, fill colour): structured, mutually unrelated pictures
SCENES = [("h", "ellipse", (255, 0, 0)), ("v", "rectangle", (0, 0, 255)),
          ("d", "ellipse", (0, 200, 0)), ("r", "rectangle", (250, 250, 0)),
          ("ad", "ellipse", (0, 0, 0)), ("h", "rectangle", (255, 255, 255))]


def _scene(index: int) -> Image.Image:
    direction, shape, colour = SCENES[index]
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    ramp = {"h": xx, "v": yy, "d": (xx + yy) / 2, "ad": (1 - xx + yy) / 2,
            "r": np.hypot(xx - 0.5, yy - 0.5) / 0.71}[direction]
    g = (ramp * 255).astype(np.uint8)
    im = Image.fromarray(np.stack([g, 255 - g, g // 2], axis=-1), "RGB")
    x, y = np.random.default_rng(index).integers(10, 70, 2)
    getattr(ImageDraw.Draw(im), shape)((int(x), int(y), int(x) + 50, int(y) + 40), fill=colour)
    return im


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf)


TRANSFORMS = {
    "jpeg_q75": lambda im: _jpeg(im, 75),
    "half_size": lambda im: im.resize((SIZE // 2, SIZE // 2), Image.Resampling.BILINEAR),
    "upscaled": lambda im: im.resize((300, 300), Image.Resampling.BICUBIC),
    "half_size_jpeg_q75": lambda im: _jpeg(
        im.resize((SIZE // 2, SIZE // 2), Image.Resampling.BILINEAR), 75
    ),
}


def test_identical_images_hash_equal() -> None:
    for i in range(len(SCENES)):
        assert hamming(phash(_scene(i)), phash(_scene(i).copy())) == 0
        assert phash(_scene(i)) == phash(_scene(i).convert("L"))  # hash is of grey levels


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_recompressed_or_resized_copy_is_close(transform: str) -> None:
    for i in range(len(SCENES)):
        im = _scene(i)
        assert hamming(phash(im), phash(TRANSFORMS[transform](im))) <= 8, (transform, i)


def test_unrelated_images_are_far_apart() -> None:
    hashes = [phash(_scene(i)) for i in range(len(SCENES))]
    distances = [hamming(a, b) for a, b in itertools.combinations(hashes, 2)]
    assert min(distances) > 20, distances


def test_agrees_with_imagehash() -> None:
    rng = np.random.default_rng(0)
    pictures = [_scene(i) for i in range(len(SCENES))]
    pictures += [Image.fromarray(rng.integers(0, 256, (40 + 7 * k, 60, 3), dtype=np.uint8))
                 for k in range(4)]
    for im in pictures:
        reference = int(str(imagehash.phash(im)), 16)
        assert hamming(phash(im), reference) <= 2  # measured: 0 on all of these


def test_hash_is_64_bit_and_signed_round_trip() -> None:
    value = phash(_scene(0))
    assert 0 <= value < 2**64
    for unsigned in (0, 1, 2**63 - 1, 2**63, 2**64 - 1, value):
        signed = to_signed64(unsigned)
        assert -(2**63) <= signed < 2**63
        assert from_signed64(signed) == unsigned
        assert hamming(signed, unsigned) == 0
    assert to_signed64(2**64 - 1) == -1
    for bad in (-1, 2**64):
        with pytest.raises(ValueError):
            to_signed64(bad)
    with pytest.raises(ValueError):
        from_signed64(2**63)


def test_hamming_counts_bits() -> None:
    assert hamming(0, 2**64 - 1) == 64
    assert hamming(0b1011, 0b0001) == 2
    assert hamming(to_signed64(2**63), 0) == 1


@pytest.mark.realdata
def test_real_catalogue_agreement_and_stability() -> None:
    folder = require_shared("data", "fashion-products", "images")
    for path in sorted(folder.glob("*.jpg"))[::150]:
        im = load_image(path)
        assert hamming(phash(im), int(str(imagehash.phash(im)), 16)) <= 2
        copy = _jpeg(im.resize((160, 160), Image.Resampling.BILINEAR), 75)
        assert hamming(phash(im), phash(copy)) <= 8
