"""The edits of the copy-detection benchmark: random transforms of a catalogue photo.

:func:`agman_milvus.usecases.copy_calibration.calibrate` checks edited copies of the
catalogue's own photos to set the copy thresholds, and bench/copydetect.py and
bench/screening.py build their queries the same way: crops, rescaling, JPEG, rotation, flips,
colour jitter, greyscale, blur, padding, overlaid text, pixelation and pasting into another
picture (:data:`EDITS`), one to three at a time (:func:`random_edit`).
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

__all__ = ["EDITS", "random_edit"]


def _crop(im: Image.Image, r: random.Random) -> Image.Image:
    f = r.uniform(0.55, 0.9)
    w, h = im.size
    cw, ch = max(8, int(w * f)), max(8, int(h * f))
    x, y = r.randint(0, w - cw), r.randint(0, h - ch)
    return im.crop((x, y, x + cw, y + ch))


def _rescale(im: Image.Image, r: random.Random) -> Image.Image:
    s = r.uniform(0.3, 0.8) if r.random() < 0.7 else r.uniform(1.2, 2.0)
    return im.resize((max(8, int(im.width * s)), max(8, int(im.height * s))), Image.Resampling.BILINEAR)


def _jpeg(im: Image.Image, r: random.Random) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=r.randint(8, 40))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _rotate(im: Image.Image, r: random.Random) -> Image.Image:
    angle = r.choice([-1, 1]) * r.uniform(5, 30)
    return im.rotate(angle, expand=True, fillcolor=(255, 255, 255), resample=Image.Resampling.BILINEAR)


def _flip(im: Image.Image, r: random.Random) -> Image.Image:
    return ImageOps.mirror(im)


def _jitter(im: Image.Image, r: random.Random) -> Image.Image:
    im = ImageEnhance.Brightness(im).enhance(r.uniform(0.6, 1.4))
    im = ImageEnhance.Contrast(im).enhance(r.uniform(0.6, 1.4))
    return ImageEnhance.Color(im).enhance(r.uniform(0.2, 1.8))


def _grayscale(im: Image.Image, r: random.Random) -> Image.Image:
    return ImageOps.grayscale(im).convert("RGB")


def _blur(im: Image.Image, r: random.Random) -> Image.Image:
    return im.filter(ImageFilter.GaussianBlur(r.uniform(1.0, 3.0)))


def _pad(im: Image.Image, r: random.Random) -> Image.Image:
    border = int(min(im.size) * r.uniform(0.08, 0.3))
    return ImageOps.expand(im, border, fill=tuple(r.randint(0, 255) for _ in range(3)))


def _text(im: Image.Image, r: random.Random) -> Image.Image:
    im = im.copy()
    draw = ImageDraw.Draw(im)
    words = ["SALE", "-50%", "NEW IN", "free shipping", "(c) shop", "BEST PRICE", "limited"]
    for _ in range(r.randint(2, 5)):
        xy = (r.randint(0, max(1, im.width * 2 // 3)), r.randint(0, max(1, im.height - 12)))
        colour = tuple(r.randint(0, 255) for _ in range(3))
        draw.text(xy, r.choice(words), fill=colour, font_size=r.randint(10, 28))
    return im


def _pixelate(im: Image.Image, r: random.Random) -> Image.Image:
    f = r.uniform(0.08, 0.25)
    small = im.resize((max(4, int(im.width * f)), max(4, int(im.height * f))), Image.Resampling.BILINEAR)
    return small.resize(im.size, Image.Resampling.NEAREST)


def _paste(im: Image.Image, r: random.Random, background: Image.Image | None = None) -> Image.Image:
    w, h = im.size
    size = (int(w * r.uniform(1.3, 2.0)), int(h * r.uniform(1.3, 2.0)))
    if background is None:
        noise = np.random.default_rng(r.randrange(2**32)).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        bg = Image.fromarray(noise).resize(size, Image.Resampling.BICUBIC)
    else:
        bg = background.convert("RGB").resize(size, Image.Resampling.BILINEAR)
    scale = r.uniform(0.5, 0.8)
    small = im.resize((max(8, int(size[0] * scale)), max(8, int(size[1] * scale))))
    bg.paste(small, (r.randint(0, size[0] - small.width), r.randint(0, size[1] - small.height)))
    return bg


#: The edits of the transform benchmark, by name.
EDITS: dict[str, Callable[..., Image.Image]] = {
    "crop": _crop, "rescale": _rescale, "jpeg": _jpeg, "rotate": _rotate, "flip": _flip,
    "jitter": _jitter, "grayscale": _grayscale, "blur": _blur, "pad": _pad, "text": _text,
    "pixelate": _pixelate, "paste": _paste,
}


def random_edit(
    image: Image.Image, rng: random.Random, edits: tuple[int, int] = (1, 3),
    background: Image.Image | None = None,
) -> tuple[Image.Image, list[str]]:
    """An edited copy of ``image``: ``edits`` = (min, max) random edits from :data:`EDITS`.

    ``background`` is the picture ``paste`` puts the image into (noise when None).
    """
    names = rng.sample(sorted(EDITS), rng.randint(*edits))
    out = image.convert("RGB")
    for name in names:
        out = _paste(out, rng, background) if name == "paste" else EDITS[name](out, rng)
    return out, names
