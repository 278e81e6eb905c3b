"""Procedural product photos: garment silhouettes, fabric patterns and a studio-like scene.

Everything is drawn with Pillow and numpy from a :class:`Garment` (what the product is) and a
:class:`Shot` (how this photo of it was taken). Both are plain data sampled elsewhere from a
seeded generator, so the same inputs always give the same pixels.

Silhouettes are polygons in unit "garment" coordinates (x right, y down, garment centred at
0.5). Nothing is rotated as an image: the shot's pose maps polygon corners to pixels, and every
pixel back to garment coordinates where the fabric pattern is evaluated, so the pattern turns
with the garment. Edges are drawn at twice the size and box-reduced (anti-aliasing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Point = tuple[float, float]
RGB = tuple[int, int, int]

CATEGORIES = ("t-shirt", "dress", "jacket", "trousers", "skirt", "shoe")
TOPS = ("t-shirt", "dress", "jacket")
"""Categories that have a sleeve length; the others have none (an empty manifest cell)."""

SLEEVE_LENGTHS = ("sleeveless", "short", "long")
PATTERNS = ("plain", "stripes", "dots", "checks")
COLOURS: dict[str, RGB] = {
    "black": (34, 34, 38),
    "white": (236, 236, 230),
    "grey": (132, 134, 138),
    "red": (192, 34, 42),
    "blue": (38, 78, 178),
    "green": (38, 128, 70),
    "yellow": (236, 198, 48),
    "pink": (236, 138, 176),
}


@dataclass(frozen=True)
class Garment:
    """What a product looks like, independent of any one photo of it."""

    category: str
    colour: str
    pattern: str
    sleeve_length: str | None
    length: float = 1.0
    """Relative garment length (0.85-1.15)."""
    width: float = 1.0
    """Relative garment width (0.85-1.15)."""
    shade: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Per-channel offset of this product's dye from the named colour (-1..1, scaled by 18)."""
    accent: RGB = (240, 240, 236)
    """Colour of stripes, dots or check bands."""
    pattern_scale: float = 1.0
    pattern_angle: int = 0
    """0 = horizontal stripes / aligned grid, 90 = vertical stripes."""

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r}; categories: {', '.join(CATEGORIES)}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; colours: {', '.join(COLOURS)}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}; patterns: {', '.join(PATTERNS)}")
        if (self.sleeve_length is None) != (self.category not in TOPS):
            raise ValueError(
                f"{self.category} {'needs' if self.category in TOPS else 'has no'} sleeve length"
            )
        if self.sleeve_length is not None and self.sleeve_length not in SLEEVE_LENGTHS:
            raise ValueError(
                f"unknown sleeve length {self.sleeve_length!r}; lengths: {', '.join(SLEEVE_LENGTHS)}"
            )

    @property
    def rgb(self) -> RGB:
        base = np.asarray(COLOURS[self.colour], dtype=np.float64) + 18.0 * np.asarray(self.shade)
        return tuple(int(v) for v in np.clip(base, 0, 255))  # type: ignore[return-value]


@dataclass(frozen=True)
class Shot:
    """One photo of a garment: scene, pose and camera."""

    background: tuple[RGB, RGB]
    """Top and bottom colours of the backdrop gradient."""
    floor: float | None
    """Height (0-1) of a floor line with a darker floor below it, or None."""
    angle: float
    """Rotation of the garment in degrees (counter-clockwise)."""
    scale: float
    """Side of the garment square relative to the frame (the garment fills about 70% of it)."""
    offset: Point
    """Centre shift as a fraction of the frame."""
    light: tuple[float, float]
    """Direction (radians) and strength (0-0.35) of a light gradient across the garment."""
    props: tuple[tuple[str, RGB, Point, float], ...]
    """Background objects: (kind ``disc``/``box``, colour, centre, size) behind the garment."""
    brightness: float
    contrast: float
    white_balance: tuple[float, float, float]
    noise: float
    """Standard deviation of Gaussian sensor noise, in 0-255 units."""
    folds: tuple[tuple[Point, Point], ...]
    """Soft crease lines across the garment, in unit coordinates."""
    quality: int
    """JPEG quality the photo is saved with."""


# -- silhouettes -------------------------------------------------------------------------------
def _top(g: Garment, *, dress: bool = False, jacket: bool = False) -> list[list[Point]]:
    """Torso (+ skirt for dresses) and sleeves of a flat-lay top."""
    cx, hw = 0.5, 0.15 * g.width * (1.12 if jacket else 1.0)
    y0 = 0.16 if not dress else 0.1
    y1 = (0.78 if not jacket else 0.84) * g.length if not dress else min(0.93, 0.9 * g.length)
    if dress:
        y1 = max(y1, 0.8)
    sleeveless = g.sleeve_length == "sleeveless"
    shoulder = hw * (0.62 if sleeveless else 1.0)
    neck = 0.055 * g.width
    armpit = y0 + 0.15
    waist = y0 + 0.3
    hem = hw * (1.9 if dress else 1.04)
    body: list[Point] = [
        (cx - neck, y0), (cx - neck * 0.5, y0 + 0.045), (cx, y0 + (0.03 if jacket else 0.06)),
        (cx + neck * 0.5, y0 + 0.045), (cx + neck, y0), (cx + shoulder, y0 + 0.02),
    ]
    if sleeveless:
        body += [(cx + shoulder + 0.02, armpit - 0.06), (cx + hw, armpit)]
    else:
        body += [(cx + hw, y0 + 0.03), (cx + hw, armpit)]
    if dress:
        body += [(cx + hw * 0.82, waist), (cx + hem, y1), (cx - hem, y1), (cx - hw * 0.82, waist)]
    else:
        body += [(cx + hw * 1.02, y1), (cx - hw * 1.02, y1)]
    if sleeveless:
        body += [(cx - hw, armpit), (cx - shoulder - 0.02, armpit - 0.06)]
    else:
        body += [(cx - hw, armpit), (cx - hw, y0 + 0.03)]
    body += [(cx - shoulder, y0 + 0.02)]
    shapes = [body]
    if g.sleeve_length == "short":
        for side in (-1, 1):
            shapes.append([(cx + side * (hw - 0.01), y0 + 0.03), (cx + side * (hw + 0.13), y0 + 0.12),
                           (cx + side * (hw + 0.08), y0 + 0.2), (cx + side * (hw - 0.01), armpit)])
    elif g.sleeve_length == "long":
        wrist = min(y1 + 0.02, 0.9) if not dress else y0 + 0.5
        for side in (-1, 1):
            shapes.append([(cx + side * (hw - 0.01), y0 + 0.03), (cx + side * (hw + 0.11), y0 + 0.12),
                           (cx + side * (hw + 0.19), wrist), (cx + side * (hw + 0.1), wrist + 0.02),
                           (cx + side * (hw - 0.01), armpit + 0.02)])
    return shapes


def _trousers(g: Garment) -> list[list[Point]]:
    cx, hw = 0.5, 0.14 * g.width
    y0, y1 = 0.1, min(0.94, 0.9 * g.length)
    crotch, gap, hem = 0.42, 0.012, hw * 0.95
    return [[(cx - hw, y0), (cx + hw, y0), (cx + hw * 1.08, y0 + 0.12), (cx + hem, y1),
             (cx + gap, y1), (cx, crotch), (cx - gap, y1), (cx - hem, y1), (cx - hw * 1.08, y0 + 0.12)]]


def _skirt(g: Garment) -> list[list[Point]]:
    cx, hw = 0.5, 0.14 * g.width
    y0, y1 = 0.26, 0.26 + 0.46 * g.length
    flare = hw * (1.35 + 0.5 * (g.width - 0.85))
    return [[(cx - hw, y0), (cx + hw, y0), (cx + hw, y0 + 0.05), (cx + flare, y1),
             (cx, y1 + 0.015), (cx - flare, y1), (cx - hw, y0 + 0.05)]]


def _shoe(g: Garment) -> list[list[Point]]:
    k = 0.16 * (g.length - 1.0)
    upper = [(0.16 - k, 0.6), (0.17 - k, 0.38), (0.3 - k, 0.4), (0.46, 0.47), (0.62, 0.5),
             (0.76 + k, 0.53), (0.85 + k, 0.57), (0.86 + k, 0.6)]
    return [upper]


def _sole(g: Garment) -> list[Point]:
    k = 0.16 * (g.length - 1.0)
    return [(0.14 - k, 0.6), (0.88 + k, 0.6), (0.88 + k, 0.64), (0.84 + k, 0.66), (0.15 - k, 0.66)]


def silhouette(g: Garment) -> list[list[Point]]:
    """The garment's filled polygons in unit coordinates."""
    if g.category == "t-shirt":
        return _top(g)
    if g.category == "dress":
        return _top(g, dress=True)
    if g.category == "jacket":
        return _top(g, jacket=True)
    if g.category == "trousers":
        return _trousers(g)
    if g.category == "skirt":
        return _skirt(g)
    return _shoe(g)


# -- fabric ------------------------------------------------------------------------------------
def fabric(g: Garment, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Float RGB of the garment's colour and pattern at garment coordinates ``(u, v)``."""
    base = np.asarray(g.rgb, dtype=np.float32)
    accent = np.asarray(g.accent, dtype=np.float32)
    if g.pattern_angle == 90:
        u, v = v, u
    period = 0.07 * g.pattern_scale
    if g.pattern == "stripes":
        weight = (np.mod(v, period) < period * 0.38).astype(np.float32)
    elif g.pattern == "checks":
        rows = np.mod(v, period) < period * 0.3
        cols = np.mod(u, period) < period * 0.3
        weight = np.minimum(0.55 * rows + 0.55 * cols, 1.0).astype(np.float32)
    elif g.pattern == "dots":
        spacing = period * 1.1
        row = np.floor(v / spacing)
        dy = np.mod(v, spacing) - spacing / 2
        dx = np.mod(u + np.mod(row, 2) * spacing / 2, spacing) - spacing / 2
        weight = (dx * dx + dy * dy < (spacing * 0.22) ** 2).astype(np.float32)
    else:
        weight = np.zeros(u.shape, dtype=np.float32)
    weight = weight[..., None]
    return base * (1 - weight) + accent * weight


# -- scene -------------------------------------------------------------------------------------
class _Pose:
    """Maps garment coordinates (unit square) to pixels of a ``size`` frame, and back."""

    def __init__(self, shot: Shot, size: int) -> None:
        self.size = size
        self.span = shot.scale * size
        theta = np.deg2rad(shot.angle)
        self.cos, self.sin = float(np.cos(theta)), float(np.sin(theta))
        self.cx = size / 2 + shot.offset[0] * size
        self.cy = size / 2 + shot.offset[1] * size

    def to_pixels(self, points: list[Point], factor: int = 1) -> list[Point]:
        """Counter-clockwise rotation on screen (y points down), then scale and shift."""
        out = []
        for u, v in points:
            x, y = (u - 0.5) * self.span, (v - 0.5) * self.span
            out.append(((self.cx + x * self.cos + y * self.sin) * factor,
                        (self.cy - x * self.sin + y * self.cos) * factor))
        return out

    def to_garment(self) -> tuple[np.ndarray, np.ndarray]:
        """Garment coordinates ``(u, v)`` of every pixel centre."""
        yy, xx = np.mgrid[0 : self.size, 0 : self.size].astype(np.float32) + 0.5
        dx, dy = xx - self.cx, yy - self.cy
        u = (dx * self.cos - dy * self.sin) / self.span + 0.5
        v = (dx * self.sin + dy * self.cos) / self.span + 0.5
        return u, v


def _backdrop(shot: Shot, size: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    top, bottom = (np.asarray(c, np.float32) for c in shot.background)
    canvas = np.broadcast_to(top * (1 - t) + bottom * t, (size, size, 3)).copy()
    if shot.floor is not None:
        canvas[int(shot.floor * size):] *= 0.82
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for kind, colour, (x, y), extent in shot.props:
        r = extent * size / 2
        box = (x * size - r, y * size - r, x * size + r, y * size + r)
        (draw.ellipse if kind == "disc" else draw.rectangle)(box, fill=colour)
    return np.asarray(image, np.float32)


def _smooth_mask(size: int, draw_fn) -> np.ndarray:
    """A [0, 1] float mask drawn at twice ``size`` by ``draw_fn(ImageDraw)`` and box-reduced."""
    big = Image.new("L", (2 * size, 2 * size), 0)
    draw_fn(ImageDraw.Draw(big))
    return np.asarray(big.reduce(2), np.float32) / 255.0


def _ink(g: Garment, polygons: list[list[Point]]) -> list[list[Point]]:
    """Dark lines in garment coordinates: outlines, a jacket's placket, a waistband, laces."""
    lines = [poly + [poly[0]] for poly in polygons]
    top, bottom = min(y for _, y in polygons[0]), max(y for _, y in polygons[0])
    if g.category == "jacket":
        lines.append([(0.5, top + 0.03), (0.5, bottom)])
    if g.category in ("trousers", "skirt"):
        lines.append([(0.3, top + 0.035), (0.7, top + 0.035)])
    if g.category == "shoe":
        sole = _sole(g)
        lines.append(sole + [sole[0]])
        lines += [
            [(0.38 + 0.05 * i, 0.45 + 0.012 * i), (0.42 + 0.05 * i, 0.43 + 0.012 * i)] for i in range(4)
        ]
    return lines


def render(g: Garment, shot: Shot, size: int = 224, rng: np.random.Generator | None = None) -> Image.Image:
    """A ``size`` x ``size`` RGB product photo of ``g`` taken as ``shot``.

    ``rng`` drives only the fabric grain and the sensor noise; the same generator state gives
    the same pixels.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    pose = _Pose(shot, size)
    polygons = silhouette(g)
    width = max(1, size // 110)

    mask = _smooth_mask(
        size,
        lambda d: (
            [d.polygon(pose.to_pixels(p, 2), fill=255) for p in polygons]
            + ([d.polygon(pose.to_pixels(_sole(g), 2), fill=255)] if g.category == "shoe" else [])
        ),
    )
    ink = _smooth_mask(size, lambda d: [d.line(pose.to_pixels(line, 2), fill=255, width=2 * width)
                                        for line in _ink(g, polygons)])
    u, v = pose.to_garment()
    garment = fabric(g, u, v)
    if g.category == "shoe":
        sole = _smooth_mask(size, lambda d: d.polygon(pose.to_pixels(_sole(g), 2), fill=255))[..., None]
        sole_colour = np.asarray((238, 236, 230) if sum(g.rgb) < 420 else (45, 42, 40), np.float32)
        garment = garment * (1 - sole) + sole_colour * sole
    creases = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(creases)
    for a, b in shot.folds:
        draw.line(pose.to_pixels([a, b]), fill=255, width=max(1, size // 90))
    crease = np.asarray(creases.filter(ImageFilter.GaussianBlur(size / 200)), np.float32) / 255.0
    direction, strength = shot.light
    light = 1.0 + 2 * strength * ((u - 0.5) * np.cos(direction) + (v - 0.5) * np.sin(direction))
    garment *= (light * (1 - 0.22 * crease) * (1 - 0.4 * ink))[..., None]
    grain = rng.standard_normal((size // 2 + 1, size // 2 + 1, 1), dtype=np.float32)
    garment += 4.0 * np.repeat(np.repeat(grain, 2, 0), 2, 1)[:size, :size]

    scene = _backdrop(shot, size)
    shift = max(1, size // 60)
    shadow = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).filter(
        ImageFilter.BoxBlur(max(1, size // 70))), np.float32) / 255.0
    shadow = np.roll(shadow, (shift + size // 180, shift), axis=(0, 1))
    scene *= (1 - 0.35 * shadow)[..., None]
    alpha = mask[..., None]
    photo = scene * (1 - alpha) + garment * alpha
    photo = (photo - 128.0) * shot.contrast + 128.0
    photo *= shot.brightness * np.asarray(shot.white_balance, np.float32)
    photo += np.float32(shot.noise) * rng.standard_normal(photo.shape, dtype=np.float32)
    return Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8))
