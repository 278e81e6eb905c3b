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

Files in ``output_dir``: ``best.safetensors`` (best validation score), ``last.safetensors`` +
``last.optim.safetensors`` + ``last.state.json`` (resume), ``metrics.jsonl`` (one line per
epoch; epoch 0 = before training).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from agman_milvus.data.datasets import ImageTable, TrainTransform, TripletDataset, collate_skipping
from agman_milvus.data.formats import RetrievalSplit, Triplet
from agman_milvus.data.sampler import TripletSampler
from agman_milvus.training.evaluate import autocast, evaluate_map, evaluate_triplets
from agman_milvus.training.losses import triplet_objective
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
    seed: int = 1
    device: str = "auto"
    workers: int = 2
    eval_batch_size: int = 64
    threads: int | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["output_dir"] = str(self.output_dir)
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


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return torch.device(name)


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
    extra: dict[str, float] = field(default_factory=dict)

    def mean(self, value: float) -> float:
        return value / self.steps if self.steps else float("nan")


class Trainer:
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

    # -- files ---------------------------------------------------------------------------------
    @property
    def best_path(self) -> Path:
        return self.output_dir / "best.safetensors"

    @property
    def last_path(self) -> Path:
        return self.output_dir / "last.safetensors"

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    def resume(self, checkpoint: Path | None = None) -> int:
        """Restore model, optimizer, scheduler, epoch and best score from ``last.safetensors``."""
        from agman_milvus.model import load_checkpoint

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
        from agman_milvus.model import save_checkpoint

        callbacks = callbacks or Callbacks()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        records: list[dict[str, Any]] = []
        torch.manual_seed(self.config.seed)
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
        if self.valid is not None:
            result = evaluate_map(self.model, self.valid, self.valid_table,
                                  batch_size=self.config.eval_batch_size,
                                  workers=self.config.workers, progress=callbacks.on_eval)
            out = {"score": result.overall, "valid_map": result.overall,
                   "valid_per_attribute": {k: v["map"] for k, v in result.to_json()["per_attribute"].items()}}
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

    def _step(self, fields: list[torch.Tensor], running: _Running) -> None:
        anchor, negative, positive, attributes = (f.to(self.device, non_blocking=True) for f in fields)
        with autocast(self.device):
            # Three separate passes, as the reference: BN statistics per group of B images.
            outputs = [self.model(x, attributes) for x in (anchor, negative, positive)]
        logits = [o.logits for o in outputs] if self.use_cls else None
        parts = triplet_objective(outputs[0].embeddings, outputs[1].embeddings, outputs[2].embeddings,
                                  attributes, logits, margin=self.config.margin)
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
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        logger.info("epoch %d: %s", record["epoch"],
                    ", ".join(f"{k}={v:.4g}" for k, v in record.items()
                              if isinstance(v, float) and k in ("loss", "valid_map", "score", "lr")))
