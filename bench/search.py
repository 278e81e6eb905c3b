"""Search latency (p50/p95) and recall@10 of the vector store in Milvus Lite, vs numpy brute force.

Synthetic data: clustered unit vectors (``--dim`` 512), one attribute collection, a ``brand``
metadata field with 10 values (a filter on one brand keeps ~10% of the rows). Queries are
perturbed data points, one per call, as an online search would send them. Recall@10 is
measured against exact cosine top-10 (numpy), over the same filtered subset for the filtered
case. Prints one JSON document.

    .venv/bin/python bench/search.py --sizes 10000 100000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from pymilvus import MilvusClient

from agman_milvus.core.schema import AttributeSchema
from agman_milvus.services.store.vectors import VectorRow, VectorStore

BRANDS = [f"brand{i}" for i in range(10)]


def clustered(rng: np.random.Generator, n: int, dim: int, clusters: int, noise: float) -> np.ndarray:
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim)).astype(
        np.float32
    ) / np.sqrt(dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_top_k(data: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> set[int]:
    sims = data @ q
    top = np.argpartition(-sims, k)[:k]
    return set(ids[top].tolist())


def percentile_ms(samples: list[float], p: float) -> float:
    return round(float(np.percentile(samples, p)) * 1000, 2)


def run_size(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    rng = np.random.default_rng(args.seed)
    data = clustered(rng, n, args.dim, max(10, n // 50), args.noise)
    ids = np.arange(1, n + 1)
    brands = rng.integers(0, len(BRANDS), n)

    client = MilvusClient(str(workdir / f"bench_{n}.db"))
    schema = AttributeSchema.from_dict({"style": 2})
    store = VectorStore(client, schema, "bench", embed_dim=args.dim, descriptor_dim=8,
                        prefix=f"bench{n}", filter_fields=("brand",))
    store.ensure_collections()

    t0 = time.perf_counter()
    for start in range(0, n, args.batch):
        stop = min(n, start + args.batch)
        store.upsert(
            VectorRow(int(ids[i]), int(ids[i]), {"style": data[i]}, None, {"brand": BRANDS[brands[i]]})
            for i in range(start, stop)
        )
    insert_s = time.perf_counter() - t0

    q_idx = rng.choice(n, args.queries, replace=False)
    queries = data[q_idx] + 0.5 * args.noise * rng.normal(size=(args.queries, args.dim)).astype(
        np.float32
    ) / np.sqrt(args.dim)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    store.search("style", queries[:3], top_k=args.k, one_per_product=False)  # warm-up

    results: dict[str, object] = {"n": n, "insert_and_flush_s": round(insert_s, 1)}
    brand = 3
    mask = brands == brand
    cases = {
        "unfiltered": (None, data, ids, False),
        "filtered_10pct": ({"brand": BRANDS[brand]}, data[mask], ids[mask], False),
        "unfiltered_one_per_product": (None, data, ids, True),
    }
    for name, (filters, subset, subset_ids, grouped) in cases.items():
        latencies, recalls = [], []
        for q in queries:
            t = time.perf_counter()
            hits = store.search("style", [q], top_k=args.k, filters=filters, one_per_product=grouped)[0]
            latencies.append(time.perf_counter() - t)
            truth = exact_top_k(subset, subset_ids, q, args.k)
            recalls.append(len(truth & {h.image_id for h in hits}) / args.k)
        numpy_times = []
        for q in queries:
            t = time.perf_counter()
            exact_top_k(subset, subset_ids, q, args.k)
            numpy_times.append(time.perf_counter() - t)
        numpy_ms = float(np.median(numpy_times)) * 1000
        results[name] = {
            "p50_ms": percentile_ms(latencies, 50), "p95_ms": percentile_ms(latencies, 95),
            f"recall@{args.k}": round(float(np.mean(recalls)), 4),
            "numpy_brute_force_ms": round(numpy_ms, 2),
            "p50_vs_numpy": round(float(np.percentile(latencies, 50)) * 1000 / numpy_ms, 1),
        }
    client.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--noise", type=float, default=0.6, help="cluster spread (relative)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where the Lite databases go")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        runs = [run_size(n, args, Path(tmp)) for n in args.sizes]
    import pymilvus

    print(json.dumps({
        "benchmark": "search", "engine": "milvus-lite", "index": "HNSW M16 efC200, ef=max(64,k), COSINE",
        "pymilvus": pymilvus.__version__, "dim": args.dim, "queries": args.queries, "k": args.k,
        "cpus": os.cpu_count(), "machine": platform.machine(), "runs": runs,
    }, indent=2))


if __name__ == "__main__":
    main()
