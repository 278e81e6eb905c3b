"""The evidence of one copy verification (:class:`Verification`) and the picture a reviewer sees
of it (:func:`draw_evidence`): query and candidate side by side, the candidate's outline as
mapped into the query and the inlier pairs joined by lines. Coordinates are the query's (or
candidate's) *original* pixels.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import cv2
import numpy as np
from PIL import Image

from agman_milvus.core.copy_scoring import pixelated_floor

__all__ = ["Verification", "draw_evidence", "evidence_jpeg"]

#: JPEG quality of an evidence picture: on 224 px catalogue photos about 20 KB in 2-3 ms, where
#: an optimised PNG took 55-80 KB and 50-90 ms (lines and outline stay legible)
EVIDENCE_QUALITY = 85


@dataclass
class Verification:
    """The evidence that a candidate is (or is not) a copy of the query."""

    score: float
    inliers: int
    matches: int
    inlier_ratio: float
    coverage: float  # share of the overlap spanned by the inliers (dense: ECC correlation)
    residual: float  # share of the overlap's content cells that still differ (grey or colour)
    mirrored: bool
    method: str = "sift"
    transform: list[list[float]] | None = None  # 2x3, candidate -> query, original pixels
    region: list[list[float]] = field(default_factory=list)  # candidate's outline in the query
    lines: list[list[float]] = field(default_factory=list)  # [xq, yq, xc, yc] inlier pairs
    colour_residual: float = 0.0  # share of the overlap's content cells that differ in colour
    #: the score with a pixelated picture's blocks smoothed away (0.0: neither is pixelated)
    smoothed_score: float = 0.0

    @property
    def rank(self) -> float:
        """The score, or the smoothed one as far as it counts (:func:`pixelated_floor`)."""
        return pixelated_floor(self.score, self.smoothed_score)

    def moved(self, dx: float, dy: float) -> Verification:
        """This verification with its query coordinates moved by ``(dx, dy)`` (one made on a
        part of the query, put back into the whole query's pixels)."""
        transform = None if self.transform is None else [
            [*row[:2], row[2] + d] for row, d in zip(self.transform, (dx, dy), strict=True)]
        return replace(self, transform=transform,
                       region=[[x + dx, y + dy] for x, y in self.region],
                       lines=[[xq + dx, yq + dy, xc, yc] for xq, yq, xc, yc in self.lines])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Verification:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def draw_evidence(query: Image.Image, candidate: Image.Image, v: Verification | dict[str, Any],
                  height: int = 256) -> Image.Image:
    """Query (left) and candidate (right) side by side at ``height`` px: the candidate's outline
    as mapped into the query (the matched region, drawn within the query's side only: a crop's
    original reaches past it) and the inlier pairs joined by lines."""
    if isinstance(v, dict):
        v = Verification.from_dict(v)
    q = np.asarray(query.convert("RGB"))
    c = np.asarray(candidate.convert("RGB"))
    sq, sc = height / q.shape[0], height / c.shape[0]
    q = cv2.resize(q, (max(1, round(q.shape[1] * sq)), height), interpolation=cv2.INTER_AREA)
    c = cv2.resize(c, (max(1, round(c.shape[1] * sc)), height), interpolation=cv2.INTER_AREA)
    if v.region:
        poly = np.round(np.asarray(v.region) * sq).astype(np.int32)
        cv2.polylines(q, [poly], True, (0, 200, 0), 2, cv2.LINE_AA)
    gap = 8
    canvas = np.full((height, q.shape[1] + gap + c.shape[1], 3), 255, np.uint8)
    canvas[:, :q.shape[1]] = q
    canvas[:, q.shape[1] + gap:] = c
    off = q.shape[1] + gap
    for xq, yq, xc, yc in v.lines:
        p1 = (round(xq * sq), round(yq * sq))
        p2 = (round(xc * sc) + off, round(yc * sc))
        cv2.line(canvas, p1, p2, (255, 160, 0), 1, cv2.LINE_AA)
        cv2.circle(canvas, p1, 2, (255, 80, 0), -1, cv2.LINE_AA)
        cv2.circle(canvas, p2, 2, (255, 80, 0), -1, cv2.LINE_AA)
    return Image.fromarray(canvas)


def evidence_jpeg(query: Image.Image, candidate: Image.Image, v: Verification | dict[str, Any]) -> bytes:
    """:func:`draw_evidence` as JPEG bytes (quality :data:`EVIDENCE_QUALITY`)."""
    buf = io.BytesIO()
    draw_evidence(query, candidate, v).save(buf, "JPEG", quality=EVIDENCE_QUALITY)
    return buf.getvalue()
