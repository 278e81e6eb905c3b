"""The demo model: AG-MAN on an ImageNet MobileNetV2 trunk, trained for minutes on a CPU, cached.

:func:`ensure_demo_model` returns the checkpoint for a catalog manifest, training it only when
the cache (``<cache_dir>/<key>/``, key = hash of the manifest, the attributes and the recipe)
has none. Training is the product recipe (:class:`~agman_milvus.training.product.ProductTrainer`,
the default of ``agman train``): late tap points, the frozen mid maps cached once per image and
mirror, the high stage fine-tuned, value-proxy softmax + in-batch triplets, AdamW with warm-up
and cosine decay.

The catalog is split by the project's deterministic rule
(:func:`agman_milvus.training.catalog_split.split_catalog`). Quality is measured on the held-out test
images, each query ranking the test candidates that carry the same attribute: MAP with the
project's metric and precision@k, for the trained model and for the untrained ImageNet floor
(pooled trunk features). Unlike the paper's protocol, a test image is used for *every*
attribute it has, which gives several times more queries on a small catalog. Results go to
``report.json`` beside the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agman_milvus.core.engine import Batch, Decoded, EmbeddingEngine, batched
from agman_milvus.core.model import build_model, load_checkpoint
from agman_milvus.training.catalog_split import Catalog, read_catalog, split_catalog
from agman_milvus.training.datasets import ImageTable, decode_image
from agman_milvus.training.evaluate import evaluating
from agman_milvus.training.floor import PooledImageNetFeatures
from agman_milvus.training.metrics import mean_average_precision
from agman_milvus.training.product import ProductConfig, ProductTrainer, product_taps
from agman_milvus.training.readers import Label, RetrievalSplit
from agman_milvus.training.trainer import Callbacks

logger = logging.getLogger(__name__)

RECIPE_VERSION = "demo-model/2"
CHECKPOINT_NAME = "model.safetensors"
REPORT_NAME = "report.json"


@dataclass(frozen=True)
class DemoModelConfig:
    """The demo training recipe for about 600 images: the product recipe
    (:class:`~agman_milvus.training.product.ProductConfig`, its defaults but for epochs and batch
    size) and the demo's split and size.

    Measured on the 600-image demo catalog (2 cores shared with other jobs, one torch thread;
    test MAP over 109 queries, the ImageNet floor 47.5): at 160 px, 15 epochs of batches of 32
    reach 93.2 (93.1 with another seed) in 76 CPU-seconds of training; 20 epochs 93.6 (95 s),
    10 epochs 91.7, 6 epochs 88.8; batches of 64 do worse for the same epochs (15: 90.5, 6:
    84.8); 128 px loses 2 points (6 x 64: 83.0), 224 px gains nothing (6 x 64: 84.5) at 1.8x
    the cost (these sizes were chosen before the value head). With the value head (blend 0.7),
    15 x 32 reached 95.6 in 60 s of training on an idle machine. The paper's triplet recipe it
    replaces reached 90.4 in 426 CPU-seconds.
    """

    backbone: str = "mobilenet_v2"
    pretrained: str | None = "imagenet"
    image_size: int = 160
    epochs: int = 15
    batch_size: int = 32
    seed: int = 1
    split_seed: int = 0
    test_fraction: float = 0.25
    valid_fraction: float = 0.1
    query_fraction: float = 0.25
    min_count: int = 5
    max_train_images: int | None = None
    """Train on at most this many images (the first by id), for large real catalogs."""
    checkpoint: str = "last"
    """``last`` (end of training) or ``best`` (best validation MAP). The demo catalog's
    validation split is small (about 15 queries), too noisy to pick epochs by."""
    precision_k: int = 10
    measure_start: bool = False
    """Also measure the freshly built, untrained AG-MAN on the test split."""
    threads: int | None = None
    """torch CPU threads; None = the cores not already busy (see :func:`cpu_threads`)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def product_config(self, output_dir: Path, threads: int | None = None) -> ProductConfig:
        """The product recipe this demo model trains with (feature cache: 2 decode threads)."""
        return ProductConfig(output_dir=output_dir, epochs=self.epochs, batch_size=self.batch_size,
                             seed=self.seed, device="cpu", workers=2, threads=threads)

    def key_json(self) -> dict[str, Any]:
        """The fields that change the trained weights (not ``threads``), with the recipe's."""
        data = self.to_json()
        data.pop("threads")
        return {**data, "recipe": self.product_config(Path()).recipe_json()}


def cpu_threads() -> int:
    """CPU cores minus the current load, at least 1.

    Measured on a 2-core machine with other jobs running (load 14): a MobileNetV2 forward took
    0.40 s with one torch thread and 3.9 s with two, because the threads wait on each other
    while the scheduler runs other work. On an idle machine two threads are faster.
    """
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - platforms without getloadavg
        return cores
    return max(1, min(cores, int(cores - load + 0.5)))


@dataclass
class DemoModel:
    """A demo checkpoint and what was measured when it was trained."""

    checkpoint: Path
    report: dict[str, Any]
    trained_now: bool

    def load(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        return load_checkpoint(self.checkpoint).to(device).eval()


@dataclass
class RetrievalScores:
    """MAP and precision@k (both x100) per attribute and overall, with query counts."""

    per_attribute: dict[str, dict[str, float]]
    overall_map: float
    overall_precision: float
    k: int
    images_per_second: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"overall_map": self.overall_map, f"overall_p_at_{self.k}": self.overall_precision,
                "per_attribute": self.per_attribute, "images_per_second": self.images_per_second}


# -- measuring ---------------------------------------------------------------------------------
def precision_at_k(similarity: np.ndarray, query_values: np.ndarray, candidate_values: np.ndarray,
                   k: int) -> np.ndarray:
    """Per query: the share of its top-``k`` candidates (by similarity) with the query's value."""
    if similarity.shape[1] == 0:
        return np.zeros(len(query_values))
    k = min(k, similarity.shape[1])
    top = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return (np.asarray(candidate_values)[top] == np.asarray(query_values)[:, None]).mean(axis=1)


@torch.no_grad()
def embed_images(model: torch.nn.Module, table: ImageTable, images: Sequence[int], *,
                 batch_size: int = 32, workers: int = 2) -> tuple[dict[int, np.ndarray], float]:
    """``{image: [K, D] unit embeddings}`` for every decodable image, and images per second.

    Models with ``embed_all`` embed every attribute from one backbone pass; others (the
    ImageNet floor) give one attribute-independent vector, repeated K times. ``workers``
    threads decode the next batch while the model runs the current one.
    """
    device = next(model.parameters()).device
    k = len(model.schema)

    def decode(image: int) -> Decoded:
        return decode_image(table, image, model.preprocess)

    def embed(batch: torch.Tensor) -> np.ndarray:
        batch = batch.to(device)
        if hasattr(model, "embed_all"):
            vectors = model.embed_all(batch)
        else:
            ignored = torch.zeros(len(batch), dtype=torch.long)  # one vector for every attribute
            vectors = model.embed(batch, ignored).unsqueeze(1).expand(-1, k, -1)
        return vectors.float().cpu().numpy()

    out: dict[int, np.ndarray] = {}

    def collect(batch: Batch[int, Decoded], vectors: np.ndarray | None) -> None:
        if vectors is not None:
            out.update(zip(batch.ok_items, vectors, strict=True))

    with evaluating(model):
        engine = EmbeddingEngine(decode, embed, decode_workers=workers)
        timings = engine.run(batched(images, batch_size), collect)
    seconds = timings["total"]
    return out, (len(out) / seconds if seconds > 0 else 0.0)


def measure_retrieval(model: torch.nn.Module, split: RetrievalSplit, table: ImageTable, *,
                      k: int = 10, batch_size: int = 32) -> RetrievalScores:
    """MAP (the project's metric) and precision@k of ``model`` on ``split``, per attribute."""
    images = sorted({label.image for label in (*split.queries, *split.candidates)})
    vectors, speed = embed_images(model, table, images, batch_size=batch_size)
    queries = [q for q in split.queries if q.image in vectors]
    candidates = [c for c in split.candidates if c.image in vectors]

    def arrays(labels: list[Label]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        emb = (
            np.stack([vectors[label.image][label.attribute] for label in labels])
            if labels
            else np.zeros((0, 1))
        )
        return emb, np.asarray([x.attribute for x in labels]), np.asarray([x.value for x in labels])

    qe, qa, qv = arrays(queries)
    ce, ca, cv = arrays(candidates)
    names = dict(enumerate(model.schema.names))
    result = mean_average_precision(qe, qa, qv, ce, ca, cv, names=names)
    per_attribute: dict[str, dict[str, float]] = {}
    total_precision = 0.0
    for attribute, score in result.per_attribute.items():
        qm, cm = qa == attribute, ca == attribute
        precision = precision_at_k(qe[qm] @ ce[cm].T, qv[qm], cv[cm], k)
        total_precision += float(precision.sum())
        per_attribute[names[attribute]] = {
            "map": round(score, 2),
            f"p_at_{k}": round(100 * float(precision.mean()), 2),
            "queries": result.queries[attribute],
        }
    n = sum(result.queries.values())
    return RetrievalScores(
        per_attribute,
        round(result.overall, 2),
        round(100 * total_precision / n, 2) if n else 0.0,
        k,
        round(speed, 1),
    )


# -- data --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoSplit:
    """Training labels, validation split and the all-attributes test split of a catalog."""

    catalog: Catalog
    train: list[Label]
    valid: RetrievalSplit
    test: RetrievalSplit

    @property
    def table(self) -> ImageTable:
        return ImageTable(self.catalog.root, self.catalog.paths)


def split_for_demo(manifest: str | Path, attributes: Sequence[str], config: DemoModelConfig,
                   image_root: str | Path | None = None) -> DemoSplit:
    """Read ``manifest`` and split it by the project's rule; test images keep all their labels."""
    catalog = read_catalog(manifest, attributes, min_count=config.min_count, root=image_root)
    split = split_catalog(catalog, seed=config.split_seed, test_fraction=config.test_fraction,
                          valid_fraction=config.valid_fraction, query_fraction=config.query_fraction)
    by_image: dict[int, list[Label]] = {}
    for label in catalog.labels:
        by_image.setdefault(label.image, []).append(label)
    test = RetrievalSplit(
        queries=[x for q in split.test.queries for x in by_image[q.image]],
        candidates=[x for c in split.test.candidates for x in by_image[c.image]],
    )
    train = split.train
    if config.max_train_images is not None:
        keep = set(sorted({label.image for label in train})[: config.max_train_images])
        train = [label for label in train if label.image in keep]
    return DemoSplit(catalog, train, split.valid, test)


# -- training ----------------------------------------------------------------------------------
def demo_model_key(manifest: str | Path, attributes: Sequence[str], config: DemoModelConfig) -> str:
    """Cache key: the manifest's bytes, the attribute list and the recipe."""
    digest = hashlib.sha256()
    digest.update(RECIPE_VERSION.encode())
    digest.update(Path(manifest).read_bytes())
    digest.update(
        json.dumps({"attributes": list(attributes), "config": config.key_json()}, sort_keys=True).encode()
    )
    return digest.hexdigest()[:16]


def train_demo_model(manifest: str | Path, attributes: Sequence[str], out_dir: str | Path,
                     config: DemoModelConfig = DemoModelConfig(), *, image_root: str | Path | None = None,
                     callbacks: Callbacks | None = None) -> DemoModel:
    """Train the demo AG-MAN on ``manifest`` into ``out_dir`` and measure it against the floor."""
    if config.checkpoint not in ("last", "best"):
        raise ValueError(f"checkpoint must be 'last' or 'best', not {config.checkpoint!r}")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = config.threads or cpu_threads()
    torch.set_num_threads(threads)
    data = split_for_demo(manifest, attributes, config, image_root)
    schema, table = data.catalog.schema, data.table
    torch.manual_seed(config.seed)
    model = build_model("agman", schema=schema, backbone=config.backbone, pretrained=config.pretrained,
                        image_size=config.image_size, taps=product_taps("agman", config.backbone))
    report: dict[str, Any] = {
        "recipe": RECIPE_VERSION,
        "config": config.to_json(),
        "threads": threads,
        "attributes": list(schema.names),
        "schema": schema.to_json(),
        "manifest": str(manifest),
        "images": len(data.catalog.paths),
        "train_images": len({x.image for x in data.train}),
        "test_images": len({x.image for x in (*data.test.queries, *data.test.candidates)}),
    }
    if config.measure_start:
        report["untrained_agman"] = measure_retrieval(model, data.test, table, k=config.precision_k).to_json()
    train_config = config.product_config(out_dir / "run", threads)
    trainer = ProductTrainer(model, train_config, data.train, table, valid=data.valid)
    fit_started, fit_cpu = time.perf_counter(), time.process_time()
    records = trainer.fit(callbacks)
    report["train_seconds"] = round(time.perf_counter() - fit_started, 1)
    report["train_cpu_seconds"] = round(time.process_time() - fit_cpu, 1)
    report["load_average"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    cache = trainer.cache
    if cache is not None:
        maps = [m for m in (cache.mid, cache.high) if m is not None]
        report["feature_cache"] = {"rows": len(cache), "megabytes": round(
            sum(m.nelement() * m.element_size() for m in maps) / 2**20, 1)}
    report["epochs"] = [{k: v for k, v in r.items() if k != "valid_per_attribute"} for r in records]
    chosen = (
        trainer.last_path
        if config.checkpoint == "last" and trainer.last_path.is_file()
        else trainer.best_path
    )
    model = load_checkpoint(chosen)
    report["trained"] = measure_retrieval(model, data.test, table, k=config.precision_k).to_json()
    floor = PooledImageNetFeatures(schema, config.backbone, config.image_size, pretrained=config.pretrained)
    report["untrained_imagenet"] = measure_retrieval(floor, data.test, table, k=config.precision_k).to_json()
    shutil.copyfile(chosen, out_dir / CHECKPOINT_NAME)
    for path in trainer.output_dir.iterdir():  # keep metrics.jsonl; weights and optimizer state are spent
        if path.name != trainer.metrics_path.name:
            path.unlink()
    report["model_version"] = model.version
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    logger.info(
        "demo model: test MAP %.1f (ImageNet floor %.1f), P@%d %.1f (floor %.1f); trained in %.0f s",
        report["trained"]["overall_map"],
        report["untrained_imagenet"]["overall_map"],
        config.precision_k,
        report["trained"][f"overall_p_at_{config.precision_k}"],
        report["untrained_imagenet"][f"overall_p_at_{config.precision_k}"],
        report["train_seconds"],
    )
    return DemoModel(out_dir / CHECKPOINT_NAME, report, trained_now=True)


def ensure_demo_model(manifest: str | Path, attributes: Sequence[str], cache_dir: str | Path,
                      config: DemoModelConfig = DemoModelConfig(), *, image_root: str | Path | None = None,
                      callbacks: Callbacks | None = None) -> DemoModel:
    """The cached demo model for this manifest and recipe, training it first when missing.

    The key covers the manifest's bytes, not the image files: edit images in place and you
    must delete the cache entry (or change the manifest) to retrain.
    """
    key = demo_model_key(manifest, attributes, config)
    final = Path(cache_dir) / key
    if (final / REPORT_NAME).is_file() and (final / CHECKPOINT_NAME).is_file():
        logger.info("using cached demo model %s", final / CHECKPOINT_NAME)
        report = json.loads((final / REPORT_NAME).read_text(encoding="utf-8"))
        return DemoModel(final / CHECKPOINT_NAME, report, trained_now=False)
    partial = Path(cache_dir) / f"{key}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    try:
        train_demo_model(manifest, attributes, partial, config, image_root=image_root, callbacks=callbacks)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if final.exists():  # another process finished first; keep its result
        shutil.rmtree(partial)
    else:
        partial.rename(final)
    report = json.loads((final / REPORT_NAME).read_text(encoding="utf-8"))
    return DemoModel(final / CHECKPOINT_NAME, report, trained_now=True)
