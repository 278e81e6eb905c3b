"""Find a picture pasted into another: the axis-aligned rectangle framed by long straight edges.

A copy pasted into another photo (a collage, an advert, a screenshot) or padded with a border
keeps its own frame: four straight edges, each a step between the copy and what surrounds it.
The copy then fills only part of the query, so its descriptor is swamped by the surroundings
and its keypoints are few at the query's scale; searching and verifying the region alone
gives it the whole frame (:func:`agman_milvus.usecases.copyright.query_views`,
:func:`agman_milvus.core.copy_verify.verify_all`).

On a grey image resized to :data:`SIDE` px, a column is a candidate side where many of its
pixels are a step between their left and right neighbours; a side *supports* a rectangle when
its share of step pixels along the rectangle's span exceeds, by :data:`SUPPORT`, the share of
the most stepped nearby parallel line (:data:`NEAR`): stripes, checks and garment outlines step
along many nearby lines too, a pasted picture's frame along one. A side that steps almost
everywhere (:data:`CLEAR`) is compared with the calmer of its two sides only: a picture pasted
right beside a busy one still shows its frame. A rectangle needs three such sides (the fourth
may be the image border; four are preferred), each at least :data:`MIN_SIDE` of the image's,
and covers at most :data:`MAX_AREA` of it. On 200 catalogue photos, 9 had such a rectangle
(bags, wallets, folded shirts: a product's own straight outline; the region is then the
product, searched and verified once more); of edited ones, 28 of 34 padded and 7 of 29 pasted
(a product on white pasted into a photo on white shows no frame).
"""

from __future__ import annotations

from itertools import combinations

import cv2
import numpy as np

__all__ = ["Box", "pasted_region"]

#: (left, top, right, bottom) in pixels, right and bottom exclusive.
Box = tuple[int, int, int, int]

SIDE = 256  # longer side of the grey image the rectangle is found in
STEP = 12.0  # grey levels between a pixel's two neighbours across a line that make it a step
LINES = 8  # candidate lines per axis (the most stepped, at least 4 px apart)
MIN_SIDE = 0.25  # a side's least length, as a share of the image's side along it
MAX_AREA = 0.8  # the largest share of the image a region may cover
SUPPORT = 0.5  # how much more of a side must step than of the most stepped nearby line
NEAR = (5, 10)  # nearby lines: this many px away (at SIDE), on either side
CLEAR = 0.9  # the share of step pixels from which a side is compared with its calmer side only
_BAND = np.arange(-2, 3)  # a candidate line and those up to 2 px away
_NEAR_ONE_SIDE = np.arange(NEAR[0], NEAR[1] + 1)


def pasted_region(grey: np.ndarray) -> Box | None:
    """The frame of a picture pasted into (or padded inside) ``grey`` (H x W uint8), in its
    pixels, or None."""
    h0, w0 = grey.shape
    if min(h0, w0) < 16:
        return None
    s = SIDE / max(h0, w0)
    g = cv2.resize(grey, (max(1, round(w0 * s)), max(1, round(h0 * s))), interpolation=cv2.INTER_AREA)
    g = g.astype(np.int16)
    h, w = g.shape
    # step pixels along any span of a line: differences of cumulative sums down the lines
    by_column = _cumulative(_steps(g))  # [h+1, w]: steps across the column at x, rows 0..y
    by_row = _cumulative(_steps(np.ascontiguousarray(g.T)))  # [w+1, h]: across the row at y
    xs = sorted({*_lines(by_column[-1], h), 0, w})
    ys = sorted({*_lines(by_row[-1], w), 0, h})
    inner_xs, inner_ys = [x for x in xs if 0 < x < w], [y for y in ys if 0 < y < h]
    # spans between two candidate lines long enough for a side, and each line's support over them
    x_spans = [(x0, x1) for x0, x1 in combinations(xs, 2) if x1 - x0 >= MIN_SIDE * w]
    y_spans = [(y0, y1) for y0, y1 in combinations(ys, 2) if y1 - y0 >= MIN_SIDE * h]
    columns = {(y0, y1): _support(by_column, inner_xs, y0, y1) for y0, y1 in y_spans}
    rows = {(x0, x1): _support(by_row, inner_ys, x0, x1) for x0, x1 in x_spans}
    best: tuple[tuple[int, float, int], Box] | None = None
    for x0, x1 in x_spans:
        for y0, y1 in y_spans:
            area = (x1 - x0) * (y1 - y0)
            if area > MAX_AREA * w * h:
                continue
            sides = [columns[y0, y1][x] for x in (x0, x1) if 0 < x < w]
            sides += [rows[x0, x1][y] for y in (y0, y1) if 0 < y < h]
            if len(sides) < 3 or min(sides) < SUPPORT:
                continue
            key = (len(sides), min(sides), area)  # four sides first, then the clearest, the largest
            if best is None or key > best[0]:
                best = (key, (x0, y0, x1, y1))
    if best is None:
        return None
    x0, y0, x1, y1 = best[1]
    # each side where its steps lie, around its candidate line
    left, right = (_step_centre(by_column, x, y0, y1) if 0 < x < w else x for x in (x0, x1))
    top, bottom = (_step_centre(by_row, y, x0, x1) if 0 < y < h else y for y in (y0, y1))
    return (round(left / s), round(top / s), min(w0, round(right / s)), min(h0, round(bottom / s)))


def _steps(g: np.ndarray) -> np.ndarray:
    """Per pixel, 1 where the grey levels of its left and right neighbours (two apart, so a
    resampled step still counts) differ by more than :data:`STEP`, also marking the pixels
    beside it (a step one pixel off the line still counts); 0 elsewhere."""
    step = np.zeros(g.shape, np.uint8)
    step[:, 1:-1] = np.abs(g[:, 2:] - g[:, :-2]) > STEP
    widened = step.copy()
    widened[:, 1:] |= step[:, :-1]
    widened[:, :-1] |= step[:, 1:]
    return widened


def _cumulative(steps: np.ndarray) -> np.ndarray:
    """Cumulative sums down each column, with a leading row of zeros."""
    out = np.zeros((steps.shape[0] + 1, steps.shape[1]), np.int32)
    np.cumsum(steps, axis=0, out=out[1:])
    return out


def _lines(totals: np.ndarray, length: int) -> list[int]:
    """The :data:`LINES` positions with the most step pixels (at least a side's least length),
    at least 4 apart."""
    picked: list[int] = []
    for x in np.argsort(-totals, kind="stable"):
        if totals[x] < MIN_SIDE * length or len(picked) == LINES:
            break
        if all(abs(int(x) - p) > 3 for p in picked):
            picked.append(int(x))
    return picked


def _support(cumulative: np.ndarray, lines: list[int], start: int, stop: int) -> dict[int, float]:
    """For each of ``lines``: the share of step pixels from ``start`` to ``stop`` along it (or
    along a line up to 2 px away, where that share is larger: the most stepped line of the
    whole image may be off a span's, as candidates are at least 4 px apart), less the largest
    share along a nearby parallel line (:data:`NEAR`; none beyond the image), or for a side of
    :data:`CLEAR` steps, along a nearby line on its calmer side, where that is less."""
    shares = np.pad((cumulative[stop] - cumulative[start]) / (stop - start), NEAR[1])
    at = np.asarray(lines, np.intp)[:, None] + NEAR[1]
    own = shares[at + _BAND].max(axis=1)
    before, after = shares[at - _NEAR_ONE_SIDE].max(axis=1), shares[at + _NEAR_ONE_SIDE].max(axis=1)
    near = np.where(own >= CLEAR, np.minimum(before, after), np.maximum(before, after))
    return dict(zip(lines, (own - near).tolist(), strict=True))


def _step_centre(cumulative: np.ndarray, line: int, start: int, stop: int) -> float:
    """The boundary between pixels where the steps from ``start`` to ``stop`` lie within 3 px
    of ``line`` (one step marks 4 pixels, ``line`` among them): the pixels' positions weighted
    by their steps, whose mean lies half a pixel before the boundary."""
    near = np.arange(max(0, line - 3), min(cumulative.shape[1], line + 4))
    steps = cumulative[stop, near] - cumulative[start, near]
    return float((near * steps).sum() / steps.sum()) + 0.5 if steps.sum() > 0 else float(line)
