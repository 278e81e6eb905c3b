"""Stage 2 of copy checks: geometric and photometric verification of one candidate.

A candidate found by the copy descriptor is confirmed (or not) from the local features of both
images (:mod:`agman_milvus.core.copy_features`):

1. **Geometry.** Lowe's ratio test (a matrix product of the query's descriptors with each
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
2. **Photometry.** Catalogue photos from one shoot (same model and pose, another product or
   colour) align well and give dozens of inliers; what tells them apart is the picture itself.
   The candidate is warped onto the query, one global brightness/contrast change is fitted,
   and a 16-px cell (at :data:`~agman_milvus.core.copy_features.WORK_SIDE`) differs when its
   mean difference stays above :data:`CELL_DIFF` grey levels. Shoot-mates often differ only in
   colour (a pink and a blue shirt are one grey), so a cell also differs when its colour about
   grey (Cr, Cb) does, by over :data:`CHROMA_DIFF`, after one global saturation factor is
   fitted (brightness, contrast and saturation changes scale it; a greyscale copy fits a factor
   of 0 and shows no colour difference). The residual is the share of differing cells among
   the overlap's *content* cells: those where the candidate shows something (not flat,
   near-white backdrop) or that differ. A product on a white backdrop fills a small part of its
   photo; counted over the whole overlap, another product's difference was diluted.
   A pixelated picture (:func:`~agman_milvus.core.copy_features.pixel_block`) is compared a
   second time with both images smoothed at its block size, so the blocks' edges do not count
   as differences; that score (``smoothed_score``) makes a copy only by the margin rule of
   :func:`~agman_milvus.core.copy_scoring.copy_scores`.
   Textureless, blurred or pixelated pictures give too few good keypoints for a fit; for them
   (or on request, ``dense=True``, for a query's best candidates) a dense alignment (OpenCV's
   ECC, affine, started from "same frame") is tried when the fit fails, and its correlation
   with the residual gives the score (``method="dense"``).
3. **Score** (:func:`~agman_milvus.core.copy_scoring.score`) over the fit's evidence; the copy
   score weighs it against the query's other candidates
   (:func:`~agman_milvus.core.copy_scoring.copy_scores`).

Everything is in the query's (or candidate's) *original* pixel coordinates in the returned
:class:`~agman_milvus.core.copy_evidence.Verification`, so the matched region and the inlier
lines can be drawn on the images a reviewer sees
(:func:`~agman_milvus.core.copy_evidence.draw_evidence`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import cv2
import numpy as np

from agman_milvus.core.copy_evidence import Verification
from agman_milvus.core.copy_features import CHROMA_BLUR, GREY_BLUR, LocalFeatures
from agman_milvus.core.copy_scoring import SURE, logistic, score

__all__ = ["FRAME_RESEMBLES", "frame_correlation", "frames_resemble", "verify", "verify_all"]

RATIO = 0.8
RANSAC_PX = 8.0  # reprojection threshold at WORK_SIDE
CELL = 8  # residual cell side at THUMB_SIDE (16 px at WORK_SIDE)
CELL_DIFF = 16.0  # grey levels (0-255) a cell's mean difference may keep after the fit
CHROMA_DIFF = 10.0  # Cr/Cb levels a cell's mean colour difference may keep after the fit
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
#: when SIFT ran at 448 px; at ``copy_features.SIFT_SIDE`` a photo holds about half as many keypoints and a
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
BLOCK_BLUR = 0.5  # Gaussian sigma, in blocks, that smooths a pixelated picture's blocks away
#: A keypoint fit is refined by ECC (:func:`_refined`) when its residual is above
#: REFINE_ABOVE and its score, were nothing left differing, would reach REFINE_FROM.
REFINE_ABOVE = 0.1
REFINE_FROM = 0.3


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
    better verification kept, in the whole query's pixels: at ``copy_features.SIFT_SIDE`` the whole query
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
    smoothed = 0.0 if blocks is None else logistic(30.0 * (float(smoothed_cc) - 0.9) - 10.0 * blocks)
    work_c = (c.size[0] * c.scale, c.size[1] * c.scale)
    corners = np.array([[0, 0], [work_c[0], 0], [work_c[0], work_c[1]], [0, work_c[1]]], np.float64)
    quad = corners @ m[:, :2].T + m[:, 2]
    return Verification(
        score=logistic(z), inliers=0, matches=0, inlier_ratio=0.0,
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
