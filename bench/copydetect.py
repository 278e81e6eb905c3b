"""Copy-detection benchmark on the fashion-products catalogue (ISC2021-style metrics).

A reference set of catalogue photos; queries are edited copies of references (1-3 random edits
from :data:`agman_milvus.core.copy_edits.EDITS`: crop, rescale, JPEG, rotation, flip, colour
jitter, grayscale, blur, padding, text overlay, pixelation, pasted into another catalogue photo)
plus edited copies of photos that are NOT references (the catalogue has photos from one shoot,
so these are realistic hard negatives). The catalogue holds identical photos under different
product ids: a query whose source is pixel-identical (16x16 grey, 5-bit) to a reference counts
that reference as a true original, whether the source is a reference or not.

Methods, on the same queries, each giving up to ``TOP`` (query, reference, score) predictions:

* ``phash``: 64-bit DCT hash, score = -hamming distance;
* ``imagenet_gap``: global average pooling of the ImageNet MobileNetV2 trunk's last map;
* ``descriptor``: the checker's copy descriptor (GeM p=3 + L2 over that map), normalised score
  ``cos - NORM_BETA * cos_NORM_K``;
* ``candidates``: the checker's descriptor source: descriptors of the query, its mirror image,
  a blurred copy and a pasted picture it frames (``copyright.query_views``), merged;
* ``voting``: the checker's local-feature source (:mod:`agman_milvus.core.copy_vote`): the
  references' keypoints in a Milvus Lite collection written and searched by
  :class:`VectorStore`, score = votes;
* ``verified_descriptor_only``: stage 2 of the checker on the first ``VERIFY_K`` descriptor
  candidates (:mod:`agman_milvus.core.copy_verify`: SIFT + RANSAC + photometric residual),
  score = the copy score (``copy_scoring.copy_scores``);
* ``verified_without_margin``: stage 2 on both sources' candidates, taken alternately as the
  checker does (``VERIFY_K`` + ``VOTE_K`` at most, up to a sure copy:
  ``copyright.verify_in_order``; no voting candidates for a query whose first descriptor
  candidate, verified before the vote, is a sure copy), score = the verification score alone;
* ``verified``: the same candidates, score = the copy score, as the checker decides.

Metrics: micro-AP, recall@1, candidate recall (true original among the verified candidates),
per edit kind (a query with several edits counts in each). Verdicts ("copy" when score >= t):
with the shipped default threshold, and with t calibrated for 99% precision on half the queries
and measured on the other half. ``--fit`` refits the verification score's and then the copy
score's logistic weights on the calibration half (printed; paste into
``copy_scoring.SCORE_WEIGHTS`` and ``COPY_WEIGHTS``). Checks/s: stage 1 (the query's pixel blocks
and pasted frame, query + 2 or 3 views embedding, query keypoints, voting: the queries voted for
are reported) and stage 2 (verification, the first candidates' included) per query, with the
references' keypoints precomputed as ingest stores them, and each batch's queries extracted and
verified on ``--threads`` threads as the checker does. Voting searches the references' keypoints
once Milvus Lite has built their index graphs (the store is closed and reopened, as a screening
job in a later process finds it); ``--right-after-ingest`` votes at once instead, while Lite
still searches unindexed segments by brute force. The default verdict's wrong calls are listed
with their verification, and a precision/recall table by threshold is given for each half of the
queries. Prints JSON.

    .venv/bin/python bench/copydetect.py --refs 2000 --positives 600 --negatives 400
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from agman_milvus.core import copy_evidence, copy_features, copy_scoring, copy_vote
from agman_milvus.core.config import Precision, Settings
from agman_milvus.core.copy_edits import EDITS, random_edit
from agman_milvus.core.copy_metrics import micro_average_precision, threshold_for_precision
from agman_milvus.core.model import build_model
from agman_milvus.core.model.layers import l2_normalize
from agman_milvus.core.phash import hamming, phash
from agman_milvus.core.runtime import inference_autocast, prepare_for_inference, uses_bfloat16
from agman_milvus.core.schema import AttributeSchema
from agman_milvus.core.threads import thread_map
from agman_milvus.services.store.vectors import VectorStore, close_milvus
from agman_milvus.usecases.copyright import (
    DENSE_FEW_K,
    DENSE_K,
    NORM_BETA,
    NORM_K,
    VERIFY_K,
    VOTE_K,
    CopyThresholds,
    inspect_query,
    interleave,
    is_sure,
    query_views,
    verify_in_order,
)
from agman_milvus.usecases.screening import BATCH_SIZE as SCREEN_BATCH

TOP = 10


def shared_dir() -> Path | None:
    configured = os.environ.get("AGMAN_SHARED_DIR")
    path = Path(configured) if configured else Path(__file__).resolve().parents[1].parent / "shared"
    return path if path.is_dir() else None


def load(root: Path, row: dict) -> Image.Image:
    with Image.open(root / row["file"]) as im:
        return im.convert("RGB")


def content_key(im: Image.Image) -> str:
    """Same key for pixel-identical photos (and only near-identical ones)."""
    small = np.asarray(im.convert("L").resize((16, 16), Image.Resampling.BILINEAR)) // 8
    return hashlib.sha1(small.tobytes()).hexdigest()


def print_report(report: dict, out: Path | None) -> None:
    """Print ``report`` as JSON, and write it to ``out`` when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n", encoding="utf-8")


def features(model, images, precision: Precision, batch: int = 64) -> dict[str, np.ndarray]:
    """The checker's copy descriptor and ImageNet GAP from one trunk pass per batch, in the
    product's arithmetic (``precision``: bfloat16 on a CPU that computes it natively by default)."""
    trunk = model.trunk
    out: dict[str, list[torch.Tensor]] = {"descriptor": [], "imagenet_gap": []}
    with torch.inference_mode(), inference_autocast(torch.device("cpu"), precision):
        for start in range(0, len(images), batch):
            x = model.preprocess.batch(images[start:start + batch]).to(memory_format=torch.channels_last)
            mid = trunk.forward_mid(x)
            high = trunk.forward_high(mid)
            out["descriptor"].append(model._descriptor(mid, high))
            out["imagenet_gap"].append(l2_normalize(trunk.forward_top(high).float().mean(dim=(-2, -1))))
    return {k: torch.cat(v).float().numpy() for k, v in out.items()}


def ranked(sim: np.ndarray, normalise: bool, k: int = TOP) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` reference indices and scores per query."""
    order = np.argsort(-sim, axis=1, kind="stable")
    top = order[:, :k]
    scores = np.take_along_axis(sim, top, axis=1)
    if normalise:
        scores = scores - NORM_BETA * np.take_along_axis(sim, order[:, NORM_K - 1:NORM_K], axis=1)
    return top, scores


def evaluate(preds: list[list[tuple[int, float]]], truth: list[set[int]], idx: np.ndarray) -> dict:
    """micro-AP and recall@1 over the queries ``idx``."""
    s, lab = [], []
    r1 = []
    for q in idx:
        for ref, sc in preds[q]:
            s.append(sc)
            lab.append(ref in truth[q])
        if truth[q]:
            r1.append(bool(preds[q]) and preds[q][0][0] in truth[q])
    positives = sum(1 for q in idx if truth[q])
    return {"micro_ap": round(micro_average_precision(s, lab, positives), 4),
            "recall_at_1": round(float(np.mean(r1)) if r1 else 0.0, 4), "queries": len(idx)}


def verdicts(preds, truth, idx, t: float, distances=None, phash_copy: int = -1) -> dict:
    """Precision/recall of "copy" over the queries ``idx``: as the checker decides it, a
    candidate is a copy when its score >= t or (with ``distances``) its pHash distance <=
    ``phash_copy``; the query's verdict is its best candidate's (copies first, then by score)."""
    called = correct = 0
    for q in idx:
        if not preds[q]:
            continue
        is_copy = [(sc >= t or (distances is not None and distances[q][j] <= phash_copy), sc, j)
                   for j, sc in preds[q]]
        hit, _, best = max(is_copy, key=lambda c: (c[0], c[1]))
        if hit:
            called += 1
            correct += best in truth[q]
    positives = sum(1 for q in idx if truth[q])
    return {"precision": round(correct / called, 4) if called else 1.0,
            "recall": round(correct / positives, 4) if positives else 0.0, "called": called}


def verdict_errors(preds, checked, truth, edits, t: float) -> dict:
    """The default "copy" verdict's mistakes, for reading: each wrong call (a query without an
    original called a copy, or one matched to another reference) with the called candidate's
    verification, the originals verified but scored under ``t`` with theirs, and the count of
    originals that were never verified."""
    def described(q: int, j: int, score: float, v: copy_evidence.Verification) -> dict:
        return {"query": q, "edits": edits[q], "reference": j, "score": round(score, 4),
                "method": v.method, "inliers": v.inliers, "inlier_ratio": round(v.inlier_ratio, 3),
                "coverage": round(v.coverage, 3), "residual": round(v.residual, 3),
                "colour_residual": round(v.colour_residual, 3), "verification_score": round(v.score, 4)}

    wrong, below, not_verified = [], [], 0
    for q, pairs in enumerate(preds):
        best, score = pairs[0] if pairs else (None, 0.0)
        verification = dict(checked[q])
        original = next(((j, s) for j, s in pairs if j in truth[q]), None)
        if score >= t and best not in truth[q]:
            wrong.append({**described(q, best, score, verification[best]), "has_original": bool(truth[q]),
                          "original_score": None if original is None else round(original[1], 4)})
        elif truth[q] and original is None:
            not_verified += 1
        elif original is not None and original[1] < t:
            below.append({**described(q, original[0], original[1], verification[original[0]]),
                          "rank": [j for j, _ in pairs].index(original[0]) + 1})
    return {"threshold": t, "wrong_calls": wrong, "originals_below_threshold": below,
            "originals_not_verified": not_verified}


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 50) -> np.ndarray:
    """Newton-Raphson logistic regression (x has a leading 1 column)."""
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-np.clip(x @ w, -50, 50)))
        g = x.T @ (p - y) + l2 * w
        h = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(len(w))
        w -= np.linalg.solve(h, g)
    return w


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rescore(checked, weights) -> list[list[tuple[int, float]]]:
    """Verification scores, best first, with the score model ``weights`` (dense fits keep theirs)."""
    out = []
    for pairs in checked:
        scored = [(j, copy_scoring.score(v.inliers, v.inlier_ratio, v.coverage, v.residual, weights)
                   if v.method == "sift" and v.transform else v.score) for j, v in pairs]
        out.append(sorted(scored, key=lambda p: -p[1]))
    return out


def copy_rescore(
    verified, ref_h: np.ndarray, smoothed: list[dict[int, float]], inliers: list[dict[int, int]],
    weights=copy_scoring.COPY_WEIGHTS,
) -> list[list[tuple[int, float]]]:
    """Copy scores, best first, from verification scores, as the checker computes them
    (:func:`copy_scoring.copy_scores` over the references' pHashes, the scores with a
    pixelated picture's blocks smoothed away, ``smoothed[q][reference]``, and the keypoint
    inliers, ``inliers[q][reference]``)."""
    out = []
    for q, pairs in enumerate(verified):
        refs = [j for j, _ in pairs]
        scores = copy_scoring.copy_scores([s for _, s in pairs], [int(ref_h[j]) for j in refs], weights,
                                         smoothed=[smoothed[q][j] for j in refs],
                                         inliers=[inliers[q][j] for j in refs])
        out.append(sorted(zip(refs, scores, strict=True), key=lambda p: -p[1]))
    return out


def copy_score_inputs(verified, ref_h: np.ndarray,
                      inliers: list[dict[int, int]]) -> list[list[tuple[int, float, float]]]:
    """Per query, (reference, verification score, margin) for fitting, the margin as the
    checker weighs it (:func:`copy_scoring.copy_margins`, ``inliers[q][reference]``)."""
    out = []
    for q, pairs in enumerate(verified):
        margins = copy_scoring.copy_margins([s for _, s in pairs], [int(ref_h[j]) for j, _ in pairs],
                                           [inliers[q][j] for j, _ in pairs])
        out.append([(j, s, m) for (j, s), m in zip(pairs, margins, strict=True)])
    return out


def as_pairs(top: np.ndarray, scores: np.ndarray) -> list[list[tuple[int, float]]]:
    """Per query, (reference index, score) pairs best first."""
    return [list(zip(t.tolist(), s.tolist(), strict=True)) for t, s in zip(top, scores, strict=True)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--refs", type=int, default=1000)
    ap.add_argument("--positives", type=int, default=300)
    ap.add_argument("--negatives", type=int, default=200)
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2,
                    help="torch and OpenCV threads, and queries verified side by side")
    ap.add_argument("--dense-few-k", type=int, default=DENSE_FEW_K,
                    help="candidates given the few-keypoints dense alignment (copyright.DENSE_FEW_K)")
    ap.add_argument("--fit", action="store_true", help="refit the verification score's weights")
    ap.add_argument("--right-after-ingest", action="store_true",
                    help="vote while Milvus Lite still builds the keypoint graphs in the background "
                         "(by default the store is closed and reopened first, as a later process finds it)")
    ap.add_argument("--screen-batch", type=int, default=SCREEN_BATCH,
                    help="queries per keypoint search (the screening job's batch)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    root = shared_dir()
    if root is None or not (root / "data/fashion-products/manifest.csv").is_file():
        print(json.dumps({"skipped": "needs ../shared/data/fashion-products (or AGMAN_SHARED_DIR)"}))
        return 0
    root = root / "data/fashion-products"
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)

    rows = list(csv.DictReader(open(root / "manifest.csv", encoding="utf-8")))
    rng = random.Random(args.seed)
    rng.shuffle(rows)
    refs = rows[: args.refs]
    outside = rows[args.refs: args.refs + args.negatives]
    # "paste" puts a query into a photo that is neither a reference nor a query's source: a
    # composite holds its background too, so a reference there would be a true match counted false
    backdrops = rows[args.refs + args.negatives:]
    t0 = time.perf_counter()
    ref_images = [load(root, r) for r in refs]
    ref_keys: dict[str, set[int]] = {}
    for i, im in enumerate(ref_images):
        ref_keys.setdefault(content_key(im), set()).add(i)
    queries, truth, edits = [], [], []
    sources = ref_images[: args.positives] + [load(root, r) for r in outside]
    for src in sources:
        edited, names = random_edit(src, rng, background=load(root, rng.choice(backdrops)))
        queries.append(edited), truth.append(ref_keys.get(content_key(src), set())), edits.append(names)
    t_data = time.perf_counter() - t0
    t0 = time.perf_counter()
    looks = [inspect_query(q) for q in queries]
    t_analyse = time.perf_counter() - t0
    n = len(queries)
    log(f"data: {n} queries, {len(refs)} references")

    schema = AttributeSchema.from_dict({"articleType": 2, "baseColour": 2})
    model = build_model("agman", schema=schema, backbone=args.backbone, pretrained="imagenet")
    model = prepare_for_inference(model, torch.device("cpu"))  # as the checker's Embedder runs it
    torch.set_num_threads(args.threads)
    precision = Settings().precision  # AGMAN_PRECISION, as the checker's Embedder reads it
    ref_f = features(model, ref_images, precision)
    t0 = time.perf_counter()
    q_f = features(model, queries, precision)
    views = [query_views(q, look) for q, look in zip(queries, looks, strict=True)]
    extra_f = [features(model, [v[k] for v in views], precision)["descriptor"] for k in (1, 2)]
    framed = [q for q, look in enumerate(looks) if look.pasted is not None]  # queries framing a picture
    if framed:  # its descriptor (the last view); the query's own elsewhere (it adds nothing)
        pasted_f = q_f["descriptor"].copy()
        pasted_f[framed] = features(model, [views[q][-1] for q in framed], precision)["descriptor"]
        extra_f.append(pasted_f)
    t_stage1_embed = time.perf_counter() - t0
    log(f"embedded: {t_stage1_embed:.0f} s for queries and their views")

    preds: dict[str, list[list[tuple[int, float]]]] = {}
    ref_h = np.array([phash(im) for im in ref_images], np.uint64)
    q_h = [phash(im) for im in queries]
    preds["phash"] = []
    for h in q_h:
        d = np.array([hamming(h, int(r)) for r in ref_h])
        order = np.argsort(d, kind="stable")[:TOP]
        preds["phash"].append([(int(j), -float(d[j])) for j in order])
    for name, key, norm in (("imagenet_gap", "imagenet_gap", False), ("descriptor", "descriptor", True)):
        top, sc = ranked(q_f[key] @ ref_f[key].T, norm)
        preds[name] = as_pairs(top, sc)
    t0 = time.perf_counter()
    sim = q_f["descriptor"] @ ref_f["descriptor"].T
    background = np.sort(sim, axis=1)[:, -NORM_K]
    merged = np.maximum.reduce([sim, *(f @ ref_f["descriptor"].T for f in extra_f)])
    merged -= NORM_BETA * background[:, None]
    top, sc = ranked(merged, False, max(TOP, VERIFY_K))
    preds["candidates"] = as_pairs(top, sc)
    t_stage1_search = time.perf_counter() - t0

    t0 = time.perf_counter()
    ref_lf = [copy_features.extract(im) for im in ref_images]
    t_ref_kp = time.perf_counter() - t0
    log(f"reference keypoints: {t_ref_kp:.0f} s")
    milvus_dir = tempfile.TemporaryDirectory(prefix="copydetect-")
    settings = Settings(data_dir=Path(milvus_dir.name))

    def open_store() -> VectorStore:
        return VectorStore.from_settings(settings, schema, "bench", embed_dim=model.embed_dim,
                                         descriptor_dim=q_f["descriptor"].shape[1])

    store = open_store()
    store.ensure_collections()
    t0 = time.perf_counter()
    for start in range(0, len(refs), 100):
        store.upsert_keypoints((j, j, copy_vote.vote_vectors(ref_lf[j]))
                               for j in range(start, min(start + 100, len(refs))))
    t_ref_insert = time.perf_counter() - t0
    log(f"reference keypoints into Milvus Lite: {t_ref_insert:.0f} s")
    t_ref_index = None
    if not args.right_after_ingest:
        # as a screening job in a later process finds the catalogue: closing Milvus Lite waits
        # for its background index builds, the next open loads the built graphs
        t0 = time.perf_counter()
        close_milvus(settings)
        store = open_store()
        t_ref_index = time.perf_counter() - t0
        log(f"keypoint graphs built (Milvus Lite closed and reopened): {t_ref_index:.0f} s")

    qfs: dict[int, copy_features.LocalFeatures] = {}
    defaults = CopyThresholds(model_version="-")  # the checker's uncalibrated thresholds

    def verify_first(q: int) -> copy_evidence.Verification:
        """Stage 2 of query ``q``'s first descriptor candidate, before the vote (the checker's
        ``_verify_first``)."""
        j = preds["candidates"][q][0][0]
        return verify_in_order(qfs[q], {0: ref_lf[j]}, {0: int(ref_h[j])}, copy_threshold=defaults.copy,
                               dense_few_k=args.dense_few_k)[0]

    def verify(q: int) -> list[tuple[int, copy_evidence.Verification]]:
        """Stage 2 of query ``q``, on its candidates as the checker orders them (no voting
        candidates after a sure first one), up to a sure copy (the candidates after it are left
        out, as the checker leaves them unverified)."""
        by_vote = [] if is_sure(first[q], defaults.copy) else voted[q][:VOTE_K]
        order = [j for j, _ in interleave(preds["candidates"][q][:VERIFY_K], by_vote, [], key=lambda p: p[0])]
        verified = verify_in_order(qfs[q], {k: ref_lf[j] for k, j in enumerate(order) if k > 0},
                                   {k: int(ref_h[j]) for k, j in enumerate(order)},
                                   copy_threshold=defaults.copy, dense_few_k=args.dense_few_k,
                                   known={0: first[q]})
        return [(order[k], v) for k, v in sorted(verified.items())]

    t_extract = t_vote = t_stage2 = 0.0
    vote_batch_s: list[float] = []
    checked: list[list[tuple[int, copy_evidence.Verification]]] = []
    first: dict[int, copy_evidence.Verification] = {}
    voted: dict[int, list[tuple[int, float]]] = {}

    def vote(qs: list[int]) -> None:
        """The voting candidates of queries ``qs``, in one keypoint search."""
        found = copy_vote.vote_many([[qfs[q]] for q in qs], store.search_keypoints)
        for q, votes in zip(qs, found, strict=True):
            voted[q] = sorted(votes.items(), key=lambda p: -p[1])[:TOP]

    for start in range(0, n, args.screen_batch):  # as a screening job: one keypoint search per batch
        batch = range(start, min(start + args.screen_batch, n))
        t0 = time.perf_counter()
        extracted = thread_map(lambda q: copy_features.extract(queries[q], looks[q].block, looks[q].pasted,
                                                             looks[q].pasted_block), batch, args.threads)
        for q, features_q in zip(batch, extracted, strict=True):
            qfs[q] = features_q
        t1 = time.perf_counter()
        first.update(zip(batch, thread_map(verify_first, batch, args.threads), strict=True))
        t2 = time.perf_counter()
        vote([q for q in batch if not is_sure(first[q], defaults.copy)])
        t3 = time.perf_counter()
        checked.extend(thread_map(verify, batch, args.threads))
        t_extract += t1 - t0
        t_vote += t3 - t2
        vote_batch_s.append(round(t3 - t2, 2))
        t_stage2 += (t2 - t1) + (time.perf_counter() - t3)
        log(f"verified {batch.stop}/{n}")
    # the voting source alone is measured on every query: the sure ones' votes, untimed
    sure = [q for q in range(n) if q not in voted]
    for start in range(0, len(sure), args.screen_batch):
        vote(sure[start:start + args.screen_batch])
    preds["voting"] = [voted[q] for q in range(n)]
    close_milvus(settings)
    milvus_dir.cleanup()
    verification = rescore(checked, copy_scoring.SCORE_WEIGHTS)
    smoothed = [{j: v.smoothed_score for j, v in pairs} for pairs in checked]
    inliers = [{j: v.inliers for j, v in pairs} for pairs in checked]
    preds["verified_without_margin"] = verification
    preds["verified"] = copy_rescore(verification, ref_h, smoothed, inliers)
    descriptor_only = [[(j, v) for j, v in pairs if j in {c for c, _ in preds["candidates"][q][:VERIFY_K]}]
                       for q, pairs in enumerate(checked)]
    preds["verified_descriptor_only"] = copy_rescore(
        rescore(descriptor_only, copy_scoring.SCORE_WEIGHTS), ref_h, smoothed, inliers)

    idx = np.random.default_rng(args.seed).permutation(n)
    cal, test = idx[: n // 2], idx[n // 2:]
    fitted = fitted_copy = None
    if args.fit:
        in_cal = set(cal.tolist())
        sift = [(q, j, v) for q in in_cal for j, v in checked[q] if v.method == "sift" and v.transform]
        x = np.array([copy_scoring.features_vector(v.inliers, v.inlier_ratio, v.coverage, v.residual)
                      for _, _, v in sift])
        y = np.array([j in truth[q] for q, j, _ in sift], float)
        fitted = tuple(round(float(w), 3) for w in fit_logistic(x, y))
        inputs = copy_score_inputs(rescore(checked, fitted), ref_h, inliers)
        rows = [(q, j, s, m) for q in in_cal for j, s, m in inputs[q]]
        x2 = np.array([[1.0, s, m] for _, _, s, m in rows])
        y2 = np.array([j in truth[q] for q, j, _, _ in rows], float)
        fitted_copy = tuple(round(float(w), 3) for w in fit_logistic(x2, y2))
        preds["verified_fitted"] = copy_rescore(rescore(checked, fitted), ref_h, smoothed, inliers,
                                                fitted_copy)

    everything = np.arange(n)
    results = {name: evaluate(p, truth, everything) for name, p in preds.items()}
    results_held_out = {name: evaluate(p, truth, test) for name, p in preds.items()}
    def candidate_recall(qs) -> float:
        return round(float(np.mean([any(j in truth[q] for j, _ in checked[q]) for q in qs if truth[q]]
                                   or [0.0])), 4)

    results["candidates"]["candidate_recall"] = round(float(np.mean(
        [any(j in truth[q] for j, _ in preds["candidates"][q][:VERIFY_K]) for q in range(n) if truth[q]])), 4)
    results["voting"]["candidate_recall"] = round(float(np.mean(
        [any(j in truth[q] for j, _ in preds["voting"][q][:VOTE_K]) for q in range(n) if truth[q]])), 4)
    results["verified"]["candidate_recall"] = candidate_recall(range(n))
    per_edit = {}
    for kind in sorted(EDITS):
        kidx = np.array([q for q in range(n) if kind in edits[q]])
        per_edit[kind] = {name: evaluate(preds[name], truth, kidx)["recall_at_1"]
                          for name in ("phash", "imagenet_gap", "candidates", "voting",
                                       "verified_descriptor_only", "verified_without_margin", "verified")}
        per_edit[kind]["candidate_recall"] = candidate_recall(kidx)
        per_edit[kind]["queries"] = len(kidx)
        per_edit[kind]["positives"] = int(sum(1 for q in kidx if truth[q]))
    default_t, default_phash = defaults.copy, defaults.phash_copy
    default_near = defaults.near_duplicate
    distances = [{j: hamming(q_h[q], int(ref_h[j])) for j, _ in preds["verified"][q]} for q in range(n)]
    verdict = {}
    names = ("verified_descriptor_only", "verified_without_margin", "verified")
    for name in (*names, *(("verified_fitted",) if args.fit else ())):
        s_cal = [s for q in cal for _, s in preds[name][q]]
        l_cal = [j in truth[q] for q in cal for j, _ in preds[name][q]]
        t99, _, _ = threshold_for_precision(s_cal, l_cal, sum(1 for q in cal if truth[q]), 0.99)
        verdict[name] = {
            "default_threshold": {"threshold": default_t,
                                  **verdicts(preds[name], truth, everything, default_t)},
            "default_threshold_held_out": {"threshold": default_t,
                                           **verdicts(preds[name], truth, test, default_t)},
            "calibrated_p99_held_out": {"threshold": round(t99, 4),
                                        **verdicts(preds[name], truth, test, t99)},
            # "copy" or "near_duplicate": flagged for a reviewer (what `agman demo` counts as found)
            "flagged_default": {"threshold": default_near,
                                **verdicts(preds[name], truth, everything, default_near)},
            "by_threshold": {f"{t:.3f}": {half: verdicts(preds[name], truth, idx, t)
                                          for half, idx in (("calibration_half", cal), ("held_out", test))}
                             for t in np.arange(0.5, 0.99, 0.025)},
        }
        for kind in sorted(EDITS):
            kidx = np.array([q for q in range(n) if kind in edits[q]])
            per_edit[kind][f"{name}_verdict_default"] = verdicts(preds[name], truth, kidx, default_t)
            per_edit[kind][f"{name}_flagged_default"] = verdicts(preds[name], truth, kidx, default_near)
            per_edit[kind][f"{name}_verdict_default_with_phash"] = verdicts(
                preds[name], truth, kidx, default_t, distances, default_phash)
        verdict[name]["default_thresholds_with_phash_rule"] = {
            "threshold": default_t, "phash_copy": default_phash,
            **verdicts(preds[name], truth, everything, default_t, distances, default_phash)}
        verdict[name]["default_thresholds_with_phash_rule_held_out"] = {
            "threshold": default_t, "phash_copy": default_phash,
            **verdicts(preds[name], truth, test, default_t, distances, default_phash)}
    report = {
        "dataset": "fashion-products", "backbone": f"{args.backbone} (torchvision IMAGENET1K_V1)",
        "refs": len(refs), "positive_queries": args.positives, "negative_queries": len(outside),
        "queries_with_a_true_original": int(sum(1 for t in truth if t)),
        "duplicate_reference_groups": int(sum(1 for g in ref_keys.values() if len(g) > 1)),
        "predictions_per_query": TOP, "verify_k": VERIFY_K, "vote_k": VOTE_K, "seed": args.seed,
        "dense_k": DENSE_K, "dense_few_k": args.dense_few_k, "threads": args.threads,
        "bfloat16": uses_bfloat16(torch.device("cpu"), precision),
        "vote_keypoints": copy_vote.VOTE_KEYPOINTS, "query_keypoints": copy_vote.QUERY_KEYPOINTS,
        "vote_neighbours": copy_vote.VOTE_NEIGHBOURS,
        "score_weights": list(copy_scoring.SCORE_WEIGHTS), "fitted_weights": fitted,
        "copy_weights": list(copy_scoring.COPY_WEIGHTS), "fitted_copy_weights": fitted_copy,
        "results": results, "results_held_out_half": results_held_out,
        "per_edit_recall_at_1": per_edit, "verdicts": verdict,
        "default_verdict_errors": verdict_errors(preds["verified"], checked, truth, edits, default_t),
        "seconds": {"data": round(t_data, 1), "query_blocks_and_frame": round(t_analyse, 1),
                    "stage1_embed_query_and_views": round(t_stage1_embed, 1),
                    "stage1_search": round(t_stage1_search, 1), "reference_keypoints": round(t_ref_kp, 1),
                    "reference_keypoints_into_milvus": round(t_ref_insert, 1),
                    "reference_keypoint_graphs": None if t_ref_index is None else round(t_ref_index, 1),
                    "query_keypoints": round(t_extract, 1), "stage1_voting": round(t_vote, 1),
                    "stage2_verify": round(t_stage2, 1), "voting_per_batch": vote_batch_s},
        "screening_batch": args.screen_batch, "voting_right_after_ingest": args.right_after_ingest,
        "queries_voted_for": n - len(sure),
        "checks_per_s": round(n / (t_analyse + t_stage1_embed + t_stage1_search + t_extract + t_vote
                                   + t_stage2), 2),
        "ms_per_query": {"blocks_and_frame": round(1000 * t_analyse / n, 1),
                         "descriptor_embed": round(1000 * t_stage1_embed / n, 1),
                         "query_keypoints": round(1000 * t_extract / n, 1),
                         "voting": round(1000 * t_vote / n, 1), "verify": round(1000 * t_stage2 / n, 1)},
        "reference_keypoints_ms_per_image": round(1000 * t_ref_kp / len(refs), 1),
        "command": "python bench/copydetect.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
