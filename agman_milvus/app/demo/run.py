"""The whole ``agman demo`` as one library function: catalog, model, ingest, searches, copy checks.

:func:`run_demo` works under ``<data_dir>/demo/``:

* ``catalog/``: the generated catalog (reused when it matches), or nothing for ``--catalog``;
  a bounded subset of a real manifest is written to ``catalogs/`` (its images stay where they
  are);
* ``models/``: the demo model cache (:func:`~agman_milvus.app.demo.demo_model.ensure_demo_model`), and
  ``model.safetensors``: a copy of the model this run used (the default checkpoint afterwards);
* ``demo.html`` and ``summary.json``.

The deployment is rebuilt from scratch on every run (so the figures are reproducible) and is
the user's **default** embedded deployment (``<data_dir>``: Milvus Lite + SQLite + blobs) when
that is free: nothing is there yet, or only what an earlier demo put there. Then ``agman search``
and ``Client()`` work on the demo's catalogue afterwards with nothing set. A deployment that
holds anything else (the user's own catalogue), or a configured server, Milvus, database,
broker or checkpoint, is never touched: the demo then runs in ``<data_dir>/demo/run/``.

The catalog is split by the demo model's rule: the held-out test images (never trained on)
are the search queries and are NOT ingested; everything else is. Precision@k of an attribute
search is the share of the top-k products (one hit per product) whose value of that attribute
equals the query's. Copy checks: thresholds are calibrated through the Client, then edited
copies of ingested images (expected ``copy``/``near_duplicate`` with the right product) and
unrelated images never ingested (expected ``distinct``) are checked.

Progress goes to an optional ``progress(stage, done, total)`` callback; the library only logs.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
import logging
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from agman_milvus.app.demo import page
from agman_milvus.app.demo.demo_model import (
    DemoModel,
    DemoModelConfig,
    DemoSplit,
    ensure_demo_model,
    split_for_demo,
)
from agman_milvus.app.demo.photos import DEMO_ATTRIBUTES, ensure_catalog, generate_catalog
from agman_milvus.core.errors import AgmanError
from agman_milvus.training.trainer import Callbacks, StepInfo

logger = logging.getLogger(__name__)

__all__ = ["DemoError", "DemoOptions", "DemoSummary", "FASHION_ATTRIBUTES", "Progress", "run_demo"]

Progress = Callable[[str, int, "int | None"], None]
"""``progress(stage, done, total)``; stages: catalog, model (with maps: the demo model's cached trunk
maps), ingest, search, multi, calibrate, copy."""

FASHION_ATTRIBUTES = ("articleType", "baseColour", "gender", "usage")
"""Default attributes of a fashion-products style manifest (``--catalog`` without ``--attributes``)."""
RUN_MARKER = ".agman-demo-run"
#: What an embedded deployment keeps in its data directory (removed when the demo rebuilds it).
_DEPLOYMENT_FILES = ("milvus.db", "catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm", "blobs",
                     "calibration")
_METADATA_KEYS = {"productDisplayName": "title", "articleType": "category", "baseColour": "colour"}


class DemoError(AgmanError, RuntimeError):
    """The demo cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class DemoOptions:
    """What :func:`run_demo` does. ``images``: catalog size to generate, or the first N rows
    of ``catalog`` (None = all of it). ``image_size``: the model's input size, and the
    generated photos' size (default 224 for the photos)."""

    data_dir: Path
    catalog: Path | None = None
    attributes: tuple[str, ...] | None = None
    images: int | None = None
    image_size: int | None = None
    model: DemoModelConfig = DemoModelConfig()
    copies: int = 40
    """Edited copies checked, and as many unrelated images."""
    queries_per_attribute: int = 3
    """Searches shown on the HTML page per attribute (all held-out images are measured)."""
    calibration_sample: int = 200
    """Images :func:`~agman_milvus.usecases.copy_calibration.calibrate` edits to set the copy
    thresholds. Measured on the default catalog: with 60, the 99%-precision threshold was too
    loose (7 of 40 unrelated look-alike renders called ``copy``); with 200, none were (about 25 s
    more)."""
    top_k: int = 10
    seed: int = 0


@dataclass
class AttributeFigures:
    attribute: str
    precision_at_k: float
    queries: int
    chance_precision_at_k: float = 0.0
    """What a random ranking scores: the share of the ingested images holding each query's value,
    averaged over the queries."""
    offline_map: float | None = None
    imagenet_floor_map: float | None = None


@dataclass
class CopyFigures:
    accuracy: float
    copies: int
    unrelated: int
    copies_confusion: dict[str, int]
    """Verdicts of the edited copies: copy, near_duplicate (both found, right product),
    wrong_match (found but another product), distinct (missed)."""
    unrelated_confusion: dict[str, int]
    calibrated: bool
    thresholds: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoSummary:
    """Everything :func:`run_demo` measured, and where it wrote the page and the JSON."""

    catalog: str
    generated_catalog: bool
    attributes: list[str]
    images: int
    products: int
    ingested: int
    held_out_queries: int
    top_k: int
    per_attribute: list[AttributeFigures]
    multi: dict[str, Any]
    copy: CopyFigures
    ingest: dict[str, Any]
    model: dict[str, Any]
    seconds: dict[str, float]
    html: Path
    summary_json: Path
    deployment: Path  # the data directory the demo's catalogue is served from
    default_deployment: bool  # it is the user's default one (nothing to set to explore it)

    @property
    def mean_precision(self) -> float:
        scored = [a for a in self.per_attribute if a.queries]
        return float(np.mean([a.precision_at_k for a in scored])) if scored else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["html"], data["summary_json"] = str(self.html), str(self.summary_json)
        data["deployment"] = str(self.deployment)
        data["mean_precision_at_k"] = round(self.mean_precision, 2)
        return data


@dataclass
class _Query:
    path: Path
    labels: dict[str, str]  # attribute -> value (only the labelled ones)


# -- helpers -----------------------------------------------------------------------------------
def _notify(progress: Progress | None, stage: str, done: int, total: int | None) -> None:
    if progress is not None:
        progress(stage, done, total)


def _columns(manifest: Path) -> list[str]:
    with manifest.open(newline="", encoding="utf-8-sig") as fh:
        return list(csv.DictReader(fh).fieldnames or [])


def _subset_manifest(manifest: Path, limit: int, out_dir: Path) -> Path:
    """The first ``limit`` rows of ``manifest`` as a CSV in ``out_dir`` (rewritten only when changed)."""
    with manifest.open(newline="", encoding="utf-8-sig") as fh:
        rows = list(itertools.islice(csv.reader(fh), limit + 1))  # header + limit rows
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    text = buffer.getvalue()
    digest = hashlib.sha256(str(manifest.resolve()).encode()).hexdigest()[:8]
    path = out_dir / f"{manifest.stem}-{digest}-first{limit}.csv"
    out_dir.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def _holds_only_the_demo(data_dir: Path, demo_products: set[str]) -> bool:
    """True when the embedded deployment in ``data_dir`` is empty, or was made by a demo and
    still holds nothing but the demo's products (so rebuilding it loses nothing of the user's)."""
    present = [name for name in _DEPLOYMENT_FILES if (data_dir / name).exists()]
    if not present:
        return True
    if not (data_dir / RUN_MARKER).is_file() or not (data_dir / "catalog.sqlite").is_file():
        return False
    from agman_milvus.services.store.catalog import Catalog
    from agman_milvus.services.store.engine import create_catalog_engine

    catalog = Catalog(create_catalog_engine(f"sqlite:///{data_dir / 'catalog.sqlite'}"))
    try:
        return catalog.products.external_ids() <= demo_products
    finally:
        catalog.dispose()


def _fresh_deployment(data_dir: Path) -> None:
    """Remove the previous demo deployment's files and mark the directory as the demo's."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in _DEPLOYMENT_FILES:
        path = data_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    (data_dir / RUN_MARKER).write_text(
        "made by agman demo: rebuilt by every demo run as long as it holds only the demo's catalogue\n",
        encoding="utf-8")


def _deployment(options: DemoOptions, demo_dir: Path, checkpoint: Path, demo_products: set[str]) -> Any:
    """Settings of the deployment the demo rebuilds: the user's default one when it is free."""
    from agman_milvus.core.config import get_settings

    user = get_settings(data_dir=options.data_dir)
    configured = user.milvus_uri or user.database_url or user.broker_url or (
        user.checkpoint is not None and Path(user.checkpoint).resolve() != checkpoint.resolve())
    if not configured and _holds_only_the_demo(user.data_dir, demo_products):
        target, prefix = user.data_dir, user.collection_prefix
    else:
        target, prefix = demo_dir / "run", "agman_demo"
        logger.info("the default deployment in %s holds other data (or a server is configured): the "
                    "demo runs in %s instead", user.data_dir, target)
    return get_settings(data_dir=target, checkpoint=checkpoint, milvus_uri=None, database_url=None,
                        broker_url=None, collection_prefix=prefix)


def _publish_checkpoint(checkpoint: Path, target: Path) -> None:
    """Leave the demo model at ``<data_dir>/demo/model.safetensors``, where ``Settings.resolved_checkpoint``
    finds it when ``AGMAN_CHECKPOINT`` is unset (atomically: a Client may be reading it)."""
    partial = target.with_name(f".{target.name}.partial")
    shutil.copyfile(checkpoint, partial)
    partial.replace(target)


def _value(metadata: dict[str, Any], attribute: str) -> str | None:
    raw = metadata.get(_METADATA_KEYS.get(attribute, attribute))
    if raw is None:
        raw = metadata.get(attribute)
    text = str(raw).strip() if raw is not None else ""
    return text or None


def _training_callbacks(progress: Progress | None, epochs: int) -> Callbacks | None:
    """Stage ``maps`` while the frozen trunk maps are cached (images), then ``model`` (steps)."""
    if progress is None:
        return None
    cached = {"done": 0, "total": 0}

    def on_epoch_start(epoch: int, total: int) -> None:
        if epoch == 0:  # the product trainer caches the frozen maps first
            cached.update(done=0, total=total)
            progress("maps", 0, total)

    def on_eval(images: int) -> None:
        cached["done"] += images
        progress("maps", cached["done"], cached["total"] or None)

    def on_step(info: StepInfo) -> None:
        total = max(1, epochs * info.steps)
        done = min(total, max(0, (max(info.epoch, 1) - 1) * info.steps + info.step))
        progress("model", done, total)

    return Callbacks(on_step=on_step, on_epoch_start=on_epoch_start, on_eval=on_eval)


# -- the run -----------------------------------------------------------------------------------
@contextlib.contextmanager
def _exclusive(demo_dir: Path) -> Iterator[None]:
    """Hold ``demo_dir/.lock`` for the run: two demos on one directory would delete each other's ``run/``."""
    import fcntl

    with open(demo_dir / ".lock", "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DemoError(f"another agman demo is running in {demo_dir}; wait for it or pass another "
                            "--data-dir") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def run_demo(options: DemoOptions, progress: Progress | None = None) -> DemoSummary:
    """Run the whole demo (see the module docstring) and return what it measured."""
    demo_dir = Path(options.data_dir) / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(demo_dir):
        return _run(options, demo_dir, progress)


def _run(options: DemoOptions, demo_dir: Path, progress: Progress | None) -> DemoSummary:
    started = time.perf_counter()
    seconds: dict[str, float] = {}

    # 1. catalog
    t0 = time.perf_counter()
    _notify(progress, "catalog", 0, None)
    model_config = options.model
    if options.catalog is None:
        photo_size = options.image_size or 224
        n_images = options.images or 600
        demo_catalog = ensure_catalog(
            demo_dir / "catalog", n_images, seed=options.seed, image_size=photo_size
        )
        manifest, image_root = demo_catalog.manifest, None
        attributes = tuple(options.attributes or DEMO_ATTRIBUTES)
        generated = True
    else:
        source = Path(options.catalog)
        if not source.is_file():
            raise DemoError(f"catalog manifest not found: {source}")
        columns = _columns(source)
        if options.attributes:
            attributes = tuple(options.attributes)
        elif all(a in columns for a in DEMO_ATTRIBUTES):
            attributes = DEMO_ATTRIBUTES
        elif all(a in columns for a in FASHION_ATTRIBUTES):
            attributes = FASHION_ATTRIBUTES
        else:
            raise DemoError(f"{source}: say which columns are attributes with --attributes a,b,c; "
                            f"its columns: {', '.join(columns)}")
        missing = [a for a in attributes if a not in columns]
        if missing:
            raise DemoError(
                f"{source} has no column(s) {', '.join(missing)}; its columns: {', '.join(columns)}"
            )
        image_root = source.parent
        manifest = (
            _subset_manifest(source, options.images, demo_dir / "catalogs") if options.images else source
        )
        generated = False
    if options.image_size is not None:
        model_config = replace(model_config, image_size=options.image_size)
    columns = _columns(manifest)
    product_column = "product_id" if "product_id" in columns else "id"
    if "file" not in columns or "id" not in columns:
        raise DemoError(f"{manifest} needs a 'file' and an 'id' column; its columns: {', '.join(columns)}")
    seconds["catalog"] = round(time.perf_counter() - t0, 1)
    _notify(progress, "catalog", 1, 1)

    # 2. model
    t0 = time.perf_counter()
    _notify(progress, "model", 0, None)
    demo_model = ensure_demo_model(
        manifest,
        attributes,
        demo_dir / "models",
        model_config,
        image_root=image_root,
        callbacks=_training_callbacks(progress, model_config.epochs),
    )
    _publish_checkpoint(demo_model.checkpoint, demo_dir / "model.safetensors")
    seconds["model"] = round(time.perf_counter() - t0, 1)
    _notify(progress, "model", 1, 1)
    data = split_for_demo(manifest, attributes, model_config, image_root)
    queries = _held_out_queries(data)

    # 3. a fresh deployment; ingest everything but the held-out images, then search and check
    from agman_milvus.services.store.vectors import close_milvus

    with manifest.open(newline="", encoding="utf-8-sig") as fh:
        demo_products = {row[product_column] for row in csv.DictReader(fh)}
    settings = _deployment(options, demo_dir, demo_model.checkpoint, demo_products)
    close_milvus(settings)  # a previous run in this process may still hold the directory
    _fresh_deployment(Path(settings.data_dir))
    plan = _Plan(manifest, image_root, product_column, generated, data, queries, demo_model, demo_dir)
    try:
        summary = _serve(options, settings, plan, seconds, progress, started)
    finally:  # release Milvus Lite so the next run (in this process too) can delete run/
        close_milvus(settings)
    return summary


@dataclass
class _Plan:
    """What the serving half of the run works on: the catalog, its split and the model."""

    manifest: Path
    image_root: Path | None
    product_column: str
    generated: bool
    data: DemoSplit
    queries: list[_Query]
    demo_model: DemoModel
    demo_dir: Path


def _serve(options: DemoOptions, settings: Any, plan: _Plan, seconds: dict[str, float],
           progress: Progress | None, started: float) -> DemoSummary:
    """Ingest into the fresh deployment, search, check copies, and write the page and JSON."""
    from agman_milvus.app.client import Client
    from agman_milvus.usecases.bulk_ingest import bulk_ingest, read_manifest
    from agman_milvus.usecases.dispatch import InProcessDispatcher

    manifest, image_root, generated, data = plan.manifest, plan.image_root, plan.generated, plan.data
    queries, demo_model, demo_dir = plan.queries, plan.demo_model, plan.demo_dir
    product_column = plan.product_column

    names = list(data.catalog.schema.names)
    all_items = read_manifest(manifest, image_root=image_root, product_column=product_column)
    held = {str(q.path) for q in queries}
    items = [item for item in all_items if str(item.path) not in held]
    if not items:
        raise DemoError("nothing left to ingest after holding out the query images; use a larger catalog")
    t0 = time.perf_counter()
    with Client(settings) as client:
        dispatcher = InProcessDispatcher(client.services)
        _notify(progress, "ingest", 0, len(items))
        bulk = bulk_ingest(items, client.services, dispatcher,
                           progress=lambda done, total: _notify(progress, "ingest", done, total))
        ingest = {
            "images": len(items),
            "indexed": bulk.indexed,
            "failed": bulk.failed,
            "seconds": round(bulk.seconds, 1),
            "images_per_second": round(dispatcher.report.images_per_second, 1),
            "end_to_end_images_per_second": round(bulk.indexed / bulk.seconds, 1) if bulk.seconds else 0.0,
            "stage_seconds": {k: round(v, 2) for k, v in dispatcher.report.timings.items()},
        }
        if bulk.failed:
            logger.warning(
                "%d images failed to ingest, e.g. %s", bulk.failed, list(bulk.failures.items())[:3]
            )
        seconds["ingest"] = round(time.perf_counter() - t0, 1)
        logger.info(
            "ingested %d images: %.1f images/s (decode -> indexed)", bulk.indexed, ingest["images_per_second"]
        )

        # 4. attribute searches and a multi-attribute search with the held-out images
        t0 = time.perf_counter()
        figures, shown = _attribute_searches(client, queries, items, names, options, progress)
        offline = demo_model.report.get("trained", {}).get("per_attribute", {})
        floor = demo_model.report.get("untrained_imagenet", {}).get("per_attribute", {})
        for fig in figures:
            fig.offline_map = offline.get(fig.attribute, {}).get("map")
            fig.imagenet_floor_map = floor.get(fig.attribute, {}).get("map")
        multi, multi_shown = _multi_search(client, queries, names, options, progress)
        seconds["search"] = round(time.perf_counter() - t0, 1)

        # 5. copy checks
        t0 = time.perf_counter()
        if generated:
            unrelated_dir = demo_dir / "unrelated"
            fresh = generate_catalog(unrelated_dir, max(1, options.copies), seed=options.seed + 7919,
                                     image_size=options.image_size or 224)
            unrelated = [unrelated_dir / item.file for item in fresh.items]
            unrelated_what = "freshly drawn product photo (another seed), never ingested"
        else:
            ingested_products = {item.product_id for item in items}
            product_of = {str(item.path): item.product_id for item in all_items}
            pool = [q.path for q in queries if product_of.get(str(q.path)) not in ingested_products]
            random.Random(options.seed + 1).shuffle(pool)
            unrelated = pool[: options.copies]
            unrelated_what = "held-out catalogue photo of a product that was not ingested"
        copy, copy_shown = _copy_checks(client, items, unrelated, unrelated_what, names, options, progress)
        seconds["copy_checks"] = round(time.perf_counter() - t0, 1)
        model_version = client.services.embedder.version

    seconds["total"] = round(time.perf_counter() - started, 1)
    model = {
        "checkpoint": str(demo_model.checkpoint),
        "trained_now": demo_model.trained_now,
        "version": model_version,
        "train_seconds": demo_model.report.get("train_seconds"),
        "offline_test_map": demo_model.report.get("trained", {}).get("overall_map"),
        "imagenet_floor_map": demo_model.report.get("untrained_imagenet", {}).get("overall_map"),
        "config": demo_model.report.get("config"),
    }
    summary = DemoSummary(
        catalog=str(options.catalog or manifest), generated_catalog=generated, attributes=names,
        images=len(all_items), products=len({i.product_id for i in all_items}), ingested=bulk.indexed,
        held_out_queries=len(queries), top_k=options.top_k, per_attribute=figures, multi=multi, copy=copy,
        ingest=ingest, model=model, seconds=seconds, html=demo_dir / "demo.html",
        summary_json=demo_dir / "summary.json", deployment=Path(settings.data_dir),
        default_deployment=Path(settings.data_dir) == Path(options.data_dir),
    )
    page.write_page(summary.html, _page(summary, demo_model, shown + multi_shown, copy_shown))
    summary.summary_json.write_text(json.dumps(summary.to_json(), indent=1) + "\n", encoding="utf-8")
    logger.info("demo done in %.0f s: %s, %s", seconds["total"], summary.html, summary.summary_json)
    return summary


def _held_out_queries(data: DemoSplit) -> list[_Query]:
    """Every test image of the split, with its labelled attribute values."""
    schema = data.catalog.schema
    labels: dict[int, dict[str, str]] = {}
    for label in (*data.test.queries, *data.test.candidates):
        attribute = schema[label.attribute]
        labels.setdefault(label.image, {})[attribute.name] = attribute.values[label.value]
    return [_Query(data.catalog.image_path(i), labels[i]) for i in sorted(labels)]


def _load(client: Any, uri: str | None) -> Image.Image | None:
    if uri is None:
        return None
    try:
        return client.load_image(uri)
    except Exception as error:  # noqa: BLE001 - a missing thumbnail must not sink the run
        logger.warning("cannot load %s for the page: %s", uri, error)
        return None


def _attribute_searches(client: Any, queries: list[_Query], items: list[Any], names: list[str],
                        options: DemoOptions, progress: Progress | None,
                        ) -> tuple[list[AttributeFigures], list[page.SearchResult]]:
    """Search every held-out image in every attribute it has a label for (one backbone pass per
    image, one batched Milvus search per attribute and chunk) against the ingested ``items``."""
    from agman_milvus.usecases.search import SearchService

    searcher = SearchService.from_services(client.services)
    embedder = client.services.embedder
    k = options.top_k
    scores: dict[str, list[float]] = {a: [] for a in names}
    shares = {a: Counter(_value(item.metadata, a) for item in items) for a in names}
    chance: dict[str, list[float]] = {a: [] for a in names}
    results: dict[str, list[tuple[_Query, list[Any]]]] = {a: [] for a in names}
    chunk = 16
    for start in range(0, len(queries), chunk):
        part = queries[start:start + chunk]
        images = [client.load_image(q.path) for q in part]
        embeddings = embedder.encode(images).embeddings  # [B, K, D]
        for a, name in enumerate(names):
            for n, query in enumerate(part):
                if name not in query.labels:
                    continue
                hits = searcher.search_vectors(name, [embeddings[n, a]], k)
                matches = [_value(h.metadata, name) == query.labels[name] for h in hits]
                scores[name].append(float(np.mean(matches + [False] * (k - len(matches)))))
                chance[name].append(shares[name][query.labels[name]] / max(1, len(items)))
                results[name].append((query, hits))
        _notify(progress, "search", min(len(queries), start + chunk), len(queries))
    figures = [AttributeFigures(a, round(100 * float(np.mean(s)), 1) if s else 0.0, len(s),
                                chance_precision_at_k=round(100 * float(np.mean(chance[a])), 1) if s else 0.0)
               for a, s in scores.items()]
    shown: list[page.SearchResult] = []
    rng = random.Random(options.seed + 2)
    for name in names:
        picks = _diverse(
            results[name], lambda r, name=name: r[0].labels[name], options.queries_per_attribute, rng
        )
        for query, hits in picks:
            shown.append(
                page.SearchResult(
                    query_image=query.path,
                    attribute=name,
                    query_value=query.labels[name],
                    title=f"{name} = {query.labels[name]}: held-out query {query.path.name}",
                    hits=[
                        page.SearchHit(
                            image=_load(client, h.source_uri),
                            score=h.score,
                            value=_value(h.metadata, name),
                            title=str(h.metadata.get("title") or ""),
                            product_id=h.product_id,
                        )
                        for h in hits
                    ],
                )
            )
    return figures, shown


def _diverse(rows: Sequence[Any], key: Callable[[Any], str], n: int, rng: random.Random) -> list[Any]:
    """Up to ``n`` rows with different ``key`` values where possible (deterministic)."""
    order = list(rows)
    rng.shuffle(order)
    picked, seen = [], set()
    for row in order:
        if len(picked) < n and key(row) not in seen:
            picked.append(row)
            seen.add(key(row))
    for row in order:
        if len(picked) >= n:
            break
        if row not in picked:
            picked.append(row)
    return picked


def _multi_search(client: Any, queries: list[_Query], names: list[str], options: DemoOptions,
                  progress: Progress | None) -> tuple[dict[str, Any], list[page.SearchResult]]:
    """``{first: 0.5, second: 0.5}`` through ``Client.search_multi`` for every held-out image
    labelled in both; a hit counts when both attributes match."""
    if len(names) < 2:
        return {"weights": {}, "precision_at_k": None, "queries": 0}, []
    a, b = names[0], names[1]
    weights = {a: 0.5, b: 0.5}
    eligible = [q for q in queries if a in q.labels and b in q.labels]
    scores: list[float] = []
    results: list[tuple[_Query, list[Any]]] = []
    k = options.top_k
    for n, query in enumerate(eligible, start=1):
        hits = client.search_multi(query.path, weights, top_k=k)
        both = [
            _value(h.metadata, a) == query.labels[a] and _value(h.metadata, b) == query.labels[b]
            for h in hits
        ]
        scores.append(float(np.mean(both + [False] * (k - len(both)))))
        results.append((query, hits))
        if n % 8 == 0 or n == len(eligible):
            _notify(progress, "multi", n, len(eligible))
    figures = {
        "weights": weights,
        "precision_at_k": round(100 * float(np.mean(scores)), 1) if scores else None,
        "queries": len(scores),
    }
    shown = []
    for query, hits in _diverse(
        results, lambda r: f"{r[0].labels[a]}/{r[0].labels[b]}", 2, random.Random(options.seed + 3)
    ):
        value = f"{query.labels[a]} / {query.labels[b]}"
        shown.append(page.SearchResult(
            query_image=query.path, attribute=a, attributes=[a, b], query_value=value,
            title=f"{a} + {b} (weights 0.5 / 0.5) = {value}: held-out query {query.path.name}",
            hits=[page.SearchHit(image=_load(client, h.source_uri), score=h.score,
                                 value=f"{_value(h.metadata, a)} / {_value(h.metadata, b)}",
                                 title=str(h.metadata.get("title") or ""), product_id=h.product_id)
                  for h in hits]))
    return figures, shown


def _copy_checks(client: Any, items: Sequence[Any], unrelated: Sequence[Path], unrelated_what: str,
                 names: list[str], options: DemoOptions,
                 progress: Progress | None) -> tuple[CopyFigures, list[page.CopyCheck]]:
    """Calibrate, then check edited copies of ingested images and unrelated images."""
    from agman_milvus.core.copy_edits import random_edit
    from agman_milvus.core.images import load_image
    from agman_milvus.usecases.copy_calibration import NotEnoughImagesError
    from agman_milvus.usecases.copyright import COPY, DISTINCT, NEAR_DUPLICATE, CopyThresholds

    _notify(progress, "calibrate", 0, None)
    try:
        thresholds = client.calibrate_copy(sample=options.calibration_sample, seed=options.seed).thresholds
    except NotEnoughImagesError as error:
        logger.warning("copy thresholds not calibrated (%s); using the defaults", error)
        thresholds = CopyThresholds(model_version=client.services.vectors.model_version)
    _notify(progress, "calibrate", 1, 1)
    rng = random.Random(options.seed + 4)
    sources = rng.sample(list(items), min(options.copies, len(items)))
    total = len(sources) + len(unrelated)
    copies_confusion: Counter[str] = Counter({COPY: 0, NEAR_DUPLICATE: 0, "wrong_match": 0, DISTINCT: 0})
    unrelated_confusion: Counter[str] = Counter({DISTINCT: 0, NEAR_DUPLICATE: 0, COPY: 0})
    shown_copies: list[page.CopyCheck] = []
    shown_wrong: list[page.CopyCheck] = []
    shown_unrelated: list[page.CopyCheck] = []
    done = 0
    for item in sources:
        original = load_image(item.path)
        background = load_image(rng.choice(items).path)
        edited, edits = random_edit(original, rng, (1, 3), background=background)
        check = client.check_copy(edited)
        best = check.best
        found = check.verdict in (COPY, NEAR_DUPLICATE)
        right = found and best is not None and best.product_id == item.product_id
        outcome = check.verdict if right else ("wrong_match" if found else DISTINCT)
        copies_confusion[outcome] += 1
        card = _copy_card(
            client,
            check,
            edited,
            f"{' + '.join(edits)} of {item.path.name} (product {item.product_id})",
            "copy or near_duplicate" if right or not found else "copy of the right product",
            names,
            thresholds,
        )
        if not right and found:
            card.verdict = f"{check.verdict} (wrong product)"
        (shown_wrong if not right else shown_copies).append(card)
        done += 1
        _notify(progress, "copy", done, total)
    for path in unrelated:
        check = client.check_copy(path)
        unrelated_confusion[check.verdict] += 1
        shown_unrelated.append(
            _copy_card(client, check, path, f"{path.name}: {unrelated_what}", DISTINCT, names, thresholds)
        )
        done += 1
        _notify(progress, "copy", done, total)
    right_copies = copies_confusion[COPY] + copies_confusion[NEAR_DUPLICATE]
    accuracy = (right_copies + unrelated_confusion[DISTINCT]) / total if total else 0.0
    figures = CopyFigures(
        accuracy=round(100 * accuracy, 1), copies=len(sources), unrelated=len(unrelated),
        copies_confusion=dict(copies_confusion), unrelated_confusion=dict(unrelated_confusion),
        calibrated=thresholds.calibrated,
        thresholds={"copy": thresholds.copy, "near_duplicate": thresholds.near_duplicate,
                    "phash_copy": thresholds.phash_copy, "stats": thresholds.stats},
    )
    wrong_unrelated = [c for c in shown_unrelated if c.verdict != DISTINCT]
    right_unrelated = [c for c in shown_unrelated if c.verdict == DISTINCT]
    shown = shown_copies[:5] + shown_wrong[:2] + right_unrelated[:3] + wrong_unrelated[:2]
    return figures, shown


def _copy_card(client: Any, check: Any, query: Any, label: str, expected: str, names: list[str],
               t: Any) -> page.CopyCheck:
    """The page's card for one check: query, best match, verdict and the evidence behind it."""
    from agman_milvus.core.copy_evidence import draw_evidence

    best = check.best
    evidence: list[tuple[str, Any]] = [("verdict score", round(check.score, 4))]
    match = picture = None
    if best is not None:
        v = best.verification
        if v is not None:
            evidence += [("verification", f"{v.method}: {v.inliers} inliers of {v.matches} matches"
                          + (", mirrored" if v.mirrored else "")),
                         ("residual (cells still differing)", round(v.residual, 3))]
        evidence += [
            ("descriptor cosine", round(best.descriptor_similarity, 4)),
            ("copy threshold (score ≥)", round(t.copy, 4)),
            ("near-duplicate threshold (score ≥)", round(t.near_duplicate, 4)),
            ("pHash distance (of 64 bits)", best.phash_distance if best.phash_distance is not None else "–"),
            ("pHash copy if ≤", t.phash_copy),
            ("attributes agreeing", f"{best.attributes_agreeing}/{len(best.attributes)}"),
        ]
        evidence += [
            (
                f"{name} cosine (≥ {best.attributes[name].threshold:.2f})",
                f"{best.attributes[name].similarity:.3f} {'✓' if best.attributes[name].agrees else '✗'}",
            )
            for name in names
            if name in best.attributes
        ]
        match_image = _load(client, best.source_uri)
        match = page.CopyMatch(image=match_image, title=str(best.metadata.get("title") or ""),
                               product_id=best.product_id, score=best.score)
        query_image = query if isinstance(query, Image.Image) else _load(client, str(query))
        if v is not None and v.region and match_image is not None and query_image is not None:
            picture = draw_evidence(query_image, match_image, v, height=200)
    evidence.append(("calibrated thresholds", check.calibrated))
    return page.CopyCheck(query_image=query, verdict=check.verdict, best_match=match, evidence=evidence,
                          query_label=label, expected=expected, evidence_image=picture)


# -- the page ----------------------------------------------------------------------------------
def _page(summary: DemoSummary, demo_model: DemoModel, searches: list[page.SearchResult],
          copies: list[page.CopyCheck]) -> str:
    k = summary.top_k
    copy = summary.copy
    facts: list[tuple[str, Any]] = [
        ("catalog", summary.catalog),
        ("images / products", f"{summary.images} / {summary.products}"),
        (
            "ingested (held-out queries not ingested)",
            f"{summary.ingested} ({summary.held_out_queries} held out)",
        ),
        (f"attribute search: mean precision@{k}", f"{summary.mean_precision:.1f}%"),
        (
            f"multi-attribute search precision@{k} "
            f"({' + '.join(summary.multi.get('weights', {}))}, both match)",
            f"{summary.multi['precision_at_k']}%" if summary.multi.get("precision_at_k") is not None else "–",
        ),
        ("copy-check accuracy", f"{copy.accuracy}% of {copy.copies + copy.unrelated}"),
        ("ingest speed (decode → indexed)", f"{summary.ingest['images_per_second']} images/s"),
        (
            "model",
            f"{summary.model['version']} ({'trained now' if demo_model.trained_now else 'from cache'}; "
            f"offline test MAP {summary.model['offline_test_map']} "
            f"vs ImageNet floor {summary.model['imagenet_floor_map']})",
        ),
        ("total time", f"{summary.seconds['total']:.0f} s"),
    ]
    per_attribute = page.Table(
        f"Attribute search on held-out images (precision@{k}, one hit per product)",
        ["attribute", f"P@{k} %", f"chance P@{k} %", "queries", "offline test MAP", "ImageNet floor MAP"],
        [
            [
                a.attribute,
                a.precision_at_k,
                a.chance_precision_at_k,
                a.queries,
                a.offline_map if a.offline_map is not None else "–",
                a.imagenet_floor_map if a.imagenet_floor_map is not None else "–",
            ]
            for a in summary.per_attribute
        ],
    )
    confusion = page.Table(
        "Copy checks (verdict counts)",
        ["queries", "copy", "near_duplicate", "distinct", "wrong product"],
        [
            [
                f"{copy.copies} edited copies of ingested images",
                copy.copies_confusion.get("copy", 0),
                copy.copies_confusion.get("near_duplicate", 0),
                copy.copies_confusion.get("distinct", 0),
                copy.copies_confusion.get("wrong_match", 0),
            ],
            [
                f"{copy.unrelated} unrelated images",
                copy.unrelated_confusion.get("copy", 0),
                copy.unrelated_confusion.get("near_duplicate", 0),
                copy.unrelated_confusion.get("distinct", 0),
                "–",
            ],
        ],
    )
    timing = page.Table(
        "Time (seconds)", ["stage", "seconds"], [[k_, v] for k_, v in summary.seconds.items()]
    )
    notes = [
        "Every figure on this page was measured by this run on a fresh embedded deployment "
        "(Milvus Lite + SQLite, in-process ingest). "
        "Queries are held-out images: not trained on, not ingested.",
        "Green frames: the hit has the query's value of the searched attribute; red: it does not. "
        "An edited copy counts as found when the verdict is copy or near_duplicate and the best match "
        "is the original's product; an unrelated image should be distinct.",
    ]
    return page.build_page("agman demo: attribute search and copy checks", summary=facts, searches=searches,
                           copy_checks=copies, tables=[per_attribute, confusion, timing], notes=notes)
