"""End-to-end ingest speed vs pure model speed, side by side in one run (JSON on stdout).

On real product images (``../shared/data/fashion-products``, or ``AGMAN_SHARED_DIR``):

* ``model``: ``Embedder.encode_tensor`` on already preprocessed tensors (all K attribute
  vectors + copy descriptor in one pass) — the ceiling;
* ``embedded``: ``bulk_ingest`` in-process (register: read file, blob store, SQL rows; then
  decode, embed, write to Milvus Lite and SQL), from the first file read to the last image
  indexed;
* ``celery``: the same through Redis and one ``agman worker`` (solo pool) writing to a shared
  ``milvus-lite server``, measured until SQL says every image is indexed; with ``--prefork N``
  also ``celery_prefork_N``: one ``agman worker -P prefork -c N`` (cores / N threads a process).

The model is measured before and after the end-to-end runs (median), with the model loaded
and warmed up in every mode. Per-stage timings of the embedded run show where time goes.

    .venv/bin/python bench/ingest.py [--images 256] [--backbones resnet50,mobilenet_v2] [--no-celery]
    .venv/bin/python bench/ingest.py --backbones mobilenet_v2 --prefork 2   # and a prefork worker
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def shared_dir() -> Path | None:
    configured = os.environ.get("AGMAN_SHARED_DIR")
    path = Path(configured) if configured else REPO.parent / "shared"
    return path if path.is_dir() else None


def pure_model(embedder, tensors, batch_size: int) -> float:
    """Images/s of encode_tensor over ``tensors`` in batches (after one warm-up batch)."""
    import torch

    embedder.encode_tensor(torch.stack(tensors[:batch_size]))
    start = time.perf_counter()
    for i in range(0, len(tensors), batch_size):
        embedder.encode_tensor(torch.stack(tensors[i:i + batch_size]))
    return len(tensors) / (time.perf_counter() - start)


def run_embedded(items, settings) -> dict:
    from agman_milvus.services.container import Services
    from agman_milvus.usecases.bulk_ingest import bulk_ingest
    from agman_milvus.usecases.dispatch import InProcessDispatcher

    services = Services(settings)
    _ = services.vectors  # model loaded, collections created: not part of the measurement
    warm = services.embedder
    warm.encode_tensor(__import__("torch").zeros(2, 3, warm.model.image_size, warm.model.image_size))
    dispatcher = InProcessDispatcher(services)
    summary = bulk_ingest(items, services, dispatcher, chunk_size=settings.batch_size * 4)
    assert summary.indexed == len(items), summary.to_dict()
    return {"images_per_second": round(len(items) / summary.seconds, 2),
            "seconds": round(summary.seconds, 2), "register_seconds": round(summary.register_seconds, 2),
            "stages": dispatcher.report.to_dict()["timings"]}


def run_celery(items, settings_kwargs: dict, tmp: Path, checkpoint: Path, prefork: int = 0) -> dict:
    from agman_milvus.core.config import Settings
    from agman_milvus.services.container import Services
    from agman_milvus.usecases.bulk_ingest import bulk_ingest
    from agman_milvus.workers.app import create_app
    from agman_milvus.workers.producer import CeleryDispatcher
    from tests.support.celery_harness import REDIS_URL, Worker, delete_redis_keys, milvus_lite_server

    prefix = f"agman-bench-{uuid.uuid4().hex[:8]}:"
    with milvus_lite_server(tmp / f"celery-{prefork}-milvus.db") as uri:
        values = {"data_dir": str(tmp / f"celery-{prefork}-data"), "milvus_uri": uri, "broker_url": REDIS_URL,
                  "broker_key_prefix": prefix, "checkpoint": str(checkpoint), **settings_kwargs}
        settings = Settings(**values)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGMAN_")}
        env.update({f"AGMAN_{k.upper()}": str(v) for k, v in values.items()})
        services = Services(settings)
        _ = services.vectors  # collections created before the clock starts
        pool = {"pool": "prefork", "concurrency": prefork} if prefork else {}
        worker = Worker(env, tmp / f"worker-{prefork}.log", **pool).start(timeout=180)
        try:
            app = create_app(settings)
            warm = 2 * max(1, prefork)  # an image a task: idle pool processes take them, loading the model
            bulk_ingest(items[:warm], services, CeleryDispatcher(app), chunk_size=1, timeout=300)
            rest = items[warm:]
            summary = bulk_ingest(rest, services, CeleryDispatcher(app), chunk_size=64, timeout=1800)
            assert summary.indexed == len(rest), summary.to_dict()
            return {"images_per_second": round(len(rest) / summary.seconds, 2),
                    "seconds": round(summary.seconds, 2)}
        finally:
            worker.stop()
            delete_redis_keys(prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--backbones", default="mobilenet_v2,resnet50")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--no-celery", action="store_true")
    parser.add_argument("--prefork", type=int, default=0,
                        help="also ingest through one agman worker -P prefork -c N")
    parser.add_argument("-v", "--verbose", action="store_true", help="log per-batch stage timings")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)

    base = shared_dir()
    manifest = base / "data" / "fashion-products" / "manifest.csv" if base else None
    if manifest is None or not manifest.is_file():
        print(json.dumps({"skipped": "needs ../shared/data/fashion-products (or AGMAN_SHARED_DIR)"}))
        return

    import torch

    from agman_milvus.core.config import Settings
    from agman_milvus.core.images import load_image
    from agman_milvus.core.model import build_model, save_checkpoint
    from agman_milvus.core.runtime import tcmalloc_loaded
    from agman_milvus.core.schema import AttributeSchema
    from agman_milvus.services.embedding import Embedder
    from agman_milvus.usecases.bulk_ingest import read_manifest
    from tests.support.celery_harness import redis_available

    items = read_manifest(manifest, limit=args.images)
    schema = AttributeSchema.from_dict({"category": 8, "colour": 12, "gender": 4, "season": 4, "usage": 6})
    results: dict[str, object] = {
        "images": len(items), "batch_size": args.batch_size, "image_size": args.image_size,
        "attributes": len(schema), "torch_threads": torch.get_num_threads(),
        "tcmalloc": tcmalloc_loaded(), "cpu": platform.processor() or platform.machine(),
        "cuda": torch.cuda.is_available(), "runs": {},
    }
    for backbone in args.backbones.split(","):
        with tempfile.TemporaryDirectory(prefix="agman-bench-") as tmp_name:
            tmp = Path(tmp_name)
            model = build_model("agman", schema=schema, backbone=backbone, image_size=args.image_size)
            checkpoint = tmp / f"{backbone}.safetensors"
            save_checkpoint(model, checkpoint)
            common = {"batch_size": args.batch_size, "collection_prefix": f"bench_{backbone}",
                      "device": "auto"}
            embedder = Embedder(checkpoint=checkpoint, batch_size=args.batch_size)
            preprocess = embedder.model.preprocess
            tensors = [preprocess(load_image(item.path)) for item in items]
            run: dict[str, object] = {}
            model_speeds = [pure_model(embedder, tensors, args.batch_size)]
            run["embedded"] = run_embedded(
                items, Settings(data_dir=tmp / "embedded", checkpoint=checkpoint, **common))
            model_speeds.append(pure_model(embedder, tensors, args.batch_size))
            if not args.no_celery and redis_available():
                run["celery"] = run_celery(items, common, tmp, checkpoint)
                model_speeds.append(pure_model(embedder, tensors, args.batch_size))
                if args.prefork:
                    run[f"celery_prefork_{args.prefork}"] = run_celery(items, common, tmp, checkpoint,
                                                                       args.prefork)
                    model_speeds.append(pure_model(embedder, tensors, args.batch_size))
            model_ips = statistics.median(model_speeds)
            run["model"] = {"images_per_second": round(model_ips, 2),
                            "rounds": [round(s, 2) for s in model_speeds]}
            for mode, measured in run.items():
                if mode != "model":
                    measured["ratio_to_model"] = round(measured["images_per_second"] / model_ips, 3)
            results["runs"][backbone] = run  # type: ignore[index]
            print(json.dumps({backbone: run}), file=sys.stderr)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
