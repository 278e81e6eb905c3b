"""Local features of one image for copy verification (:mod:`agman_milvus.core.copy_verify`).

SIFT keypoints (up to :data:`N_FEATURES`) detected on the grey image at :data:`SIFT_SIDE` px (its
longer side) and placed in the frame of the grey image resized so its longer side is
:data:`WORK_SIDE` px (small queries are upscaled), in which every fit's pixel thresholds are set;
plus a :data:`THUMB_SIDE` px grey thumbnail and a :data:`CHROMA_SIDE` px colour (Cr, Cb)
thumbnail for the photometric check, and the side of a pixelated picture's blocks
(:func:`pixel_block`: its edges fall on a regular grid). :meth:`LocalFeatures.to_bytes` is the
form the keypoint cache stores (:mod:`agman_milvus.services.local_features`).
"""

from __future__ import annotations

import math
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from PIL import Image

from agman_milvus.core.pasted import Box

__all__ = ["CHROMA_BLUR", "GREY_BLUR", "SIFT_SIDE", "WORK_SIDE", "EarlierFeatures", "LocalFeatures",
           "extract", "pixel_block"]

WORK_SIDE = 448
#: SIFT's input side. Detected at WORK_SIDE (224 px catalogue photos upscaled, and SIFT doubles
#: its first octave again) a photo gave 295 keypoints in 38.7 ms, at 224 px 123 in 8.8; the
#: finer octave's keypoints were noise to the edits: at 224, with the score weights refitted, on
#: bench/copydetect.py's 2,000 references recall@1 rose 0.925 / 0.929 -> 0.940 / 0.944 (two
#: seeds) and a screening job ran 1.3x faster (docs/benchmarks.md, "SIFT at 224 px").
SIFT_SIDE = 224
THUMB_SIDE = 224
CHROMA_SIDE = 112
N_FEATURES = 1000
GREY_BLUR = 1.2  # Gaussian sigma (thumbnail pixels) of both grey thumbnails before cells are compared
CHROMA_BLUR = 0.6  # the same for the colour thumbnails (half the grey ones' side)
#: The most a pixelated picture's blocks may be stretched along one axis against the other
#: (:func:`pixel_block`): ``paste`` resizes a picture by 1.3-2.0 per axis, up to 1.54 apart.
MAX_BLOCK_STRETCH = 1.6

#: The header of :meth:`LocalFeatures.to_bytes`: magic (format and version), keypoints, original
#: width and height, scale, pixel block, grey thumbnail's height and width, colour thumbnail's.
_STORED = struct.Struct("<8sIIIddIIII")
_STORED_FAMILY = b"AGLOCF"
_STORED_MAGIC = _STORED_FAMILY + b"02"  # 02: keypoints detected at SIFT_SIDE (01: at WORK_SIDE)


class EarlierFeatures(ValueError):
    """A stored local-features record of an earlier version: its keypoints came from another
    detector setting, so the score model's weights do not fit them; extract them again."""


def _flipped_bins() -> np.ndarray:
    """For a SIFT descriptor (4 x 4 cells by 8 orientation bins, row-major), the source index
    of each entry of its mirror image's: cell row r <- 3 - r, orientation bin o <- -o mod 8."""
    row, col, ori = np.meshgrid(np.arange(4), np.arange(4), np.arange(8), indexing="ij")
    return (((3 - row) * 4 + col) * 8 + (8 - ori) % 8).ravel()


_FLIPPED_BINS = _flipped_bins()

_local = threading.local()


def _detector() -> Any:
    """One SIFT detector per thread (screening threads and workers run checks concurrently)."""
    if getattr(_local, "sift", None) is None:
        _local.sift = cv2.SIFT_create(nfeatures=N_FEATURES)
    return _local.sift


@dataclass
class LocalFeatures:
    """SIFT keypoints of one image (found at ``SIFT_SIDE``, placed in the ``WORK_SIDE`` frame), its
    grey and its colour thumbnails."""

    points: np.ndarray  # [N, 2] float32, work-image pixels
    descriptors: np.ndarray  # [N, 128] uint8
    size: tuple[int, int]  # original (width, height)
    scale: float  # work pixels per original pixel
    thumb: np.ndarray  # [h, w] uint8 grey, longer side THUMB_SIDE
    chroma: np.ndarray  # [h, w, 2] uint8 Cr, Cb (YCrCb), longer side CHROMA_SIDE
    block: float = 0.0  # side of a pixelated picture's blocks (original pixels), 0: not pixelated

    def to_bytes(self) -> bytes:
        """The stored form (:meth:`from_bytes`): a fixed header (:data:`_STORED`), then the
        points, descriptors, grey and colour thumbnails as raw little-endian arrays."""
        header = _STORED.pack(_STORED_MAGIC, len(self.points), *self.size, self.scale, self.block,
                              *self.thumb.shape, *self.chroma.shape[:2])
        return b"".join([header, self.points.astype("<f4").tobytes(), self.descriptors.tobytes(),
                         self.thumb.tobytes(), self.chroma.tobytes()])

    @classmethod
    def from_bytes(cls, data: bytes | bytearray) -> LocalFeatures:
        """Features from :meth:`to_bytes` (:class:`EarlierFeatures` for a record of an earlier
        version, ValueError when ``data`` is no such record, or is cut short). A ``bytearray``
        gives writable arrays over its memory, without copies."""
        if bytes(data[:len(_STORED_MAGIC)]) != _STORED_MAGIC:
            if bytes(data[:len(_STORED_FAMILY)]) == _STORED_FAMILY:
                raise EarlierFeatures(f"local features of format {bytes(data[:8])!r}, not {_STORED_MAGIC!r}")
            raise ValueError("not a local-features record")
        if len(data) < _STORED.size:
            raise ValueError("local-features record cut short")
        _, n, w, h, scale, block, th, tw, ch, cw = _STORED.unpack_from(data)
        parts = {"points": (np.dtype("<f4"), (n, 2)), "descriptors": (np.dtype(np.uint8), (n, 128)),
                 "thumb": (np.dtype(np.uint8), (th, tw)), "chroma": (np.dtype(np.uint8), (ch, cw, 2))}
        if len(data) != _STORED.size + sum(t.itemsize * math.prod(s) for t, s in parts.values()):
            raise ValueError("local-features record of the wrong length")
        arrays, offset = {}, _STORED.size
        for name, (dtype, shape) in parts.items():
            count = math.prod(shape)
            arrays[name] = np.frombuffer(data, dtype, count, offset).reshape(shape)
            offset += dtype.itemsize * count
        return cls(arrays["points"], arrays["descriptors"], (w, h), scale, arrays["thumb"], arrays["chroma"],
                   block)

    work: np.ndarray | None = field(default=None, repr=False)  # the grey work image (queries)
    #: a query's pasted picture (:func:`agman_milvus.core.pasted.pasted_region`), cut out, and
    #: its top-left corner in the query's original pixels
    pasted_image: Image.Image | None = field(default=None, repr=False, compare=False)
    pasted_at: tuple[int, int] = (0, 0)
    pasted_block: float = 0.0  # the pasted picture's pixel block: 0.0 unless it is pixelated
    _mirror: LocalFeatures | None = field(default=None, init=False, repr=False, compare=False)
    _flipped: LocalFeatures | None = field(default=None, init=False, repr=False, compare=False)
    _pasted: LocalFeatures | None = field(default=None, init=False, repr=False, compare=False)
    _compared: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False,
                                                            compare=False)
    _tiny_thumb: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def mirrored(self) -> LocalFeatures:
        """The features of the mirrored image, extracted on the first call. SIFT on the mirror
        image keeps partly other keypoints than :meth:`flipped` has (on catalogue photos 7-46%
        of them sit where no mirrored keypoint does), so a promising mirrored fit is made again
        with these (:func:`~agman_milvus.core.copy_verify.verify_all`)."""
        if self._mirror is None:
            chroma = self.flipped().chroma  # flipped() refuses features without a work image
            self._mirror = _extract_grey(np.ascontiguousarray(self.work[:, ::-1]), self.size, self.scale,
                                         chroma, self.block)
        return self._mirror

    def flipped(self) -> LocalFeatures:
        """The mirror image's features without a second SIFT pass, on the first call: these
        keypoints mirrored (x -> work width - 0.5 - x, where SIFT's own on the mirror image
        fall), each descriptor's rows of cells reversed and its orientation bins negated, as a
        horizontal flip turns them in the keypoint's frame (median 0-7% from SIFT's own
        descriptor at the same point on catalogue photos), the thumbnails flipped; no work
        image (fits and dense alignments do not read it)."""
        if self.work is None:
            raise ValueError("the mirror image's features need features from extract(), not stored ones")
        if self._flipped is None:
            points = self.points.copy()
            points[:, 0] = self.work.shape[1] - 0.5 - points[:, 0]
            self._flipped = LocalFeatures(
                points, np.ascontiguousarray(self.descriptors[:, _FLIPPED_BINS]), self.size, self.scale,
                np.ascontiguousarray(self.thumb[:, ::-1]), np.ascontiguousarray(self.chroma[:, ::-1]),
                self.block)
        return self._flipped

    def compared(self) -> tuple[np.ndarray, np.ndarray]:
        """The grey and the colour thumbnail as a query's residual compares them (float32,
        blurred by :data:`GREY_BLUR` and :data:`CHROMA_BLUR`, colour about grey), computed on
        the first call: a query is compared with up to 20 candidates."""
        if self._compared is None:
            self._compared = (cv2.GaussianBlur(self.thumb, (0, 0), GREY_BLUR).astype(np.float32),
                              cv2.GaussianBlur(self.chroma, (0, 0), CHROMA_BLUR).astype(np.float32) - 128.0)
        return self._compared

    def tiny(self) -> np.ndarray:
        """The grey thumbnail at 24 x 24 px, zero-mean, unit norm (:func:`_tiny`), computed on the
        first call: the frame comparisons
        (:func:`~agman_milvus.core.copy_verify.frames_resemble`) take it for every candidate."""
        if self._tiny_thumb is None:
            self._tiny_thumb = _tiny(self.thumb)
        return self._tiny_thumb

    def pasted(self) -> LocalFeatures | None:
        """The features of the query's pasted picture (None without one), extracted on the
        first call: a framed query whose candidate is a copy beyond doubt does not need them."""
        if self._pasted is None and self.pasted_image is not None:
            self._pasted = extract(self.pasted_image, self.pasted_block)
        return self._pasted


def _resize_side(image: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    h, w = image.shape[:2]
    s = side / max(w, h)
    interp = cv2.INTER_CUBIC if s > 1 else cv2.INTER_AREA
    return cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=interp), s


def _extract_grey(work: np.ndarray, size: tuple[int, int], scale: float,
                  chroma: np.ndarray, block: float) -> LocalFeatures:
    sift_image, _ = _resize_side(work, SIFT_SIDE)
    kps, desc = _detector().detectAndCompute(sift_image, None)
    order = np.argsort([-k.response for k in kps], kind="stable")  # strongest first
    points = np.array([kps[i].pt for i in order], np.float32).reshape(-1, 2)
    # SIFT's points sit a quarter pixel past the pixel centres (its first octave is the image
    # doubled): onto the work image in that same convention (each axis rounds on its own), so a
    # mirrored point is still at work width - 0.5 - x (:meth:`LocalFeatures.flipped`)
    to_work = np.array([work.shape[1] / sift_image.shape[1], work.shape[0] / sift_image.shape[0]], np.float32)
    points = (points + 0.25) * to_work - 0.25
    descriptors = (np.zeros((0, 128), np.uint8) if desc is None
                   else np.clip(np.rint(desc[order]), 0, 255).astype(np.uint8))
    thumb, _ = _resize_side(work, THUMB_SIDE)
    return LocalFeatures(points, descriptors, size, scale, thumb, chroma, block, work)


def extract(image: Image.Image, block: float | None = None, pasted: Box | None = None,
            pasted_block: float = 0.0) -> LocalFeatures:
    """Local features of ``image`` (any mode); ``block``: its :func:`pixel_block` when the
    caller has it already; ``pasted``: a query's pasted picture (its
    :func:`~agman_milvus.core.pasted.pasted_region`) and ``pasted_block`` that picture's pixel
    block, kept for :meth:`LocalFeatures.pasted`."""
    rgb = image.convert("RGB")
    grey = np.asarray(rgb.convert("L"))
    work, scale = _resize_side(grey, WORK_SIDE)
    small, _ = _resize_side(np.asarray(rgb), CHROMA_SIDE)
    chroma = np.ascontiguousarray(cv2.cvtColor(small, cv2.COLOR_RGB2YCrCb)[:, :, 1:])
    features = _extract_grey(work, image.size, scale, chroma, pixel_block(grey) if block is None else block)
    if pasted is not None:
        features.pasted_image = rgb.crop(pasted)
        features.pasted_at = (pasted[0], pasted[1])
        features.pasted_block = pasted_block
    return features


def pixel_block(grey: np.ndarray) -> float:
    """The side of the blocks (pixels) of a pixelated picture, 0.0 for any other.

    Along each axis, the neighbour differences averaged over the other axis peak where the
    blocks meet: a pixelated picture's peaks are evenly spaced (at least 3 px apart, 70% of the
    gaps within 15% of the median); a photo's are not. The two spacings may differ by up to
    :data:`MAX_BLOCK_STRETCH` (a pixelated picture pasted at another aspect ratio), and the
    block is their geometric mean. Pixelation followed by a rescale, a pad or a paste is found
    too; followed by JPEG, blur or rotation mostly not.
    """
    if min(grey.shape) < 3:
        return 0.0
    spacing = []
    for profile in _edge_profiles(grey):
        inner = profile[1:-1]
        peaks = np.flatnonzero((inner > profile[:-2]) & (inner >= profile[2:])
                               & (inner > 2 * np.median(profile) + 0.5)) + 1
        if len(peaks) < 6:
            return 0.0
        gaps = np.diff(peaks)
        median = float(np.median(gaps))
        regular = np.abs(gaps - median) <= max(1.0, 0.15 * median)
        if median < 3 or regular.mean() <= 0.7:
            return 0.0
        spacing.append(float(gaps[regular].mean()))
    wide, narrow = max(spacing), min(spacing)
    return math.sqrt(wide * narrow) if wide <= MAX_BLOCK_STRETCH * narrow else 0.0


def _edge_profiles(grey: np.ndarray, stripe: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The mean absolute grey difference across each column boundary and each row boundary,
    read in stripes of ``stripe`` rows (a few MB at a time, whatever the photo's size)."""
    h, w = grey.shape
    across_columns = np.zeros(w - 1)
    across_rows = np.empty(h - 1)
    for top in range(0, h - 1, stripe):
        rows = grey[top : top + stripe + 1].astype(np.int16)  # one more row: the next boundary
        across_columns += np.abs(np.diff(rows[:stripe], axis=1)).sum(axis=0)
        across_rows[top : top + len(rows) - 1] = np.abs(np.diff(rows, axis=0)).mean(axis=1)
    if (h - 1) % stripe == 0:  # the last row was not in any stripe's first ``stripe`` rows
        across_columns += np.abs(np.diff(grey[-1].astype(np.int16)))
    return across_columns / h, across_rows


def _tiny(thumb: np.ndarray, side: int = 24) -> np.ndarray:
    """``thumb`` at ``side`` x ``side`` px, zero-mean, unit norm."""
    t = cv2.resize(np.ascontiguousarray(thumb), (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)
    t -= t.mean()
    return t / max(float(np.linalg.norm(t)), 1e-6)
