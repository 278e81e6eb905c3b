"""Copy-detection benchmark on the fashion-products catalogue (ISC2021-style metrics).

A reference set of catalogue photos; queries are edited copies of references (1-3 random edits
from :data:`agman_milvus.usecases.copyright.EDITS`: crop, rescale, JPEG, rotation, flip, colour jitter,
grayscale, blur, padding, text overlay, pasted into another catalogue photo) plus edited copies
of photos that are NOT in the reference set (the catalogue has near-identical products, so
these are realistic hard negatives). Three methods are compared side by side on the same
queries:

* ``checker``: our copy descriptor (``model.copy_descriptor``: GeM p=3 + L2 over the trunk's
  top map) with the checker's score normalisation (``cos - NORM_BETA * cos_NORM_K``);
* ``imagenet_gap``: raw ImageNet features, global average pooling of the trunk's last map;
* ``phash``: 64-bit DCT perceptual hash (``imagehash.phash``), score = -hamming distance;

plus ablations (descriptor without normalisation; the earlier GeM[mid, high] descriptor).
Metrics: micro-average precision over all (query, reference, score) predictions (top 10 per
query), recall at 90% precision, recall@1. Then the ``copy`` threshold is calibrated for 99%
precision on one half of the queries and evaluated on the other. Prints JSON.

    .venv/bin/python bench/copydetect.py --refs 1000 --positives 300 --negatives 200
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from agman_milvus.core.model import build_model
from agman_milvus.core.model.layers import GeM, l2_normalize
from agman_milvus.core.schema import AttributeSchema
from agman_milvus.usecases.copyright import (
    NORM_BETA,
    NORM_K,
    micro_average_precision,
    random_edit,
    recall_at_precision,
    threshold_for_precision,
)

TOP = 10


def shared_dir() -> Path | None:
    configured = os.environ.get("AGMAN_SHARED_DIR")
    path = Path(configured) if configured else Path(__file__).resolve().parents[1].parent / "shared"
    return path if path.is_dir() else None


def load(root: Path, row: dict) -> Image.Image:  # noqa: F821
    from PIL import Image

    with Image.open(root / row["file"]) as im:
        return im.convert("RGB")


def features(model, images, batch: int = 64) -> dict[str, np.ndarray]:
    """Our descriptor plus the baselines' features from one trunk pass per batch."""
    trunk, gem = model.trunk, GeM(3.0)
    out: dict[str, list[torch.Tensor]] = {"checker": [], "imagenet_gap": [], "gem_mid_high": []}
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            x = model.preprocess.batch(images[start:start + batch])
            mid = trunk.forward_mid(x)
            high = trunk.forward_high(mid)
            out["checker"].append(model._descriptor(mid, high))
            out["imagenet_gap"].append(l2_normalize(trunk.forward_top(high).mean(dim=(-2, -1))))
            out["gem_mid_high"].append(l2_normalize(torch.cat([gem(mid), gem(high)], dim=1)))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def predictions(sim: np.ndarray, normalise: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top-``TOP`` reference indices and scores per query."""
    order = np.argsort(-sim, axis=1, kind="stable")
    top = order[:, :TOP]
    scores = np.take_along_axis(sim, top, axis=1)
    if normalise:
        kth = np.take_along_axis(sim, order[:, NORM_K - 1:NORM_K], axis=1)
        scores = scores - NORM_BETA * kth
    return top, scores


def metrics(top: np.ndarray, scores: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    labels = top == truth[:, None]
    positives = int((truth >= 0).sum())
    flat_s, flat_l = scores.ravel(), labels.ravel()
    return {
        "micro_ap": round(micro_average_precision(flat_s, flat_l, positives), 4),
        "recall_at_p90": round(recall_at_precision(flat_s, flat_l, positives, 0.90), 4),
        "recall_at_1": round(float((top[:, 0] == truth)[truth >= 0].mean()), 4),
    }


def held_out_threshold(top, scores, truth, precision: float, seed: int) -> dict[str, float]:
    """Calibrate on half the queries, measure precision/recall of ``score >= t`` on the rest."""
    idx = np.random.default_rng(seed).permutation(len(truth))
    cal, test = idx[: len(idx) // 2], idx[len(idx) // 2:]

    def flat(part):
        return scores[part].ravel(), (top[part] == truth[part, None]).ravel(), int((truth[part] >= 0).sum())

    s, l, p = flat(cal)
    t, _, _ = threshold_for_precision(s, l, p, precision)
    s, l, p = flat(test)
    passed = s >= t
    tp = int((passed & l).sum())
    return {"threshold": round(float(t), 4), "test_precision": round(tp / max(1, int(passed.sum())), 4),
            "test_recall": round(tp / max(1, p), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--refs", type=int, default=1000)
    ap.add_argument("--positives", type=int, default=300)
    ap.add_argument("--negatives", type=int, default=200)
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    root = shared_dir()
    if root is None or not (root / "data/fashion-products/manifest.csv").is_file():
        print(json.dumps({"skipped": "needs ../shared/data/fashion-products (or AGMAN_SHARED_DIR)"}))
        return 0
    root = root / "data/fashion-products"
    torch.set_num_threads(args.threads)
    import imagehash

    rows = list(csv.DictReader(open(root / "manifest.csv", encoding="utf-8")))
    rng = random.Random(args.seed)
    rng.shuffle(rows)
    refs = rows[: args.refs]
    outside = rows[args.refs: args.refs + args.negatives]
    t0 = time.perf_counter()
    ref_images = [load(root, r) for r in refs]
    queries, truth, edits = [], [], []
    for i in range(args.positives):
        edited, names = random_edit(ref_images[i], rng, background=load(root, rng.choice(rows)))
        queries.append(edited), truth.append(i), edits.append(names)
    for r in outside:
        edited, names = random_edit(load(root, r), rng, background=load(root, rng.choice(rows)))
        queries.append(edited), truth.append(-1), edits.append(names)
    truth_arr = np.asarray(truth)
    t_data = time.perf_counter() - t0

    schema = AttributeSchema.from_dict({"articleType": 2, "baseColour": 2})
    model = build_model("agman", schema=schema, backbone=args.backbone, pretrained="imagenet").eval()
    with torch.inference_mode():  # the bench's one-pass path equals the production method
        x = model.preprocess.batch(ref_images[:4])
        assert torch.allclose(model.copy_descriptor(x), model._descriptor(
            model.trunk.forward_mid(x), model.trunk.forward_high(model.trunk.forward_mid(x))), atol=1e-5)
    t0 = time.perf_counter()
    ref_f, q_f = features(model, ref_images), features(model, queries)
    t_embed = time.perf_counter() - t0

    t0 = time.perf_counter()
    ref_h = np.array([[int(b) for b in imagehash.phash(im).hash.ravel()] for im in ref_images], np.int16)
    q_h = np.array([[int(b) for b in imagehash.phash(im).hash.ravel()] for im in queries], np.int16)
    hamming = (q_h[:, None, :] != ref_h[None, :, :]).sum(-1)
    t_hash = time.perf_counter() - t0

    results = {}
    runs = {
        "checker": (q_f["checker"] @ ref_f["checker"].T, True),
        "checker_no_norm": (q_f["checker"] @ ref_f["checker"].T, False),
        "gem_mid_high": (q_f["gem_mid_high"] @ ref_f["gem_mid_high"].T, False),
        "imagenet_gap": (q_f["imagenet_gap"] @ ref_f["imagenet_gap"].T, False),
        "phash": (-hamming.astype(np.float64), False),
    }
    tops = {}
    for name, (sim, norm) in runs.items():
        top, scores = predictions(sim, norm)
        tops[name] = (top, scores)
        results[name] = metrics(top, scores, truth_arr)
    base = results["phash"]["micro_ap"]
    report = {
        "dataset": "fashion-products", "backbone": f"{args.backbone} (torchvision IMAGENET1K_V1)",
        "refs": len(refs), "positive_queries": args.positives, "negative_queries": len(outside),
        "predictions_per_query": TOP, "seed": args.seed,
        "descriptor_dim": int(ref_f["checker"].shape[1]),
        "results": results,
        "checker_minus_phash_micro_ap": round(results["checker"]["micro_ap"] - base, 4),
        "checker_copy_threshold_p99_held_out": held_out_threshold(*tops["checker"], truth_arr, 0.99, args.seed),
        "seconds": {"data": round(t_data, 1), "embed": round(t_embed, 1), "phash": round(t_hash, 1)},
        "command": "python bench/copydetect.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
