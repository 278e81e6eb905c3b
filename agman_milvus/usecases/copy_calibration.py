"""Copy thresholds calibrated on edited copies of the catalogue's own images (``agman calibrate``):
:func:`calibrate` (how, in its docstring) and its :class:`CalibrationResult`."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from agman_milvus.core.copy_edits import random_edit
from agman_milvus.core.copy_metrics import micro_average_precision, threshold_for_precision
from agman_milvus.core.errors import AgmanError
from agman_milvus.core.phash import hamming
from agman_milvus.services.store.catalog import Catalog, IndexedSource
from agman_milvus.usecases.copyright import NORM_K, CopyChecker, CopyThresholds, stored_phash, thresholds_path

__all__ = ["MIN_COPY", "MIN_NEAR", "CalibrationResult", "NotEnoughImagesError", "calibrate"]

log = logging.getLogger(__name__)

#: Floors of the calibrated thresholds: a small calibration sample with no hard negative above
#: some score must not open the verdict to every weak geometric match.
MIN_COPY, MIN_NEAR = 0.75, 0.2


class NotEnoughImagesError(AgmanError, RuntimeError):
    """Calibration needs more indexed images than the catalog has."""


@dataclass
class CalibrationResult:
    thresholds: CopyThresholds
    path: Path | None
    queries: int
    positives_found: int
    micro_ap: float

    @property
    def copy_precision(self) -> float:
        return float(self.thresholds.stats.get("copy_precision", 0.0))

    @property
    def copy_recall(self) -> float:
        return float(self.thresholds.stats.get("copy_recall", 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {"thresholds": self.thresholds.to_dict(), "path": str(self.path) if self.path else None,
                "queries": self.queries, "positives_found": self.positives_found,
                "micro_ap": self.micro_ap, "copy_precision": self.copy_precision,
                "copy_recall": self.copy_recall}


def _sample_indexed(catalog: Catalog, n: int, rng: random.Random) -> list[IndexedSource]:
    rows = catalog.images.indexed_sources()
    rng.shuffle(rows)
    return rows[:n]


def calibrate(
    checker: CopyChecker,
    *,
    precision: float = 0.99,
    near_precision: float = 0.90,
    sample: int = 300,
    seed: int = 0,
    attribute_quantile: float = 0.05,
    save_to: Path | None = None,
    batch_size: int = 32,
) -> CalibrationResult:
    """Calibrate the copy thresholds on edited copies of the catalogue's own images.

    For each sampled indexed image two queries are made: an edited copy checked against the
    whole catalogue (a positive: the original should come back), and a second edited copy
    checked as if its original were *not* indexed (its image excluded), so its best candidates
    are realistic hard negatives (look-alike products). Every (query, candidate) pair counts,
    as in ISC2021's micro-AP; the score is stage 2's verification score over stage 1's
    candidates, exactly as a check computes it. ``copy`` is the loosest score threshold with
    ``precision`` (its recall on these queries is reported in ``stats``),
    ``near_duplicate`` the one with ``near_precision``, ``phash_copy`` the largest hash
    distance with ``precision``, and each attribute threshold the ``attribute_quantile`` of the
    true copies' attribute similarities.
    """
    if not 0 < near_precision <= precision <= 1:
        raise ValueError("need 0 < near_precision <= precision <= 1")
    rng = random.Random(seed)
    picks = _sample_indexed(checker.catalog, sample, rng)
    if len(picks) < 2 * NORM_K:
        raise NotEnoughImagesError(
            f"calibration needs at least {2 * NORM_K} indexed images with a stored source; "
            f"the catalogue has {len(picks)}"
        )
    images = [checker.load_image(uri) for _, _, uri in picks]
    scores: list[float] = []
    labels: list[bool] = []
    distances: list[int] = []
    hash_labels: list[bool] = []
    attr_sims: dict[str, list[float]] = {a: [] for a in checker.vectors.schema.names}
    found = 0
    t0 = checker.thresholds
    for start in range(0, len(picks), batch_size):
        chunk = list(range(start, min(start + batch_size, len(picks))))
        queries, exclude, targets, held, backdrops = [], [], [], [], []
        for i in chunk:
            k = rng.randrange(len(images))
            for held_out in (False, True):
                edited, _ = random_edit(images[i], rng, background=images[k])
                queries.append(edited)
                exclude.append({picks[i][0]} if held_out else set())
                targets.append(None if held_out else picks[i][0])
                held.append(picks[i][1] if held_out else None)
                backdrops.append(picks[k][0])
        scored = checker.score_candidates(queries, checker.verify_k, exclude)
        copies: list[tuple[np.ndarray, int]] = []  # each original found: its query's embeddings, its id
        for q, cands, verified, target, held_product, backdrop in zip(
                scored.queries, scored.candidates, checker.verify_scored(scored), targets, held, backdrops,
                strict=True):
            copy_scores = checker.copy_scores(verified, [info for _, _, info in cands])
            for (hit, _, info), score in zip(cands, copy_scores, strict=True):
                if hit.product_id == held_product or hit.image_id == backdrop:
                    continue  # another photo of the held-out product, or the indexed photo a
                    # "paste" edit put the query into: neither copy nor distinct
                is_copy = hit.image_id == target
                scores.append(score)
                labels.append(is_copy)
                found += is_copy
                stored_hash = stored_phash(info)
                if stored_hash is not None:
                    distances.append(hamming(q.phash, stored_hash))
                    hash_labels.append(is_copy)
                if is_copy:
                    copies.append((q.embeddings, hit.image_id))
        originals = [image_id for _, image_id in copies]
        for k, a in enumerate(checker.vectors.schema.names):
            stored = checker.vectors.get_vectors(a, originals)
            attr_sims[a] += [float(np.dot(e[k], stored[i])) for e, i in copies if i in stored]
    positives = len(picks)
    copy_t, copy_recall, copy_prec = threshold_for_precision(scores, labels, positives, precision)
    near_t, near_recall, _ = threshold_for_precision(scores, labels, positives, near_precision)
    hash_t, hash_recall, _ = threshold_for_precision(
        [-d for d in distances], hash_labels, positives, precision)
    ap = micro_average_precision(scores, labels, positives)
    thresholds = CopyThresholds(
        model_version=checker.vectors.model_version,
        copy=max(copy_t, MIN_COPY) if math.isfinite(copy_t) else t0.copy,
        near_duplicate=(min(max(near_t, MIN_NEAR), max(copy_t, MIN_COPY)) if math.isfinite(near_t)
                        else t0.near_duplicate),
        phash_copy=int(-hash_t) if math.isfinite(hash_t) else -1,
        attribute={a: float(np.quantile(v, attribute_quantile)) for a, v in attr_sims.items() if v},
        precision=precision, near_precision=near_precision, calibrated=True,
        calibrated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        stats={"sampled_images": len(picks), "queries": 2 * len(picks), "pairs": len(scores),
               "micro_ap": ap, "copy_recall": copy_recall, "copy_precision": copy_prec,
               "near_duplicate_recall": near_recall, "phash_recall": hash_recall, "seed": seed},
    )
    path = None
    if save_to is not None:
        path = thresholds.save(save_to)
    elif checker.settings is not None:
        path = thresholds.save(thresholds_path(checker.settings.data_dir, thresholds.model_version))
    checker.thresholds = thresholds
    log.info("calibrated copy thresholds for %s: copy >= %.3f (recall %.2f at precision %.2f)",
             thresholds.model_version, thresholds.copy, copy_recall, precision)
    return CalibrationResult(thresholds, path, 2 * len(picks), found, ap)
