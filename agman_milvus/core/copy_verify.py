"""Stage 2 of copy checks: geometric and photometric verification of one candidate.

A candidate found by the copy descriptor is confirmed (or not) from local features:

1. **Local features.** SIFT keypoints (up to :data:`N_FEATURES`) detected on the grey image at
   :data:`SIFT_SIDE` px (its longer side) and placed in the frame of the grey image resized so
   its longer side is :data:`WORK_SIDE` px (small queries are upscaled), in which every fit's
   pixel thresholds are set; plus a :data:`THUMB_SIDE` px grey thumbnail and a
   :data:`CHROMA_SIDE` px colour (Cr, Cb) thumbnail for the photometric check.
2. **Geometry.** Lowe's ratio test (a matrix product of the query's descriptors with each
   candidate's, :func:`verify_all`), then a RANSAC similarity (rotation, scale, translation) from
   the candidate to the query, or a general affine one when it explains 1.25x the matches (a
   copy stretched to another aspect ratio). A mirrored query is tried as well when the direct
   fit is weak, so flipped copies verify too: its keypoints mirrored first, the mirror image's
   own SIFT keypoints only where that fit beats the direct one (and in the dense alignment
   below, when the mirrored query's frame looks more like the candidate's). A query that
   frames a pasted picture (:mod:`agman_milvus.core.pasted`) has each candidate not beyond
   doubt verified against that picture alone too, with its own keypoints. A fit that leaves
   cells differing (below) but could still score is refined by ECC from it (:func:`_refined`):
   on a repeating pattern or a small copy's few keypoints RANSAC can settle a little off.
3. **Photometry.** Catalogue photos from one shoot (same model and pose, another product or
   colour) align well and give dozens of inliers; what tells them apart is the picture itself.
   The candidate is warped onto the query, one global brightness/contrast change is fitted,
   and a 16-px cell (at :data:`WORK_SIDE`) differs when its mean difference stays above
   :data:`CELL_DIFF` grey levels. Shoot-mates often differ only in colour (a pink and a blue
   shirt are one grey), so a cell also differs when its colour about grey (Cr, Cb) does, by
   over :data:`CHROMA_DIFF`, after one global saturation factor is fitted (brightness,
   contrast and saturation changes scale it; a greyscale copy fits a factor of 0 and shows no
   colour difference). The residual is the share of differing cells among the overlap's
   *content* cells: those where the candidate shows something (not flat, near-white
   backdrop) or that differ. A product on a white backdrop fills a small part of its photo;
   counted over the whole overlap, another product's difference was diluted.
   A pixelated picture (:func:`pixel_block`: its edges fall on a regular grid) is compared a
   second time with both images smoothed at its block size, so the blocks' edges do not count
   as differences; that score (``smoothed_score``) makes a copy only by the margin rule below.
   Textureless, blurred or pixelated pictures give too few good keypoints for a fit; for them
   (or on request, ``dense=True``, for a query's best candidates) a dense alignment (OpenCV's
   ECC, affine, started from "same frame") is tried when the fit fails, and its correlation
   with the residual gives the score (``method="dense"``).
4. **Score.** A logistic model over (log inliers, inlier ratio, matched-region coverage,
   residual), coefficients :data:`SCORE_WEIGHTS` fitted on the synthetic edit benchmark
   (``bench/copydetect.py --fit``).
5. **Copy score** (:func:`copy_scores`), over all of one query's verified candidates: each
   candidate's score weighed against the best *other* candidate's (:data:`COPY_WEIGHTS`),
   unless the verification alone is beyond doubt (:data:`SURE`); it may lower a score, and
   raise it by :data:`MAX_LIFT` at most. A candidate matched by :data:`DECISIVE_INLIERS`
   keypoint inliers is weighed against the others' keypoint verifications only. A pixelated
   picture's smoothed score goes through the same model against the other candidates' best
   evidence, never taken as sure on its own.
   Catalogue photos from one shoot often align with a query almost as well as each other; a
   copy's original stands out. The copy thresholds over this score come from calibration.

Everything is in the query's (or candidate's) *original* pixel coordinates in the returned
:class:`Verification`, so the matched region and the inlier lines can be drawn on the images a
reviewer sees (:func:`draw_evidence`).
"""

from __future__ import annotations

import io
import math
import struct
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import cv2
import numpy as np
from PIL import Image

from agman_milvus.core.pasted import Box
from agman_milvus.core.phash import hamming

__all__ = [
    "COPY_WEIGHTS", "SAME_PICTURE_BITS", "EarlierFeatures", "LocalFeatures", "SCORE_WEIGHTS", "Verification",
    "copy_margins", "copy_scores", "draw_evidence", "evidence_jpeg", "extract", "features_vector",
    "frame_correlation", "frames_resemble", "margins",
    "same_picture", "score", "verify", "verify_all",
]

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
RATIO = 0.8
RANSAC_PX = 8.0  # reprojection threshold at WORK_SIDE
CELL = 8  # residual cell side at THUMB_SIDE (16 px at WORK_SIDE)
CELL_DIFF = 16.0  # grey levels (0-255) a cell's mean difference may keep after the fit
CHROMA_DIFF = 10.0  # Cr/Cb levels a cell's mean colour difference may keep after the fit
GREY_BLUR = 1.2  # Gaussian sigma (thumbnail pixels) of both grey thumbnails before cells are compared
CHROMA_BLUR = 0.6  # the same for the colour thumbnails (half the grey ones' side)
BACKGROUND_GREY = 235.0  # a candidate cell lighter than this, and flat, is backdrop, not content
CONTENT_SPREAD = 6.0  # grey levels of spread within a cell that make it content all the same
MIN_INLIERS = 6
AFFINE_GAIN = 1.25  # inliers a general affine fit must add over the similarity to replace it
MAX_STRETCH = 2.0  # the most one axis may be scaled against the other in an affine fit
MIRROR_BELOW = 0.9  # score under which the mirrored query is tried too
#: A fit of the query's keypoints mirrored (:meth:`LocalFeatures.flipped`) from which, when it
#: beats the direct fit, it is fitted again with the mirror image's own SIFT keypoints. On 240
#: edited catalogue photos against 20 candidates each, that pass ran for 14 of them, among them
#: both originals whose second-pass fit beat their direct and flipped fits (docs/benchmarks.md).
MIRROR_AGAIN = 0.05
MAX_LINES = 40  # inlier pairs kept for drawing
#: JPEG quality of an evidence picture: on 224 px catalogue photos about 20 KB in 2-3 ms, where
#: an optimised PNG took 55-80 KB and 50-90 ms (lines and outline stay legible)
EVIDENCE_QUALITY = 85
ECC_QUARTER_ITERATIONS = 50  # dense alignment: iterations on quarter-size thumbnails, then
ECC_HALF_ITERATIONS = 50  # on half-size ones (from close, most stop early), then
ECC_FINE_ITERATIONS = 20  # at full size (the correlation that scores it is the full size's)
#: ECC stops when an iteration raises its correlation by less than this. 1e-5 ran most alignments
#: to their iteration cap; at 1e-4 verification took 47 ms a query instead of 76 and no
#: verification's score moved by more than 0.006 (docs/benchmarks.md)
ECC_EPS = 1e-4
#: Half-size correlation under which the dense alignment stops there: a score needs a full-size
#: correlation of about 0.87. Catalogue photos (centred products on white) align well with each
#: other: on bench/copydetect.py (2,000 references, seed 0) 2,330 of 4,294 dense alignments
#: passed 0.8 at half size, the full-size pass costing 40 of their 49 s; every alignment that
#: scored 0.1 or more (263, plain or smoothed) had 0.88 or more. From 0.8 to 0.85 (with
#: :data:`ECC_QUARTER_MIN` 0.7 -> 0.8) verification took 44.5 ms a query instead of 50.3 on seed
#: 1, every verdict and recall@1 the same (docs/benchmarks.md, "Dense alignments stopped sooner").
ECC_HALF_MIN = 0.85
#: Quarter-size correlation under which the dense alignment stops there. With the quarter-size
#: pass (at 0.7), an ECC alignment took 2.7 ms instead of 4.2 and verification 36.7 ms a query
#: instead of 39.7 at 2,000 references, 2 of 601 originals' copy verdicts fewer. Unrelated
#: catalogue photos correlate at about 0.73 there (median); every alignment that scored 0.1 or
#: more on bench/copydetect.py's seed 0 (above) had 0.866 or more, so 0.8 stops a further 616 of
#: the 4,294 at quarter size, none of those (docs/benchmarks.md).
ECC_QUARTER_MIN = 0.8
#: Keypoints under which (in either image) the dense alignment is tried when the fit fails. 60
#: when SIFT ran at 448 px; at :data:`SIFT_SIDE` a photo holds about half as many keypoints and a
#: quarter of catalogue photos fell under 60: on bench/copydetect.py at 2,000 references 45 took
#: the verification from 47.6 to 42.8 and 45.7 to 43.3 ms a query (two seeds), 1 of 1,202
#: originals fewer called a copy; at 1,000 every verdict at the default lines stayed (30: one
#: copy verdict fewer, no faster than 45) (docs/benchmarks.md).
DENSE_BELOW = 45
#: How much better the mirrored query's tiny thumbnail must correlate with the candidate's than
#: the query's own for a weak dense alignment to be tried on the mirrored query too.
MIRROR_FRAME_MARGIN = 0.02
#: Correlation of tiny grey thumbnails (the query's or its mirror's with the candidate's) under
#: which :func:`frames_resemble` says a dense alignment from "same frame" cannot succeed.
FRAME_RESEMBLES = 0.4
#: The most a pixelated picture's blocks may be stretched along one axis against the other
#: (:func:`pixel_block`): ``paste`` resizes a picture by 1.3-2.0 per axis, up to 1.54 apart.
MAX_BLOCK_STRETCH = 1.6
BLOCK_BLUR = 0.5  # Gaussian sigma, in blocks, that smooths a pixelated picture's blocks away
#: The factor on a score with a pixelated picture's blocks smoothed away that sets a floor under
#: the copy score: at the block size, another product of one shoot can look the same (on
#: bench/copydetect.py, 2 of 240 queries without an original scored 0.84 and 0.91 so), so taken
#: alone it flags a near-duplicate; :func:`copy_scores` makes a copy of it only by its margin.
PIXELATED_MAX = 0.6

#: Logistic weights over :func:`features_vector`: bias, log(1+inliers), inlier ratio, coverage,
#: residual. Fitted by ``bench/copydetect.py --fit`` on edited catalogue photos (500 references,
#: 500 queries, seed 7; docs/benchmarks.md), again when SIFT moved to :data:`SIFT_SIDE` (fewer
#: keypoints: fewer inliers for the same fit).
SCORE_WEIGHTS = (-8.326, 2.92, 5.181, -6.044, -7.752)

#: Logistic weights of the copy score over (1, verification score, its margin over the best
#: other candidate's). Fitted, as ``bench/copydetect.py --fit`` now does, on the verifications
#: of one benchmark run (500 references, 500 queries, seed 7; cross-validated on halves: "copy"
#: recall at precision 0.99 from 0.64 / 0.48 with the verification score alone to 0.81 / 0.76).
#: Refitted with the score above, the margin carries it all (the score's own weight is near 0).
COPY_WEIGHTS = (-4.677, -0.298, 12.891)
#: A verification score from which a candidate is a copy on its own, whatever the others score
#: (many inliers, nothing left differing: a pixel copy beside look-alike photos of the same
#: product line, which the margin alone called a near-duplicate). 0.95, not 0.93: on two seeds
#: of bench/copydetect.py, 3 of the 7 wrong "copy" calls scored 0.93-0.95; weighed against the
#: other candidates, 2 of them are no longer copies, and 1 of 720 originals lost its verdict.
SURE = 0.95
#: The most the other candidates' weakness may raise a verification score: unbounded, a weak
#: alignment with nothing else near was lifted to 0.99 (an unrelated photo in `agman demo`). With
#: both rules, on three benchmark runs (docs/benchmarks.md): micro-AP 0.878-0.910, the default
#: threshold's precision 0.981-0.993 at recall 0.72-0.74, and the verdict calibrated for 99%
#: on half the queries kept recall 0.53-0.76 on the other half (0.28-0.78 without them).
MAX_LIFT = 0.1
#: A keypoint fit is refined by ECC (:func:`_refined`) when its residual is above
#: REFINE_ABOVE and its score, were nothing left differing, would reach REFINE_FROM.
REFINE_ABOVE = 0.1
REFINE_FROM = 0.3
#: Keypoint inliers from which a candidate is weighed against keypoint verifications only
#: (:func:`copy_scores`).
DECISIVE_INLIERS = 20
#: pHash distance under which two catalogue images show one picture (they do not count against
#: each other in :func:`margins`).
SAME_PICTURE_BITS = 2

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
        with these (:func:`verify_all`)."""
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
        first call: the frame comparisons (:func:`frames_resemble`) take it for every candidate."""
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


def features_vector(inliers: int, ratio: float, coverage: float, residual: float) -> np.ndarray:
    """The score model's inputs (with a leading 1 for the bias)."""
    return np.array([1.0, math.log1p(inliers), ratio, coverage, residual])


def score(inliers: int, ratio: float, coverage: float, residual: float,
          weights: tuple[float, ...] = SCORE_WEIGHTS) -> float:
    """Probability-like copy score in [0, 1]."""
    return _logistic(float(np.dot(weights, features_vector(inliers, ratio, coverage, residual))))


def _logistic(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z))))


def same_picture(a: int | None, b: int | None) -> bool:
    """Whether two catalogue images show one picture (e.g. one photo filed under two products):
    their pHashes, where both are known, within :data:`SAME_PICTURE_BITS`."""
    return a is not None and b is not None and hamming(a, b) <= SAME_PICTURE_BITS


def margins(scores: Sequence[float], hashes: Sequence[int | None] | None = None,
            others: Sequence[float] | None = None) -> list[float]:
    """Each candidate's score minus the best score among the *other* candidates (``others``:
    the scores to compare with, default ``scores`` themselves), leaving out those that show the
    same picture (:func:`same_picture`; ``hashes``: the candidates' pHashes)."""
    hashes = [None] * len(scores) if hashes is None else hashes
    others = scores if others is None else others
    return [s - max((t for k, t in enumerate(others) if k != i and not same_picture(hashes[i], hashes[k])),
                    default=0.0)
            for i, s in enumerate(scores)]


def copy_margins(scores: Sequence[float], hashes: Sequence[int | None] | None = None,
                 inliers: Sequence[int] | None = None) -> list[float]:
    """The margins :func:`copy_scores` weighs each verification ``scores`` by: :func:`margins`,
    except that a candidate verified by :data:`DECISIVE_INLIERS` keypoint ``inliers`` or more
    (per candidate, 0 for a dense alignment) is weighed against keypoint verifications only."""
    margin = margins(scores, hashes)
    if inliers is not None and max(inliers, default=0) >= DECISIVE_INLIERS:
        keypoint_rivals = [s if n > 0 else 0.0 for s, n in zip(scores, inliers, strict=True)]
        by_keypoints = margins(scores, hashes, keypoint_rivals)
        margin = [k if n >= DECISIVE_INLIERS else m
                  for m, k, n in zip(margin, by_keypoints, inliers, strict=True)]
    return margin


def copy_scores(scores: Sequence[float], hashes: Sequence[int | None] | None = None,
                weights: tuple[float, ...] = COPY_WEIGHTS,
                smoothed: Sequence[float] | None = None,
                inliers: Sequence[int] | None = None) -> list[float]:
    """Copy scores of one query's candidates from their verification ``scores`` and
    :func:`margins` (``hashes``: the candidates' pHashes, None where unknown). A score of at
    least :data:`SURE` is kept as it is; none is raised by more than :data:`MAX_LIFT`.

    A candidate verified by :data:`DECISIVE_INLIERS` keypoint inliers or more (``inliers``: per
    candidate, 0 for a dense alignment) is weighed against the other candidates' keypoint
    verifications only: keypoints that match it that well would match the query's own
    original as well, so a candidate that aligned only densely (a look-alike's outline) is
    no rival to it.

    Where a pixelated picture was compared (``smoothed``: :attr:`Verification.smoothed_score`),
    the smoothed score goes through the same margin model, weighed against the other
    candidates' best evidence (score or smoothed score) and never taken as sure on its own: at
    the block size, another product of one shoot can look the same, but then it has a
    look-alike beside it. The copy score is the larger of the two, and at least the smoothed
    score times :data:`PIXELATED_MAX` (a near-duplicate for a reviewer when the margin is small).
    """
    margin = copy_margins(scores, hashes, inliers)
    out = [s if s >= SURE else _margin_model(s, m, weights) for s, m in zip(scores, margin, strict=True)]
    if smoothed is not None and any(smoothed):
        best = [max(s, t) for s, t in zip(scores, smoothed, strict=True)]
        out = [max(pixelated_floor(c, t), _margin_model(t, margin, weights) if t > 0 else 0.0)
               for c, t, margin in zip(out, smoothed, margins(smoothed, hashes, best), strict=True)]
    return out


def _margin_model(score: float, margin: float, weights: tuple[float, ...]) -> float:
    """The copy model over a verification score and its margin, lifting by :data:`MAX_LIFT` at most."""
    return min(score + MAX_LIFT, _logistic(weights[0] + weights[1] * score + weights[2] * margin))


def pixelated_floor(score: float, smoothed: float) -> float:
    """``score``, raised to the ``smoothed`` score (a pixelated picture's blocks smoothed away)
    scaled by :data:`PIXELATED_MAX`."""
    return max(score, PIXELATED_MAX * smoothed)


_NONE = Verification(score=0.0, inliers=0, matches=0, inlier_ratio=0.0, coverage=0.0, residual=1.0,
                     mirrored=False)


def verify(query: LocalFeatures, candidate: LocalFeatures, *, dense: bool = False) -> Verification:
    """Verify ``candidate`` against ``query`` (and the mirrored query when the direct fit is
    weak: :func:`_mirrored_fits`). The dense alignment is tried
    when the fit fails and either image has few keypoints, or always with ``dense``."""
    return verify_all(query, [candidate], dense=[dense])[0]


def verify_all(query: LocalFeatures, candidates: Sequence[LocalFeatures], *,
               dense: Sequence[bool] | None = None,
               dense_if_few: Sequence[bool] | None = None) -> list[Verification]:
    """:func:`verify` for each of one query's ``candidates`` (``dense``: per candidate).
    ``dense_if_few`` (per candidate, default all) limits the few-keypoints dense alignment to
    the candidates it marks. A query with a pasted picture (:meth:`LocalFeatures.pasted`) has
    each candidate not beyond doubt (:data:`SURE`) verified against that picture alone too, the
    better verification kept, in the whole query's pixels: at :data:`SIFT_SIDE` the whole query
    often holds too few of the picture's keypoints for a fit (a picture on a third of a
    520 x 400 query). A pixelated pasted picture, whose blocks defeat SIFT, is aligned densely
    where the frames resemble (:func:`frames_resemble`)."""
    pairs = _ratio_matches_many(query.descriptors, [c.descriptors for c in candidates])
    best = [_verify_one(query, c, p, mirrored=False) for c, p in zip(candidates, pairs, strict=True)]
    weak = [i for i, v in enumerate(best) if v.score < MIRROR_BELOW]
    mirrored = _mirrored_fits(query, [candidates[i] for i in weak], [best[i] for i in weak])
    for i, flipped in zip(weak, mirrored, strict=True):
        if flipped.rank > best[i].rank:
            best[i] = flipped
    for i, candidate in enumerate(candidates):
        few = (min(len(query.points), len(candidate.points)) < DENSE_BELOW
               and (dense_if_few is None or dense_if_few[i]))
        wanted = dense is not None and dense[i] and best[i].score < 0.5
        if best[i].score < MIRROR_BELOW and (few or wanted):
            aligned = _verify_dense(query, candidate)
            if aligned.score < 0.5 and _frame_looks_mirrored(query, candidate):
                flipped = _verify_dense(query.flipped(), candidate, mirrored=True)
                if flipped.rank > aligned.rank:
                    aligned = flipped
            if aligned.rank > best[i].rank:
                best[i] = aligned
    pixelated = query.pasted_block > 0
    unsure = [i for i, v in enumerate(best) if v.score < SURE]
    if query.pasted_image is not None and unsure:
        picture = query.pasted()
        if pixelated:
            picture_dense = picture_few = [frames_resemble(picture, candidates[i]) for i in unsure]
        else:
            picture_dense = None if dense is None else [dense[i] for i in unsure]
            picture_few = None if dense_if_few is None else [dense_if_few[i] for i in unsure]
        inner = verify_all(picture, [candidates[i] for i in unsure], dense=picture_dense,
                           dense_if_few=picture_few)
        for i, v in zip(unsure, inner, strict=True):
            if v.rank > best[i].rank:
                best[i] = v.moved(*query.pasted_at)
    return best


def _mirrored_fits(query: LocalFeatures, candidates: Sequence[LocalFeatures],
                   direct: Sequence[Verification]) -> list[Verification]:
    """The mirrored query's keypoint fit of each of ``candidates`` (``direct``: their direct
    fits): first with the query's own keypoints mirrored (:meth:`LocalFeatures.flipped`); where
    that fit scores :data:`MIRROR_AGAIN` or more, above the direct fit but not beyond doubt
    (:data:`SURE`), again with the mirror image's SIFT keypoints (:meth:`LocalFeatures.mirrored`),
    the better fit kept. Most queries have no such candidate and skip that SIFT pass."""
    if not candidates:
        return []
    flipped = query.flipped()
    pairs = _ratio_matches_many(flipped.descriptors, [c.descriptors for c in candidates])
    fits = [_verify_one(flipped, c, p, mirrored=True) for c, p in zip(candidates, pairs, strict=True)]
    again = [i for i, (fit, d) in enumerate(zip(fits, direct, strict=True))
             if MIRROR_AGAIN <= fit.score < SURE and fit.rank > d.rank]
    if again:
        mirror = query.mirrored()
        pairs = _ratio_matches_many(mirror.descriptors, [candidates[i].descriptors for i in again])
        for i, p in zip(again, pairs, strict=True):
            fit = _verify_one(mirror, candidates[i], p, mirrored=True)
            if fit.rank > fits[i].rank:
                fits[i] = fit
    return fits


def frame_correlation(query: LocalFeatures, candidate: LocalFeatures) -> float:
    """Correlation of the candidate's tiny grey thumbnail with the query's, or with its mirror
    image's where higher."""
    c, q = candidate.tiny(), query.tiny()
    return max(float((q * c).sum()), float((q[:, ::-1] * c).sum()))


def frames_resemble(query: LocalFeatures, candidate: LocalFeatures) -> bool:
    """Whether the query's frame, or its mirror image's, resembles the candidate's enough
    (:data:`FRAME_RESEMBLES`) for a dense alignment to be worth its cost. On the pixelated
    queries of bench/copydetect.py every original that the dense alignment found passed
    (lowest 0.44), a third of the other candidates did not."""
    return frame_correlation(query, candidate) >= FRAME_RESEMBLES


def _frame_looks_mirrored(query: LocalFeatures, candidate: LocalFeatures) -> bool:
    """True when the mirrored query's frame resembles the candidate's more than the query's
    does, by :data:`MIRROR_FRAME_MARGIN` (correlation of tiny grey thumbnails): the dense
    alignment, which starts from "same frame", is then worth trying on the mirrored query."""
    c, q = candidate.tiny(), query.tiny()
    direct, flipped = float((q * c).sum()), float((q[:, ::-1] * c).sum())
    return flipped > direct + MIRROR_FRAME_MARGIN


def _tiny(thumb: np.ndarray, side: int = 24) -> np.ndarray:
    """``thumb`` at ``side`` x ``side`` px, zero-mean, unit norm."""
    t = cv2.resize(np.ascontiguousarray(thumb), (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)
    t -= t.mean()
    return t / max(float(np.linalg.norm(t)), 1e-6)


def _verify_dense(q: LocalFeatures, c: LocalFeatures, mirrored: bool = False) -> Verification:
    """ECC affine alignment of the thumbnails from "same frame", then the residual check
    (``mirrored``: ``q`` holds the mirrored query's features). A pixelated query is aligned
    with both thumbnails' blocks smoothed away (:data:`BLOCK_BLUR`; the demo's coarsest pasted
    blocks held ECC's correlation with the original at 0.81, 0.91 blurred by 3 px); that correlation goes into
    the smoothed score, the plain one (at the alignment found) into the score."""
    (qh, qw), (ch, cw) = q.thumb.shape, c.thumb.shape
    warp = np.array([[cw / qw, 0, 0], [0, ch / qh, 0]], np.float32)  # query -> candidate (thumbs)
    sigma = BLOCK_BLUR * q.block * qw / q.size[0]  # the query's blocks, thumbnail pixels
    smooth = sigma > GREY_BLUR  # more than the blur every comparison of grey cells has (_grey_cells)
    q_img, c_img = q.thumb, c.thumb
    if smooth:
        q_img = cv2.GaussianBlur(q.thumb, (0, 0), sigma)
        c_img = cv2.GaussianBlur(c.thumb, (0, 0), sigma * cw / qw)
    try:
        cc, warp = _ecc_coarse(q_img, c_img, warp, stop_below=ECC_QUARTER_MIN)
        if cc < ECC_HALF_MIN:
            return _NONE
        criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, ECC_FINE_ITERATIONS, ECC_EPS)
        cc, warp = cv2.findTransformECC(q_img, c_img, warp, cv2.MOTION_AFFINE, criteria, None, 5)
    except cv2.error:
        return _NONE
    smoothed_cc = cc
    if smooth:
        aligned = cv2.warpAffine(c.thumb, warp, (qw, qh), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
        cc = cv2.computeECC(q.thumb, aligned)
    mt = cv2.invertAffineTransform(warp)  # candidate -> query, thumb pixels
    kq = q.thumb.shape[1] / (q.size[0] * q.scale)
    kc = c.thumb.shape[1] / (c.size[0] * c.scale)
    m = np.hstack([mt[:, :2] * (kc / kq), mt[:, 2:] / kq])  # work pixels
    residual, colour = _residual(q, c, m)
    z = 30.0 * (float(cc) - 0.9) - 10.0 * residual
    blocks = _smoothed_residual(q, c, m)
    smoothed = 0.0 if blocks is None else _logistic(30.0 * (float(smoothed_cc) - 0.9) - 10.0 * blocks)
    work_c = (c.size[0] * c.scale, c.size[1] * c.scale)
    corners = np.array([[0, 0], [work_c[0], 0], [work_c[0], work_c[1]], [0, work_c[1]]], np.float64)
    quad = corners @ m[:, :2].T + m[:, 2]
    return Verification(
        score=_logistic(z), inliers=0, matches=0, inlier_ratio=0.0,
        coverage=float(cc), residual=residual, mirrored=mirrored, method="dense", colour_residual=colour,
        smoothed_score=smoothed, transform=_to_original(m, q, c, mirrored).tolist(),
        region=[list(map(float, p)) for p in _query_original(quad, q, mirrored)],
    )


def _ecc_coarse(q_img: np.ndarray, c_img: np.ndarray, warp: np.ndarray,
                   stop_below: float = -1.0) -> tuple[float, np.ndarray]:
    """ECC's affine ``warp`` (query -> candidate pixels) refined on both images at quarter
    size, then at half size (an iteration costs a sixteenth and a quarter of a full-size one;
    the full-size pass then starts close), and its correlation there. Stops at quarter size
    when the correlation there is under ``stop_below``."""
    cc, warp = _ecc_scaled(q_img, c_img, warp, 4, ECC_QUARTER_ITERATIONS, 1)
    if cc < stop_below:
        return cc, warp
    return _ecc_scaled(q_img, c_img, warp, 2, ECC_HALF_ITERATIONS, 3)


def _ecc_scaled(q_img: np.ndarray, c_img: np.ndarray, warp: np.ndarray, factor: int, iterations: int,
                gauss: int) -> tuple[float, np.ndarray]:
    """ECC's affine ``warp`` (query -> candidate pixels) refined on both images shrunk by
    ``factor`` (``gauss``: ECC's smoothing kernel there), and its correlation there."""
    q_small, c_small = (cv2.resize(img, (img.shape[1] // factor, img.shape[0] // factor),
                                   interpolation=cv2.INTER_AREA) for img in (q_img, c_img))
    sq, sc = q_small.shape[1] / q_img.shape[1], c_small.shape[1] / c_img.shape[1]
    small = np.hstack([warp[:, :2] * (sc / sq), warp[:, 2:] * sc]).astype(np.float32)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, iterations, ECC_EPS)
    cc, small = cv2.findTransformECC(q_small, c_small, small, cv2.MOTION_AFFINE, criteria, None, gauss)
    return float(cc), np.hstack([small[:, :2] * (sq / sc), small[:, 2:] / sc]).astype(np.float32)


def _ratio_matches_many(q: np.ndarray, candidates: Sequence[np.ndarray]) -> list[list[tuple[int, int]]]:
    """Lowe's ratio test of the query's descriptors against each candidate's: ``(query index,
    candidate index)`` pairs whose nearest neighbour in that candidate is under :data:`RATIO`
    times the second nearest (L2).

    A matrix product per candidate, query rows by candidate rows (so that each query row's two
    nearest are found along contiguous memory), instead of a brute-force matcher. SIFT
    descriptors are integers up to 255, so every squared distance is an integer below 2^24 and
    float32 computes it exactly: the pairs are those of OpenCV's brute-force matcher (up to ties).
    """
    out: list[list[tuple[int, int]]] = [[] for _ in candidates]
    if len(q) < 2:
        return out
    qf = q.astype(np.float32)
    q_sq = np.einsum("ij,ij->i", qf, qf)[:, None]
    rows = np.arange(len(qf))
    for i, c in enumerate(candidates):
        if len(c) < 2:
            continue
        cf = c.astype(np.float32)
        dist = qf @ cf.T  # [query rows, candidate rows]
        dist *= -2.0
        dist += np.einsum("ij,ij->i", cf, cf)[None, :]
        dist += q_sq
        nearest = dist.argmin(axis=1)
        d1 = dist[rows, nearest]
        dist[rows, nearest] = np.inf
        d2 = dist.min(axis=1)
        keep = np.sqrt(np.maximum(d1, 0.0)) < RATIO * np.sqrt(np.maximum(d2, 0.0))
        out[i] = list(zip(rows[keep].tolist(), nearest[keep].tolist(), strict=True))
    return out


def _verify_one(q: LocalFeatures, c: LocalFeatures, pairs: list[tuple[int, int]],
                mirrored: bool) -> Verification:
    if len(pairs) < MIN_INLIERS:
        return replace(_NONE, matches=len(pairs), mirrored=mirrored)
    qi, ci = np.array(pairs).T
    src, dst = c.points[ci], q.points[qi]
    m, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_PX,
                                          maxIters=2000, confidence=0.995)
    if m is None or mask is None:
        return replace(_NONE, matches=len(pairs), mirrored=mirrored)
    inl = mask.ravel().astype(bool)
    n = int(inl.sum())
    if n >= MIN_INLIERS and AFFINE_GAIN * n <= len(pairs):  # else no fit could gain enough
        m, inl, n = _stretched(src, dst, m, inl, n)
    s = math.sqrt(abs(np.linalg.det(m[:, :2])))
    if n < MIN_INLIERS or not 0.05 < s < 20:
        return replace(_NONE, matches=len(pairs), inliers=n, inlier_ratio=n / len(pairs), mirrored=mirrored)
    residual, colour = _residual(q, c, m)
    if residual > REFINE_ABOVE and score(n, n / len(pairs), 0.0, 0.0) >= REFINE_FROM:
        refined = _refined(q, c, m)
        if refined is not None:
            better = _residual(q, c, refined)
            if better[0] < residual:
                m, (residual, colour) = refined, better
    work_q = (round(q.size[0] * q.scale), round(q.size[1] * q.scale))
    work_c = (round(c.size[0] * c.scale), round(c.size[1] * c.scale))
    corners = np.array([[0, 0], [work_c[0], 0], [work_c[0], work_c[1]], [0, work_c[1]]], np.float32)
    quad = corners @ m[:, :2].T + m[:, 2]
    rect = np.array([[0, 0], [work_q[0], 0], [work_q[0], work_q[1]], [0, work_q[1]]], np.float32)
    overlap, _ = cv2.intersectConvexConvex(quad.astype(np.float32), rect)
    hull = cv2.contourArea(cv2.convexHull(dst[inl].astype(np.float32)))
    coverage = float(min(1.0, hull / overlap)) if overlap > 1 else 0.0
    sc = score(n, n / len(pairs), coverage, residual)
    blocks = _smoothed_residual(q, c, m)
    smoothed = 0.0 if blocks is None else score(n, n / len(pairs), coverage, blocks)
    return Verification(
        score=sc, inliers=n, matches=len(pairs), inlier_ratio=n / len(pairs), coverage=coverage,
        residual=residual, colour_residual=colour, mirrored=mirrored, smoothed_score=smoothed,
        transform=_to_original(m, q, c, mirrored).tolist(),
        region=[list(map(float, p)) for p in _query_original(quad, q, mirrored)],
        lines=[[*map(float, _query_original(dst[k:k + 1], q, mirrored)[0]),
                *map(float, src[k] / c.scale)] for k in np.flatnonzero(inl)[:MAX_LINES]],
    )


def _refined(q: LocalFeatures, c: LocalFeatures, m: np.ndarray) -> np.ndarray | None:
    """The keypoint fit ``m`` (candidate -> query, work pixels) refined by ECC on half-size
    thumbnails (:func:`_ecc_coarse`; a pixel there is a quarter of a residual cell): on a
    repeating pattern or a small copy's few keypoints RANSAC may settle a little off (a
    polka-dot dress pasted at 47 px: 3% in scale, the cells along every edge differing). None
    when ECC fails."""
    kq = q.thumb.shape[1] / (q.size[0] * q.scale)  # thumb pixels per work pixel
    kc = c.thumb.shape[1] / (c.size[0] * c.scale)
    warp = cv2.invertAffineTransform(np.hstack([m[:, :2] * (kq / kc), m[:, 2:] * kq]).astype(np.float32))
    try:
        _, warp = _ecc_coarse(q.thumb, c.thumb, warp.astype(np.float32))
    except cv2.error:
        return None
    mt = cv2.invertAffineTransform(warp)
    return np.hstack([mt[:, :2] * (kc / kq), mt[:, 2:] / kq])


def _stretched(src: np.ndarray, dst: np.ndarray, m: np.ndarray, inl: np.ndarray,
               n: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The similarity fit, or a general affine one (another aspect ratio: a copy stretched to
    fit a layout) when that explains at least :data:`AFFINE_GAIN` times as many matches."""
    a, mask = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_PX,
                                   maxIters=2000, confidence=0.995)
    if a is None or mask is None:
        return m, inl, n
    a_inl = mask.ravel().astype(bool)
    a_n = int(a_inl.sum())
    sx, sy = np.linalg.norm(a[:, 0]), np.linalg.norm(a[:, 1])
    if a_n >= AFFINE_GAIN * n and 1 / MAX_STRETCH < sx / sy < MAX_STRETCH:
        return a, a_inl, a_n
    return m, inl, n


def _query_original(points: np.ndarray, q: LocalFeatures, mirrored: bool) -> np.ndarray:
    """Work-image points of the (possibly mirrored) query -> original query pixels."""
    out = np.asarray(points, np.float64) / q.scale
    if mirrored:
        out[:, 0] = q.size[0] - out[:, 0]
    return out


def _to_original(m: np.ndarray, q: LocalFeatures, c: LocalFeatures, mirrored: bool) -> np.ndarray:
    """The 2x3 candidate -> query map in original pixels."""
    full = np.vstack([m, [0, 0, 1]])
    sc = np.diag([c.scale, c.scale, 1.0])
    sq = np.diag([1 / q.scale, 1 / q.scale, 1.0])
    flip = np.array([[-1, 0, q.size[0]], [0, 1, 0], [0, 0, 1]], float) if mirrored else np.eye(3)
    return (flip @ sq @ full @ sc)[:2]


def _residual(q: LocalFeatures, c: LocalFeatures, m: np.ndarray,
              smooth: bool = False) -> tuple[float, float]:
    """Shares of the overlap's *content* cells that still differ after the photometric fits:
    (in grey level or in colour, in colour alone); (1.0, 0.0) when the overlap is too small to
    tell. Content cells are those showing something in the candidate (not plain background:
    darker than :data:`BACKGROUND_GREY` or textured) or differing; a product on a white
    backdrop is otherwise a small share of its own photo."""
    grey = _grey_cells(q, c, m, smooth)
    if grey is None:
        return 1.0, 0.0
    differs, usable, content = grey
    colour = _colour_cells(q, c, m, smooth)
    if colour is None:
        colour = np.zeros_like(differs)
    gh, gw = min(differs.shape[0], colour.shape[0]), min(differs.shape[1], colour.shape[1])
    differs, usable, content, colour = (a[:gh, :gw] for a in (differs, usable, content, colour))
    colour &= usable
    counted = usable & (content | differs | colour)
    if counted.sum() < 4:
        counted = usable
    n = float(counted.sum())
    return float((counted & (differs | colour)).sum() / n), float((counted & colour).sum() / n)


def _smoothed_residual(q: LocalFeatures, c: LocalFeatures, m: np.ndarray) -> float | None:
    """The residual with a pixelated query's or candidate's blocks smoothed away; None when
    neither is pixelated (or both with blocks of one size)."""
    return _residual(q, c, m, smooth=True)[0] if _block_sigma(q, c, m, q.thumb) else None


def _warp_onto(q_img: np.ndarray, c_img: np.ndarray, q: LocalFeatures, c: LocalFeatures,
               m: np.ndarray, cell: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The candidate's thumbnail ``c_img`` warped by ``m`` (work pixels) onto the query's
    ``q_img`` (same kind), and the mask of query pixels it covers; None when it covers under
    four ``cell`` x ``cell`` cells."""
    kq = q_img.shape[1] / (q.size[0] * q.scale)  # thumb pixels per work pixel
    kc = c_img.shape[1] / (c.size[0] * c.scale)
    mt = np.hstack([m[:, :2] * (kq / kc), m[:, 2:] * kq])
    h, w = q_img.shape[:2]
    warped = cv2.warpAffine(c_img, mt, (w, h), flags=cv2.INTER_LINEAR)
    valid = cv2.warpAffine(np.full(c_img.shape[:2], 255, np.uint8), mt, (w, h), flags=cv2.INTER_NEAREST)
    valid = cv2.erode(valid, np.ones((3, 3), np.uint8)) > 0
    if valid.sum() < 4 * cell * cell:
        return None
    return warped, valid


def _cell_sums(a: np.ndarray, cell: int) -> np.ndarray:
    """Sums of ``a`` (float32) over ``cell`` x ``cell`` cells (the part that fills whole cells):
    OpenCV's area resize by a whole factor is the cells' mean, 8x faster than numpy's sum over
    a reshape's two axes."""
    gh, gw = a.shape[0] // cell, a.shape[1] // cell
    means = cv2.resize(a[:gh * cell, :gw * cell], (gw, gh), interpolation=cv2.INTER_AREA)
    return means * float(cell * cell)


def _cell_means(a: np.ndarray, valid: np.ndarray, cell: int) -> tuple[np.ndarray, np.ndarray]:
    """Per cell, the mean of ``a`` over its ``valid`` pixels, and whether enough are valid."""
    counts = _cell_sums(valid.astype(np.float32), cell)
    usable = counts >= 0.75 * cell * cell
    return _cell_sums(a * valid, cell) / np.maximum(counts, 1.0), usable


def _grey_cells(q: LocalFeatures, c: LocalFeatures, m: np.ndarray,
                smooth: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Per :data:`CELL` cell of the query's thumbnail, after one global brightness/contrast fit
    of the warped candidate: (differs by over :data:`CELL_DIFF`, usable, candidate content);
    None when the overlap is too small."""
    onto = _warp_onto(q.thumb, c.thumb, q, c, m, CELL)
    if onto is None:
        return None
    warped, valid = onto
    sigma = _block_sigma(q, c, m, q.thumb) if smooth else 0.0
    if sigma > GREY_BLUR:
        a, b = _smoothed_pair(q.thumb, warped, valid, sigma)
    else:
        a = q.compared()[0]
        b = cv2.GaussianBlur(warped, (0, 0), GREY_BLUR).astype(np.float32)
    x, y = b[valid], a[valid]
    var = float(x.var())
    if var > 1e-3:
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        gain = float(np.dot(x64 - x64.mean(), y64 - y64.mean())) / len(x64) / var  # covariance / var
    else:
        gain = 1.0
    gain = min(3.0, max(0.33, gain))
    offset = float(y.mean() - gain * x.mean())
    diff, usable = _cell_means(np.abs(a - (gain * b + offset)), valid, CELL)
    if int(usable.sum()) < 4:
        return None
    raw = warped.astype(np.float32)
    mean, _ = _cell_means(raw, valid, CELL)
    square, _ = _cell_means(raw * raw, valid, CELL)
    spread = np.sqrt(np.maximum(square - mean * mean, 0.0))
    content = (mean < BACKGROUND_GREY) | (spread > CONTENT_SPREAD)
    return (diff > CELL_DIFF) & usable, usable, content


def _block_sigma(q: LocalFeatures, c: LocalFeatures, m: np.ndarray, q_img: np.ndarray) -> float:
    """The blur (pixels of ``q_img``, a query thumbnail) that smooths the blocks of a pixelated
    query or candidate away before they are compared: 0.0 when neither is pixelated, or both
    with blocks of one size (the candidate's taken at its scale in the query, ``m``: candidate
    -> query work pixels)."""
    c_block = c.block * c.scale * math.sqrt(abs(float(np.linalg.det(m[:, :2])))) / q.scale
    if q.block and c_block and abs(q.block - c_block) <= 0.2 * q.block:
        return 0.0
    return BLOCK_BLUR * max(q.block, c_block) * q_img.shape[1] / q.size[0]


def _smoothed_pair(q_img: np.ndarray, warped: np.ndarray, valid: np.ndarray,
                   sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Both images blurred by ``sigma`` over the overlap only (normalised convolution: what lies
    outside it, padding or the candidate's missing border, does not bleed in)."""
    mask = valid.astype(np.float32)
    weight = np.maximum(cv2.GaussianBlur(mask, (0, 0), sigma), 1e-3)
    if q_img.ndim == 3:  # colour thumbnails: one mask for both channels
        mask, weight = mask[:, :, None], weight[:, :, None]
    a, b = (cv2.GaussianBlur(img.astype(np.float32) * mask, (0, 0), sigma).reshape(img.shape) / weight
            for img in (q_img, warped))
    return a, b


def _colour_cells(q: LocalFeatures, c: LocalFeatures, m: np.ndarray,
                  smooth: bool = False) -> np.ndarray | None:
    """Per cell (the grey cells' grid), whether the colour (Cr, Cb about grey) still differs
    by over :data:`CHROMA_DIFF` after one global saturation factor is fitted (least squares,
    at least 0: a greyscale query fits 0 and differs nowhere); None when too small to tell."""
    cell = max(1, round(CELL * q.chroma.shape[0] / q.thumb.shape[0]))
    onto = _warp_onto(q.chroma, c.chroma, q, c, m, cell)
    if onto is None:
        return None
    warped, valid = onto
    sigma = _block_sigma(q, c, m, q.chroma) if smooth else 0.0
    if sigma > CHROMA_BLUR:
        a, b = (x - 128.0 for x in _smoothed_pair(q.chroma, warped, valid, sigma))
    else:
        a = q.compared()[1]
        b = cv2.GaussianBlur(warped, (0, 0), CHROMA_BLUR).astype(np.float32) - 128.0
    x, y = b[valid], a[valid]
    power = float((x * x).sum())
    factor = min(3.0, max(0.0, float((x * y).sum()) / power)) if power > 1e-3 else 0.0
    d = a - factor * b
    diff, usable = _cell_means(np.sqrt(d[:, :, 0] ** 2 + d[:, :, 1] ** 2), valid, cell)
    return (diff > CHROMA_DIFF) & usable


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
