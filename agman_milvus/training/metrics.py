"""Evaluation metrics of the paper (ASEN / AG-MAN protocols).

* ASFR mean average precision: per attribute, every query ranks **all** candidates of that
  attribute by descending similarity; a candidate is relevant iff its value equals the query's.
  AP = (1/R) * sum of P@i over relevant ranks i, R = relevant candidates in the whole list;
  R = 0 gives AP 0 and still counts. Per-attribute MAP = mean AP over its queries; overall MAP =
  query-weighted mean over attributes (= mean AP over all queries). Reported x100.
  Ties are broken by a stable sort on candidate order.
* TR accuracy: fraction of triplets with s(anchor, close) > s(anchor, far) (strict).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def average_precision(relevance: np.ndarray) -> float:
    """AP of one ranked 0/1 relevance list; 0.0 when nothing is relevant."""
    relevance = np.asarray(relevance, dtype=bool)
    total = int(relevance.sum())
    if total == 0:
        return 0.0
    ranks = np.flatnonzero(relevance) + 1
    return float((np.arange(1, total + 1) / ranks).mean())


def average_precisions(
    similarity: np.ndarray, query_values: np.ndarray, candidate_values: np.ndarray
) -> np.ndarray:
    """AP of each query row of a [Q, C] similarity matrix (full ranking over the C columns)."""
    similarity = np.asarray(similarity, dtype=np.float64)
    query_values = np.asarray(query_values)
    candidate_values = np.asarray(candidate_values)
    if similarity.shape != (len(query_values), len(candidate_values)):
        raise ValueError(f"similarity shape {similarity.shape} does not match "
                         f"{len(query_values)} queries x {len(candidate_values)} candidates")
    if similarity.size == 0:
        return np.zeros(len(query_values))
    order = np.argsort(-similarity, axis=1, kind="stable")
    relevant = candidate_values[order] == query_values[:, None]
    hits = np.cumsum(relevant, axis=1)
    ranks = np.arange(1, similarity.shape[1] + 1)
    precision_sum = (relevant * hits / ranks).sum(axis=1)
    totals = relevant.sum(axis=1)
    return np.divide(precision_sum, totals, out=np.zeros(len(totals)), where=totals > 0)


@dataclass(frozen=True)
class MAPResult:
    """Per-attribute MAP and query counts, and the query-weighted overall MAP (all x100)."""

    per_attribute: dict[int, float]
    queries: dict[int, int]
    overall: float
    names: dict[int, str] = field(default_factory=dict)
    aps: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def intervals(self, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, list[float]]:
        """Percentile bootstrap intervals (x100) over queries, per attribute and ``overall``
        (queries resampled within each attribute, so the overall keeps its query weights)."""
        rng = np.random.default_rng(seed)
        low, high = 100 * (1 - level) / 2, 100 * (1 + level) / 2
        out: dict[str, list[float]] = {}
        sums = np.zeros(resamples)
        for attribute, aps in self.aps.items():
            draws = aps[rng.integers(0, len(aps), size=(resamples, len(aps)))].sum(axis=1)
            sums += draws
            means = 100.0 * draws / len(aps)
            out[self.names.get(attribute, str(attribute))] = [float(np.percentile(means, low)),
                                                              float(np.percentile(means, high))]
        n = sum(len(a) for a in self.aps.values())
        if n:
            means = 100.0 * sums / n
            out["overall"] = [float(np.percentile(means, low)), float(np.percentile(means, high))]
        return out

    def named_maps(self) -> dict[str, float]:
        """``{attribute name: MAP}``."""
        return {self.names.get(a, str(a)): m for a, m in self.per_attribute.items()}

    def validation_record(self) -> dict[str, object]:
        """The per-epoch validation fields of a training record."""
        return {"score": self.overall, "valid_map": self.overall, "valid_per_attribute": self.named_maps()}

    def to_json(self) -> dict[str, object]:
        return {
            "overall_map": self.overall,
            "per_attribute": {
                self.names.get(a, str(a)): {"map": m, "queries": self.queries[a]}
                for a, m in self.per_attribute.items()
            },
        }


def mean_average_precision(
    query_embeddings: np.ndarray,
    query_attributes: np.ndarray,
    query_values: np.ndarray,
    candidate_embeddings: np.ndarray,
    candidate_attributes: np.ndarray,
    candidate_values: np.ndarray,
    names: dict[int, str] | None = None,
) -> MAPResult:
    """ASFR MAP from unit embeddings (dot product = cosine), x100, spec §4.1."""
    qa, ca = np.asarray(query_attributes), np.asarray(candidate_attributes)
    qv, cv = np.asarray(query_values), np.asarray(candidate_values)
    per_attribute: dict[int, float] = {}
    counts: dict[int, int] = {}
    all_aps: dict[int, np.ndarray] = {}
    total_ap = 0.0
    for attribute in sorted(set(qa.tolist())):
        qmask, cmask = qa == attribute, ca == attribute
        sim = np.asarray(query_embeddings)[qmask] @ np.asarray(candidate_embeddings)[cmask].T
        aps = average_precisions(sim, qv[qmask], cv[cmask])
        per_attribute[attribute] = 100.0 * float(aps.mean())
        counts[attribute] = int(qmask.sum())
        all_aps[attribute] = aps
        total_ap += float(aps.sum())
    n = sum(counts.values())
    overall = 100.0 * total_ap / n if n else 0.0
    return MAPResult(per_attribute, counts, overall, dict(names or {}), all_aps)


def triplet_accuracy(sim_close: np.ndarray, sim_far: np.ndarray) -> float:
    """TR accuracy x100: share of triplets with s(anchor, close) > s(anchor, far), strictly."""
    sim_close, sim_far = np.asarray(sim_close), np.asarray(sim_far)
    if sim_close.shape != sim_far.shape or sim_close.size == 0:
        raise ValueError("need two equally long, non-empty similarity arrays")
    return 100.0 * float((sim_close > sim_far).mean())
