"""Copy scores from verification evidence (:mod:`agman_milvus.core.copy_verify`).

1. **Verification score** (:func:`score`): a logistic model over (log inliers, inlier ratio,
   matched-region coverage, residual), coefficients :data:`SCORE_WEIGHTS` fitted on the
   synthetic edit benchmark (``bench/copydetect.py --fit``).
2. **Copy score** (:func:`copy_scores`), over all of one query's verified candidates: each
   candidate's score weighed against the best *other* candidate's (:data:`COPY_WEIGHTS`),
   unless the verification alone is beyond doubt (:data:`SURE`); it may lower a score, and
   raise it by :data:`MAX_LIFT` at most. A candidate matched by :data:`DECISIVE_INLIERS`
   keypoint inliers is weighed against the others' keypoint verifications only. A pixelated
   picture's smoothed score goes through the same model against the other candidates' best
   evidence, never taken as sure on its own.
   Catalogue photos from one shoot often align with a query almost as well as each other; a
   copy's original stands out. The copy thresholds over this score come from calibration.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from agman_milvus.core.phash import hamming

__all__ = ["COPY_WEIGHTS", "DECISIVE_INLIERS", "PIXELATED_MAX", "SAME_PICTURE_BITS", "SCORE_WEIGHTS", "SURE",
           "copy_margins", "copy_scores", "features_vector", "logistic", "margins", "pixelated_floor",
           "same_picture", "score"]

#: Logistic weights over :func:`features_vector`: bias, log(1+inliers), inlier ratio, coverage,
#: residual. Fitted by ``bench/copydetect.py --fit`` on edited catalogue photos (500 references,
#: 500 queries, seed 7; docs/benchmarks.md), again when SIFT moved to ``copy_features.SIFT_SIDE`` (fewer
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
#: Keypoint inliers from which a candidate is weighed against keypoint verifications only
#: (:func:`copy_scores`).
DECISIVE_INLIERS = 20
#: pHash distance under which two catalogue images show one picture (they do not count against
#: each other in :func:`margins`).
SAME_PICTURE_BITS = 2
#: The factor on a score with a pixelated picture's blocks smoothed away that sets a floor under
#: the copy score: at the block size, another product of one shoot can look the same (on
#: bench/copydetect.py, 2 of 240 queries without an original scored 0.84 and 0.91 so), so taken
#: alone it flags a near-duplicate; :func:`copy_scores` makes a copy of it only by its margin.
PIXELATED_MAX = 0.6


def features_vector(inliers: int, ratio: float, coverage: float, residual: float) -> np.ndarray:
    """The score model's inputs (with a leading 1 for the bias)."""
    return np.array([1.0, math.log1p(inliers), ratio, coverage, residual])


def score(inliers: int, ratio: float, coverage: float, residual: float,
          weights: tuple[float, ...] = SCORE_WEIGHTS) -> float:
    """Probability-like copy score in [0, 1]."""
    return logistic(float(np.dot(weights, features_vector(inliers, ratio, coverage, residual))))


def logistic(z: float) -> float:
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

    Where a pixelated picture was compared (``smoothed``: ``Verification.smoothed_score``),
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
    return min(score + MAX_LIFT, logistic(weights[0] + weights[1] * score + weights[2] * margin))


def pixelated_floor(score: float, smoothed: float) -> float:
    """``score``, raised to the ``smoothed`` score (a pixelated picture's blocks smoothed away)
    scaled by :data:`PIXELATED_MAX`."""
    return max(score, PIXELATED_MAX * smoothed)
