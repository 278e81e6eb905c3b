"""Triplet training loop for every registered model (AG-MAN and its baselines alike).

Recipe (spec §3): Adam(lr 1e-4, no weight decay), StepLR(step 3, gamma 0.9) stepped per epoch,
batches of B triplets run as three forward passes of B images (BatchNorm statistics per group,
as the reference does), triplets re-sampled every epoch, validation every epoch with the best
checkpoint kept. Ranking loss plus, for models with a classifier, the attribute-type BCE loss
weighted 1:1 (see :mod:`agman_milvus.training.losses`).

Where the reference is buggy we do the right thing: every random source is seeded (triplets of
epoch e come from ``default_rng([seed, e])``, flips from a torch Generator seeded the same way,
so a resumed run continues exactly); evaluation runs in eval mode under no_grad without
shuffling; undecodable images are skipped and counted instead of crashing the collate; the
sampler never hangs on empty pools; CPU training works.

With ``freeze_backbone`` the trunk is frozen in eval mode (BatchNorm statistics too); adding
``cache_features`` computes its maps once per image (and mirror) and reads them back each step,
which is the same model, much faster (:mod:`agman_milvus.training.feature_cache`).

Files in ``output_dir``: ``best.safetensors`` (best validation score), ``last.safetensors`` +
``last.optim.safetensors`` + ``last.state.json`` (resume), ``metrics.jsonl`` (one line per
epoch; epoch 0 = before training).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from agman_milvus.core.config import Precision
from agman_milvus.core.runtime import resolve_device
from agman_milvus.training.datasets import ImageTable, TrainTransform, TripletDataset, collate_skipping
from agman_milvus.training.evaluate import autocast, evaluate_map, evaluate_triplets
from agman_milvus.training.feature_cache import FeatureCache, cached_map, cached_trunk
from agman_milvus.training.losses import triplet_objective
from agman_milvus.training.readers import RetrievalSplit, Triplet
from agman_milvus.training.sampler import TripletSampler
from agman_milvus.training.state import load_training_state, save_training_state

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Every knob of a training run; the defaults are the paper's FashionAI recipe."""

    output_dir: Path
    epochs: int = 150
    triplets_per_epoch: int = 100_000
    batch_size: int = 16
    lr: float = 1e-4
    step_size: int = 3
    gamma: float = 0.9
    margin: float = 0.2
    cls_loss: bool = True
    freeze_backbone: bool = False
    cache_features: bool = False
    cache_path: Path | None = None
    seed: int = 1
    device: str = "auto"
    workers: int = 2
    eval_batch_size: int = 64
    threads: int | None = None
    #: What the feature cache and the training steps compute in
    #: (:func:`~agman_milvus.training.evaluate.computed_precision`).
    precision: Precision | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["output_dir"] = str(self.output_dir)
        data["cache_path"] = str(self.cache_path) if self.cache_path else None
        return data


@dataclass
class StepInfo:
    """What a progress callback sees after each optimisation step."""

    epoch: int
    step: int
    steps: int
    loss: float


@dataclass
class Callbacks:
    """Optional hooks for a progress display (the library itself never prints)."""

    on_step: Callable[[StepInfo], None] | None = None
    on_epoch_start: Callable[[int, int], None] | None = None
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None
    on_eval: Callable[[int], None] | None = None


@dataclass
class _Running:
    total: float = 0.0
    ranking: float = 0.0
    classification: float = 0.0
    sim_pos: float = 0.0
    sim_neg: float = 0.0
    steps: int = 0
    triplets: int = 0
    dropped: int = 0

    def mean(self, value: float) -> float:
        return value / self.steps if self.steps else float("nan")


class RunFiles:
    """The files a training run writes in ``output_dir``: the best and the last checkpoint and
    ``metrics.jsonl`` (one JSON line per epoch)."""

    output_dir: Path

    @property
    def best_path(self) -> Path:
        return self.output_dir / "best.safetensors"

    @property
    def last_path(self) -> Path:
        return self.output_dir / "last.safetensors"

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


class Trainer(RunFiles):
    """Trains ``model`` on triplets from ``sampler``; validates on ``valid`` each epoch."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainConfig,
        sampler: TripletSampler,
        table: ImageTable,
        *,
        valid: RetrievalSplit | None = None,
        valid_triplets: Sequence[Triplet] | None = None,
        valid_table: ImageTable | None = None,
        fixed_triplets: Sequence[Triplet] | None = None,
    ) -> None:
        if config.batch_size < 1 or config.triplets_per_epoch < 1 or config.epochs < 0:
            raise ValueError("batch size and triplets per epoch must be >= 1, epochs >= 0")
        if config.cache_features and not config.freeze_backbone:
            raise ValueError(
                "--cache-features needs --freeze-backbone (a training trunk changes its features)"
            )
        self.config = config
        self.device = resolve_device(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.model = model.to(self.device)
        self.sampler = sampler
        self.table = table
        self.valid = valid
        self.valid_triplets = list(valid_triplets) if valid_triplets is not None else None
        self.valid_table = valid_table or table
        self.fixed_triplets = list(fixed_triplets) if fixed_triplets is not None else None
        self.use_cls = bool(config.cls_loss and getattr(model, "has_classifier", False))
        if config.freeze_backbone:
            for parameter in self.model.trunk.parameters():
                parameter.requires_grad_(False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, config.step_size, config.gamma)
        self.output_dir = Path(config.output_dir)
        self.epoch = 0
        self.best: float | None = None
        self.cache: FeatureCache | None = None

    def resume(self, checkpoint: Path | None = None) -> int:
        """Restore model, optimizer, scheduler, epoch and best score from ``last.safetensors``."""
        from agman_milvus.core.model import load_checkpoint

        path = Path(checkpoint) if checkpoint else self.last_path
        stem = path.with_suffix("")
        restored = load_checkpoint(path)
        self.model.load_state_dict(restored.state_dict())
        info = load_training_state(stem, self.optimizer, self.scheduler)
        if info.get("model") != self.model.model_name:
            raise ValueError(f"{path} was trained as {info.get('model')!r}, not {self.model.model_name!r}")
        if bool(info.get("freeze_backbone")) != self.config.freeze_backbone:
            raise ValueError("resume with the same --freeze-backbone setting as the original run")
        self.epoch = int(info["epoch"])
        self.best = info.get("best")
        logger.info("resumed %s at epoch %d (best %s)", path, self.epoch, self.best)
        return self.epoch

    # -- loop ----------------------------------------------------------------------------------
    def fit(self, callbacks: Callbacks | None = None) -> list[dict[str, Any]]:
        """Train until ``config.epochs``; returns the per-epoch records (also in metrics.jsonl)."""
        from agman_milvus.core.model import save_checkpoint

        callbacks = callbacks or Callbacks()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        records: list[dict[str, Any]] = []
        torch.manual_seed(self.config.seed)
        if self.config.cache_features and self.cache is None:
            self.cache = self._build_cache(callbacks)
        if self.epoch == 0 and self._has_validation():
            record = {"epoch": 0, **self._validate(callbacks)}
            self.best = record["score"]
            save_checkpoint(self.model, self.best_path, extra={"epoch": 0, "score": self.best})
            self._log(record)
            records.append(record)
        while self.epoch < self.config.epochs:
            epoch = self.epoch + 1
            started = time.perf_counter()
            running = self._train_epoch(epoch, callbacks)
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            record: dict[str, Any] = {
                "epoch": epoch,
                "lr": lr,
                "loss": running.mean(running.total),
                "ranking_loss": running.mean(running.ranking),
                "cls_loss": running.mean(running.classification) if self.use_cls else None,
                "sim_pos": running.mean(running.sim_pos),
                "sim_neg": running.mean(running.sim_neg),
                "triplets": running.triplets,
                "dropped_triplets": running.dropped,
                "train_seconds": round(time.perf_counter() - started, 2),
            }
            self.epoch = epoch
            improved = True
            if self._has_validation():
                record.update(self._validate(callbacks))
                improved = self.best is None or record["score"] > self.best
            if improved:
                self.best = record.get("score", self.best)
                save_checkpoint(self.model, self.best_path, extra={"epoch": epoch, "score": self.best})
            record["best"] = self.best
            save_checkpoint(self.model, self.last_path, extra={"epoch": epoch})
            save_training_state(self.last_path.with_suffix(""), self.optimizer, self.scheduler, {
                "epoch": epoch, "best": self.best, "model": self.model.model_name,
                "freeze_backbone": self.config.freeze_backbone, "config": self.config.to_json(),
            })
            self._log(record)
            records.append(record)
            if callbacks.on_epoch_end:
                callbacks.on_epoch_end(record)
        return records

    def _has_validation(self) -> bool:
        return self.valid is not None or self.valid_triplets is not None

    def _validate(self, callbacks: Callbacks) -> dict[str, Any]:
        started = time.perf_counter()
        if self.valid is not None and self.cache is not None:
            out = cached_map(self.model, self.cache, self.valid,
                             batch_size=self.config.eval_batch_size).validation_record()
        elif self.valid is not None:
            out = evaluate_map(self.model, self.valid, self.valid_table,
                               batch_size=self.config.eval_batch_size,
                               workers=self.config.workers, progress=callbacks.on_eval).validation_record()
        else:
            acc = evaluate_triplets(self.model, self.valid_triplets or [], self.valid_table,
                                    batch_size=self.config.eval_batch_size, progress=callbacks.on_eval)
            out = {"score": acc, "valid_tr_accuracy": acc}
        out["eval_seconds"] = round(time.perf_counter() - started, 2)
        return out

    def _triplets(self, epoch: int) -> list[Triplet]:
        n = self.config.triplets_per_epoch
        if self.fixed_triplets is not None:  # Zappos: a fixed list drawn once (as CSN does)
            return self.fixed_triplets[:n]
        return self.sampler.sample(n, np.random.default_rng([self.config.seed, epoch]))

    def _train_epoch(self, epoch: int, callbacks: Callbacks) -> _Running:
        cfg = self.config
        triplets = self._triplets(epoch)
        if self.cache is not None:
            return self._train_epoch_cached(epoch, triplets, callbacks)
        # Per-epoch seeds (not one global stream), so a resumed run draws the same flips and
        # order as an uninterrupted one; workers are seeded from the loader's generator.
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        loader = DataLoader(
            TripletDataset(triplets, self.table, TrainTransform(self.model.preprocess)),
            batch_size=cfg.batch_size, shuffle=True, generator=generator,
            num_workers=cfg.workers, collate_fn=collate_skipping, drop_last=False,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )
        steps = math.ceil(len(triplets) / cfg.batch_size)
        if callbacks.on_epoch_start:
            callbacks.on_epoch_start(epoch, steps)
        self.model.train()
        if cfg.freeze_backbone:
            self.model.trunk.eval()  # frozen BatchNorm statistics too
        running = _Running()
        for step, (fields, dropped) in enumerate(loader, start=1):
            running.dropped += dropped
            if fields:
                self._step(fields, running)
            if callbacks.on_step:
                callbacks.on_step(StepInfo(epoch, step, steps, running.mean(running.total)))
        if running.dropped:
            logger.warning("epoch %d: dropped %d triplet(s) with undecodable images", epoch, running.dropped)
        return running

    # -- frozen backbone with cached trunk features ---------------------------------------------
    def _build_cache(self, callbacks: Callbacks) -> FeatureCache:
        model = self.model
        train_images = sorted({i for t in self.fixed_triplets for i in t[:3]}) \
            if self.fixed_triplets is not None else self.sampler.images
        valid_images = sorted({lab.image for lab in (self.valid.queries + self.valid.candidates)}) \
            if self.valid is not None else []
        meta = {
            "trunk": model.trunk.name, "trunk_sha256": _mid_high_digest(model.trunk),
            "image_size": model.image_size, "mean": list(model.mean), "std": list(model.std),
            "train": [str(self.table.path(i)) for i in train_images],
            "valid": [str(self.valid_table.path(i)) for i in valid_images],
        }
        if self.valid_table is not self.table and valid_images:
            raise ValueError("--cache-features needs train and valid images in one image table")
        return FeatureCache.load_or_build(
            self.config.cache_path, meta, model.trunk, self.table, train_images, valid_images,
            model.preprocess, batch_size=self.config.eval_batch_size, workers=self.config.workers,
            progress=callbacks.on_eval, precision=self.config.precision)

    def _train_epoch_cached(self, epoch: int, triplets: list[Triplet], callbacks: Callbacks) -> _Running:
        cache = self.cache
        assert cache is not None
        flips = np.random.default_rng([self.config.seed, epoch, 1]).random((len(triplets), 3)) < 0.5
        rows, dropped = [], 0
        for triplet, flip in zip(triplets, flips.tolist(), strict=True):
            row = [cache.row(image, f) for image, f in zip(triplet[:3], flip, strict=True)]
            if None in row:
                dropped += 1
            else:
                rows.append([*row, triplet.attribute])
        table = torch.tensor(rows, dtype=torch.long).reshape(-1, 4)
        batch = self.config.batch_size
        steps = math.ceil(len(table) / batch)
        if callbacks.on_epoch_start:
            callbacks.on_epoch_start(epoch, steps)
        running = _Running(dropped=dropped)
        with cached_trunk(self.model, cache):
            self.model.train()
            for step in range(steps):
                chunk = table[step * batch : (step + 1) * batch]
                self._step([chunk[:, 0], chunk[:, 1], chunk[:, 2], chunk[:, 3]], running)
                if callbacks.on_step:
                    callbacks.on_step(StepInfo(epoch, step + 1, steps, running.mean(running.total)))
        if dropped:
            logger.warning("epoch %d: dropped %d triplet(s) with undecodable images", epoch, dropped)
        return running

    def _step(self, fields: list[torch.Tensor], running: _Running) -> None:
        anchor, negative, positive, attributes = (f.to(self.device, non_blocking=True) for f in fields)
        with autocast(self.device, self.config.precision):
            # Three separate passes, as the reference: BN statistics per group of B images.
            if self.use_cls:
                outputs = [self.model(x, attributes) for x in (anchor, negative, positive)]
                embeddings = [o.embeddings for o in outputs]
                logits = [o.logits for o in outputs]
            else:  # no classification loss: skip the classifier branch (same embeddings)
                embeddings = [self.model.embed(x, attributes) for x in (anchor, negative, positive)]
                logits = None
        parts = triplet_objective(*embeddings, attributes, logits, margin=self.config.margin)
        self.optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        self.optimizer.step()
        running.steps += 1
        running.triplets += anchor.shape[0]
        running.total += float(parts.total.detach())
        running.ranking += parts.ranking
        running.classification += parts.classification or 0.0
        running.sim_pos += parts.sim_positive
        running.sim_neg += parts.sim_negative

    def _log(self, record: dict[str, Any]) -> None:
        self.append_metrics(record)
        logger.info("epoch %d: %s", record["epoch"],
                    ", ".join(f"{k}={v:.4g}" for k, v in record.items()
                              if isinstance(v, float) and k in ("loss", "valid_map", "score", "lr")))


def _mid_high_digest(trunk: torch.nn.Module) -> str:
    """Digest of the trunk weights the cache depends on (mid and high stages, not the top).

    Models without a classifier build their trunk without the top stage, so this lets AG-MAN,
    ASEN_v2 and global share one cache when their trunks agree.
    """
    from agman_milvus.core.model.backbones import build_trunk
    from agman_milvus.core.model.checkpoint import weights_digest

    keys = set(build_trunk(trunk.name, with_top=False).state_dict())
    return weights_digest({k: v for k, v in trunk.state_dict().items() if k in keys})
