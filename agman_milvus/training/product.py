"""The product training recipe (issue #12), the default of ``agman train``; any registered model.

Measured on held-out catalogue photos (docs/results.md), it beats a supervised linear probe where
the paper's triplet recipe (:mod:`agman_milvus.training.trainer`) stays far below it:

* the EfficientNet-Lite0 ImageNet trunk (:data:`PRODUCT_BACKBONE`; AG-MAN on MobileNetV2
  scored 0.6 MAP lower, mean of two seeds each, docs/results.md) at 224 px;
* tap points one stage up (``taps="late"``, see :mod:`agman_milvus.core.model.backbones`; for
  AG-MAN on Lite0 ``late_fine``, whose multi-level fusion also adds the stride-8 stage's map:
  :func:`product_taps`): the mid level is frozen and its maps (and the stride-8 maps) cached
  once per image and mirror (float16), the high level is fine-tuned on top of them with its
  BatchNorm statistics frozen (eval mode); so are the mid
  level's last ``tuned_mid_blocks`` blocks, whose input maps the cache then holds
  (:func:`tuned_mid_blocks`: Lite0's last 3, its 112-channel stage; docs/results.md "Seventh
  run": +2.2 ``baseColour``, +0.5 overall over two seeds; the served network is the same);
* no attribute-type branch (the trunk has no top stage);
* per attribute, a normalised-softmax proxy classification of the attribute *value* on the unit
  embedding (``scale · cos``, label smoothing) plus random in-batch triplets (margin 0.2); the
  value proxies live in the model's value head (:mod:`agman_milvus.core.model.value_head`), which
  at inference blends each embedding with its value posterior (``value_weight`` 0.7, chosen on
  the validation split: +1.6 validation MAP over the raw embedding, docs/results.md);
* each step embeds a batch of images for *all* attributes (one trunk pass), epochs go over every
  training image once; AdamW (head lr 1e-3, high stage lr 3e-4, weight decay 1e-4), linear
  warm-up for half an epoch then cosine decay, per step.

Files in ``output_dir``: ``best.safetensors`` (best validation MAP, or the last epoch without a
validation split), ``last.safetensors`` and ``metrics.jsonl`` (one line per epoch).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agman_milvus.core.config import Precision
from agman_milvus.core.runtime import resolve_device
from agman_milvus.training.datasets import ImageTable
from agman_milvus.training.evaluate import autocast
from agman_milvus.training.feature_cache import FeatureCache, cached_map, cached_trunk
from agman_milvus.training.losses import in_batch_triplet_loss
from agman_milvus.training.metrics import MAPResult
from agman_milvus.training.readers import Label, RetrievalSplit
from agman_milvus.training.trainer import Callbacks, RunFiles, StepInfo

logger = logging.getLogger(__name__)

RECIPE = "product"
#: The trunk ``agman train`` uses with this recipe unless told otherwise.
PRODUCT_BACKBONE = "efficientnet_lite0"
#: Mid-level blocks fine-tuned by default, per trunk (measured on Lite0 only; others: none).
_TUNED_MID_BLOCKS = {"efficientnet_lite0": 3}
#: Tap points by default, per (model, trunk); others ``late``: AG-MAN's fusion reads the stride-8
#: level too on Lite0 (measured there only: +0.3 MAP over five bfloat16 seeds, ``baseColour`` +1.1,
#: docs/results.md "Twelfth run"; level in float32 over two, ``baseColour`` +3.2, "Thirteenth run").
_PRODUCT_TAPS = {("agman", "efficientnet_lite0"): "late_fine"}


def product_taps(model: str, backbone: str) -> str:
    """The tap points the recipe builds ``model``'s ``backbone`` trunk with by default."""
    return _PRODUCT_TAPS.get((model, backbone), "late")


def tuned_mid_blocks(backbone: str) -> int:
    """How many of the mid level's last blocks the recipe fine-tunes on ``backbone`` by default."""
    return _TUNED_MID_BLOCKS.get(backbone, 0)


@dataclass
class ProductConfig:
    """Every knob of the product recipe; the defaults are the measured recipe."""

    output_dir: Path
    epochs: int = 6
    batch_size: int = 64
    lr: float = 1e-3
    high_lr: float = 3e-4
    tuned_mid_blocks: int = 0
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    proxy_scale: float = 16.0
    value_weight: float = 0.7
    label_smoothing: float = 0.1
    margin: float = 0.2
    cache_path: Path | None = None
    seed: int = 1
    device: str = "auto"
    workers: int = 2
    eval_batch_size: int = 64
    threads: int | None = None
    #: What the feature cache and the training steps compute in
    #: (:func:`~agman_milvus.training.evaluate.computed_precision`): by default bfloat16 on CUDA
    #: and float32 on CPU; "auto" or "bfloat16" also bfloat16 on a CPU that computes it natively
    #: (docs/results.md, "bfloat16 training on CPU").
    precision: Precision | None = None

    def recipe_json(self) -> dict[str, Any]:
        """The fields that change the trained weights (not where files go, on what or how)."""
        runtime = ("output_dir", "cache_path", "device", "workers", "eval_batch_size", "threads", "precision")
        return {k: v for k, v in asdict(self).items() if k not in runtime}

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["output_dir"] = str(self.output_dir)
        data["cache_path"] = str(self.cache_path) if self.cache_path else None
        return {"recipe": RECIPE, **data}


class ProductTrainer(RunFiles):
    """Trains ``model`` on ``labels`` (images of ``table``); validates on ``valid`` each epoch."""

    def __init__(self, model: nn.Module, config: ProductConfig, labels: list[Label], table: ImageTable,
                 *, valid: RetrievalSplit | None = None) -> None:
        if config.batch_size < 2 or config.epochs < 0:
            raise ValueError("the product recipe needs batches of >= 2 images and epochs >= 0")
        if not labels:
            raise ValueError("no training labels")
        self.config = config
        self.device = resolve_device(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.model = model.to(self.device)
        self.table = table
        self.valid = valid
        self.output_dir = Path(config.output_dir)
        self.images = sorted({label.image for label in labels})
        index = {image: i for i, image in enumerate(self.images)}
        k = model.num_attributes
        self.values = torch.full((len(self.images), k), -1, dtype=torch.long)
        for label in labels:
            self.values[index[label.image], label.attribute] = label.value
        torch.manual_seed(config.seed)
        model.attach_value_head(scale=config.proxy_scale, weight=config.value_weight)
        model.trunk.requires_grad_(False)
        tuned = [model.trunk.high_stage(), model.trunk.mid_tail(config.tuned_mid_blocks)]
        trunk_params = [p for part in tuned for p in part.requires_grad_(True).parameters()]
        head_params = [p for name, p in model.named_parameters() if not name.startswith("trunk.")]
        self.optimizer = torch.optim.AdamW(
            [{"params": head_params, "lr": config.lr},
             {"params": trunk_params, "lr": config.high_lr}],
            weight_decay=config.weight_decay)
        self.best: float | None = None
        self.cache: FeatureCache | None = None

    def fit(self, callbacks: Callbacks | None = None) -> list[dict[str, Any]]:
        """Train for ``config.epochs``; returns the per-epoch records (also in metrics.jsonl)."""
        from agman_milvus.core.model import save_checkpoint

        callbacks = callbacks or Callbacks()
        cfg = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path.unlink(missing_ok=True)
        started = time.perf_counter()
        self.cache = self.cache or self._build_cache(callbacks)
        cache_seconds = round(time.perf_counter() - started, 2)
        steps_per_epoch = math.ceil(len(self.images) / cfg.batch_size)
        total = max(1, steps_per_epoch * cfg.epochs)
        warmup = max(1, round(cfg.warmup_epochs * steps_per_epoch))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        records: list[dict[str, Any]] = []
        for epoch in range(1, cfg.epochs + 1):
            started = time.perf_counter()
            loss = self._train_epoch(epoch, scheduler, callbacks)
            record: dict[str, Any] = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"],
                                      "loss": loss, "train_seconds": round(time.perf_counter() - started, 2)}
            if epoch == 1:
                record["cache_seconds"] = cache_seconds
            improved = True
            if self.valid is not None:
                started = time.perf_counter()
                result = self.validate()
                record.update(
                    result.validation_record(), eval_seconds=round(time.perf_counter() - started, 2)
                )
                improved = self.best is None or result.overall > self.best
            if improved:
                self.best = record.get("score", self.best)
                save_checkpoint(self.model, self.best_path,
                                extra={"epoch": epoch, "score": self.best, "recipe": RECIPE})
            record["best"] = self.best
            save_checkpoint(self.model, self.last_path, extra={"epoch": epoch, "recipe": RECIPE})
            self.append_metrics(record)
            logger.info("epoch %d: loss %.4f, valid MAP %s", epoch, loss, record.get("valid_map"))
            records.append(record)
            if callbacks.on_epoch_end:
                callbacks.on_epoch_end(record)
        return records

    def _build_cache(self, callbacks: Callbacks) -> FeatureCache:
        from agman_milvus.core.model.checkpoint import weights_digest

        model = self.model
        valid_images = sorted({lab.image for lab in self.valid.queries + self.valid.candidates}) \
            if self.valid is not None else []
        meta = {
            "levels": "mid", "trunk": model.trunk.name, "taps": model.trunk.taps,
            "tail_blocks": self.config.tuned_mid_blocks,
            "trunk_sha256": weights_digest(model.trunk.state_dict()),
            "image_size": model.image_size, "mean": list(model.mean), "std": list(model.std),
            "train": [str(self.table.path(i)) for i in self.images],
            "valid": [str(self.table.path(i)) for i in valid_images],
        }
        return FeatureCache.load_or_build(
            self.config.cache_path, meta, model.trunk, self.table, self.images, valid_images,
            model.preprocess, batch_size=self.config.eval_batch_size, workers=self.config.workers,
            progress=callbacks.on_eval, mid_only=True, precision=self.config.precision,
            on_build=(lambda n: callbacks.on_epoch_start(0, n)) if callbacks.on_epoch_start else None)

    def _train_epoch(self, epoch: int, scheduler, callbacks: Callbacks) -> float:
        cfg = self.config
        cache = self.cache
        assert cache is not None
        rng = np.random.default_rng([cfg.seed, epoch])
        order = rng.permutation(len(self.images))
        flips = rng.random(len(order)) < 0.5
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        pairs = zip(order.tolist(), flips.tolist(), strict=True)
        rows = [cache.row(self.images[i], bool(f)) for i, f in pairs]
        kept = [(i, r) for i, r in zip(order.tolist(), rows, strict=True) if r is not None]
        steps = math.ceil(len(kept) / cfg.batch_size)
        if callbacks.on_epoch_start:
            callbacks.on_epoch_start(epoch, steps)
        total = 0.0
        with cached_trunk(self.model, cache):
            self.model.train()
            for step in range(steps):
                chunk = kept[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                batch = torch.tensor([r for _, r in chunk], dtype=torch.long)
                values = self.values[[i for i, _ in chunk]].to(self.device)
                loss = self._loss(batch, values, generator)
                if loss is not None:
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    total += float(loss.detach())
                scheduler.step()
                if callbacks.on_step:
                    callbacks.on_step(StepInfo(epoch, step + 1, steps, total / (step + 1)))
        self.model.eval()
        return total / max(1, steps)

    def _loss(self, rows: torch.Tensor, values: torch.Tensor,
              generator: torch.Generator) -> torch.Tensor | None:
        """Mean over the batch's labelled attributes of proxy loss + in-batch triplet loss."""
        with autocast(self.device, self.config.precision):
            embeddings = self.model.head_embeddings(rows.to(self.device))  # [B, K, D]
        parts = []
        for attribute in range(values.shape[1]):
            labelled = values[:, attribute] >= 0
            if int(labelled.sum()) < 2:
                continue
            emb, val = embeddings[labelled, attribute].float(), values[labelled, attribute]
            loss = F.cross_entropy(self.model.value_head.logits(emb, attribute), val,
                                   label_smoothing=self.config.label_smoothing)
            triplet = in_batch_triplet_loss(emb, val, self.config.margin, generator)
            parts.append(loss if triplet is None else loss + triplet)
        return torch.stack(parts).mean() if parts else None

    def validate(self) -> MAPResult:
        """Validation MAP from the cached mid maps (the same network as embedding images)."""
        assert self.cache is not None and self.valid is not None
        return cached_map(self.model, self.cache, self.valid, batch_size=self.config.eval_batch_size)
