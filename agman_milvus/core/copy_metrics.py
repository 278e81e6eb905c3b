"""Copy-detection metrics over scored (query, reference) pairs, as ISC2021 ranks them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["micro_average_precision", "threshold_for_precision"]


def _curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(bool)
    tp = np.cumsum(y)
    precision = tp / np.arange(1, len(y) + 1)
    return s, tp, precision


def micro_average_precision(scores: Sequence[float], labels: Sequence[bool], positives: int) -> float:
    """ISC2021 micro-AP: one ranked list of every (query, reference, score) prediction;
    ``positives`` counts every query that has a true reference (found or not)."""
    if positives <= 0 or len(scores) == 0:
        return 0.0
    _, tp, precision = _curve(np.asarray(scores, float), np.asarray(labels, bool))
    y = np.diff(np.concatenate([[0], tp])) > 0
    return float((precision * y).sum() / positives)


def threshold_for_precision(
    scores: Sequence[float], labels: Sequence[bool], positives: int, precision: float
) -> tuple[float, float, float]:
    """``(threshold, recall, achieved precision)`` of the loosest threshold that keeps
    ``precision``; the threshold is ``inf`` (nothing passes) when no threshold does."""
    if len(scores) == 0 or positives <= 0:
        return math.inf, 0.0, 1.0
    s, tp, prec = _curve(np.asarray(scores, float), np.asarray(labels, bool))
    # only cut between distinct scores: the operating point is the last index of a score run
    last_of_run = np.append(s[1:] != s[:-1], True)
    ok = np.flatnonzero((prec >= precision) & last_of_run)
    if len(ok) == 0:
        return math.inf, 0.0, 1.0
    k = ok[-1]
    return float(s[k]), float(tp[k] / positives), float(prec[k])
