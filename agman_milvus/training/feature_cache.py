"""Cached trunk features for frozen-backbone training (a CPU budget measure).

With ``--freeze-backbone`` the trunk runs in eval mode with fixed weights, so its mid- and
high-level maps of an image are a pure function of the image: computing them once and reading
them back is *exactly* the frozen-backbone model, only faster. Each training image is cached
twice (as is, and mirrored, so the random horizontal flip is kept); evaluation images once.
Everything after the trunk (AG-MAN's multi-level fusion, its layer4-style classification
branch, all heads) still runs and trains every step.

:class:`CachedTrunk` stands in for the trunk while a batch of *cache row indices* (LongTensor
[B]) is fed to the model in place of images: ``forward_levels(rows)`` returns the cached fine
(if any) and mid maps, ``forward_high`` the matching high maps, ``forward_top`` runs the real
(frozen) top stage.

The product recipe fine-tunes the high stage, so it caches the mid maps only (``mid_only``, in
float16 to halve the memory): ``forward_high`` then runs the real high stage on them. When it
also fine-tunes the mid level's last ``tail_blocks`` blocks, the cache holds the maps before
them and ``forward_mid`` runs those blocks on the cached rows. A trunk with a fine level
(``taps="late_fine"``) has its fine maps cached beside them (float16 too).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from agman_milvus.core.config import Precision
from agman_milvus.core.engine import Batch, Decoded, EmbeddingEngine, batched
from agman_milvus.core.model.backbones import Levels
from agman_milvus.training.datasets import ImageTable, decode_image
from agman_milvus.training.evaluate import autocast, computed_precision, evaluating
from agman_milvus.training.metrics import MAPResult, mean_average_precision
from agman_milvus.training.readers import Label, RetrievalSplit

logger = logging.getLogger(__name__)

#: (flipped, mid maps, high maps or None, fine maps or None) for each variant of a batch: as is
#: and, with flips, mirrored
TrunkMaps = list[tuple[bool, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]


class FeatureCache:
    """Rows of (mid, high) trunk maps (high None: mid only); ``row(image, flipped)`` -> row or None.

    With ``tail_blocks`` > 0 the "mid" rows are the maps before the mid level's last blocks;
    ``fine`` holds the fine level's maps of the same rows (None: the trunk has none).
    """

    def __init__(self, mid: torch.Tensor, high: torch.Tensor | None, keys: list[tuple[int, bool]],
                 meta: dict[str, object], tail_blocks: int = 0, fine: torch.Tensor | None = None) -> None:
        self.mid, self.high, self.fine, self.meta = mid, high, fine, meta
        self.tail_blocks = tail_blocks
        self.keys = keys
        self._rows = {key: i for i, key in enumerate(keys)}

    def __len__(self) -> int:
        return len(self.keys)

    def row(self, image: int, flipped: bool = False) -> int | None:
        return self._rows.get((image, flipped))

    def extend(self, other: FeatureCache) -> FeatureCache:
        """A cache holding both (rows of ``other`` that are new are appended)."""
        new = [i for i, key in enumerate(other.keys) if key not in self._rows]
        high = None if self.high is None or other.high is None else torch.cat([self.high, other.high[new]])
        fine = None if self.fine is None or other.fine is None else torch.cat([self.fine, other.fine[new]])
        return FeatureCache(torch.cat([self.mid, other.mid[new]]), high,
                            self.keys + [other.keys[i] for i in new], self.meta, self.tail_blocks, fine)

    @classmethod
    def build(
        cls,
        trunk: nn.Module,
        table: ImageTable,
        images: Sequence[int],
        preprocess: Callable,
        *,
        with_flips: bool,
        batch_size: int = 64,
        workers: int = 0,
        progress: Callable[[int], None] | None = None,
        mid_only: bool = False,
        tail_blocks: int = 0,
        precision: Precision | None = None,
    ) -> FeatureCache:
        """Run the (frozen, eval-mode) trunk once over ``images`` (and their mirrors), with
        ``workers`` threads decoding the next batch meanwhile, computing in ``precision``
        (:func:`~agman_milvus.training.evaluate.autocast`'s); ``mid_only`` keeps float16 mid maps
        (without the mid level's last ``tail_blocks`` blocks) and, if the trunk has a fine
        level, its maps; else both levels' in float32."""
        if tail_blocks and not mid_only:
            raise ValueError("a cache of high maps cannot leave mid-level blocks out")
        device = next(trunk.parameters()).device

        def decode(image: int) -> Decoded:
            return decode_image(table, image, preprocess)

        def trunk_maps(batch: torch.Tensor) -> TrunkMaps:
            variants = [(False, batch)] + ([(True, batch.flip(-1))] if with_flips else [])
            out = []
            with autocast(device, precision):
                for flipped, x in variants:
                    if mid_only:
                        fine, mid = trunk.forward_levels(x.to(device), tail_blocks)
                        fine = None if fine is None else fine.half().cpu()
                        out.append((flipped, mid.half().cpu(), None, fine))
                        continue
                    mid = trunk.forward_mid(x.to(device))
                    out.append((flipped, mid.float().cpu(), trunk.forward_high(mid).float().cpu(), None))
            return out

        mids, highs, fines, keys = [], [], [], []
        dropped = 0

        def collect(batch: Batch[int, Decoded], maps: TrunkMaps | None) -> None:
            nonlocal dropped
            dropped += len(batch.failures)
            for flipped, mid, high, fine in maps or []:
                mids.append(mid)
                if high is not None:
                    highs.append(high)
                if fine is not None:
                    fines.append(fine)
                keys.extend((image, flipped) for image in batch.ok_items)
            if progress is not None:
                progress(len(batch.items))

        engine = EmbeddingEngine(decode, trunk_maps, decode_workers=workers)
        with evaluating(trunk), torch.no_grad():
            engine.run(batched(sorted(set(images)), batch_size), collect)
        if not keys:
            raise ValueError("no image could be decoded for the feature cache")
        if dropped:
            logger.warning("feature cache: %d undecodable image(s) left out", dropped)
        return cls(torch.cat(mids), None if mid_only else torch.cat(highs), keys, {}, tail_blocks,
                   torch.cat(fines) if fines else None)

    @classmethod
    def load_or_build(
        cls,
        path: Path | None,
        meta: dict[str, object],
        trunk: nn.Module,
        table: ImageTable,
        train_images: Sequence[int],
        valid_images: Sequence[int],
        preprocess: Callable,
        *,
        on_build: Callable[[int], None] | None = None,
        precision: Precision | None = None,
        **build_options: Any,
    ) -> FeatureCache:
        """The cache at ``path`` if it matches ``meta`` and ``precision`` (what the trunk computes
        in, recorded beside ``meta``); else built (training images with their mirrors, validation
        images as they are; ``on_build(images)`` first) and saved there. ``meta["tail_blocks"]``
        (default 0) is the mid-level blocks the cache leaves out."""
        build_options["tail_blocks"] = int(meta.get("tail_blocks", 0))
        build_options["precision"] = precision
        meta = {**meta, "precision": computed_precision(next(trunk.parameters()).device, precision)}
        cache = cls.load(path, meta) if path else None
        if cache is not None:
            logger.info("feature cache: loaded %d rows from %s", len(cache), path)
            return cache
        if on_build is not None:
            on_build(len(train_images) + len(valid_images))
        started = time.perf_counter()
        cache = cls.build(trunk, table, train_images, preprocess, with_flips=True, **build_options)
        if valid_images:
            cache = cache.extend(cls.build(trunk, table, valid_images, preprocess, with_flips=False,
                                           **build_options))
        logger.info("feature cache: %d rows in %.0f s", len(cache), time.perf_counter() - started)
        if path:
            cache.save(path, meta)
        return cache

    def save(self, path: Path, meta: dict[str, object]) -> None:
        """Write to a safetensors file (``meta`` identifies trunk, size and image list)."""
        keys = torch.tensor([[image, int(flipped)] for image, flipped in self.keys], dtype=torch.long)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {"mid": self.mid.contiguous(), "keys": keys}
        if self.high is not None:
            tensors["high"] = self.high.contiguous()
        if self.fine is not None:
            tensors["fine"] = self.fine.contiguous()
        save_file(tensors, str(tmp),
                  metadata={"meta": json.dumps(meta, sort_keys=True)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, meta: dict[str, object]) -> FeatureCache | None:
        """The cache at ``path`` if it was built with the same ``meta``, or with a fine level
        beyond it (``taps`` "late_fine" for "late": its fine maps are left unread); else None."""
        if not path.exists():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            saved = json.loads((handle.metadata() or {}).get("meta", "{}"))
            wanted = json.loads(json.dumps(meta, sort_keys=True))
            fine_unread = saved.get("taps") == "late_fine" and {**saved, "taps": "late"} == wanted
            if saved != wanted and not fine_unread:
                logger.info("feature cache %s was built for another setup; rebuilding", path)
                return None
            names = [name for name in handle.keys() if not (fine_unread and name == "fine")]
            tensors = {name: handle.get_tensor(name) for name in names}
        keys = [(int(i), bool(f)) for i, f in tensors["keys"].tolist()]
        return cls(tensors["mid"], tensors.get("high"), keys, meta, int(meta.get("tail_blocks", 0)),
                   tensors.get("fine"))


class CachedTrunk(nn.Module):
    """A trunk whose ``forward_levels`` (and ``forward_mid``) take cache row indices instead of images."""

    def __init__(self, trunk: nn.Module, cache: FeatureCache) -> None:
        super().__init__()
        object.__setattr__(self, "real", trunk)  # not a submodule: parameters stay where they are
        self.cache = cache
        self._rows: torch.Tensor | None = None
        for name in ("name", "mid_channels", "high_channels", "top_channels", "has_top", "fine_channels"):
            object.__setattr__(self, name, getattr(trunk, name))

    def forward_levels(self, rows: torch.Tensor) -> Levels:
        self._rows = rows.detach().cpu()
        device = next(self.real.parameters()).device
        fine = None if self.cache.fine is None else self.cache.fine[self._rows].to(device).float()
        cached = self.cache.mid[self._rows].to(device).float()
        if not self.cache.tail_blocks:
            return fine, cached
        return fine, self.real.forward_mid_tail(cached, self.cache.tail_blocks)

    def forward_mid(self, rows: torch.Tensor) -> torch.Tensor:
        return self.forward_levels(rows)[1]

    def forward_high(self, mid: torch.Tensor) -> torch.Tensor:
        if self.cache.high is None:  # mid-only cache: the high stage runs (and may train)
            return self.real.forward_high(mid.float())
        if self._rows is None:
            raise RuntimeError("forward_high called before forward_mid")
        return self.cache.high[self._rows].to(mid.device)

    def forward_top(self, high: torch.Tensor) -> torch.Tensor:
        return self.real.forward_top(high)


@torch.no_grad()
def cached_map(
    model: nn.Module, cache: FeatureCache, split: RetrievalSplit, *, batch_size: int = 64
) -> MAPResult:
    """MAP of ``model`` on ``split`` from cached maps: each image embedded once for all attributes
    (the same network as embedding the images; images missing from the cache are left out)."""
    labels = [lab for lab in split.queries + split.candidates if cache.row(lab.image) is not None]
    images = sorted({lab.image for lab in labels})
    at = {image: i for i, image in enumerate(images)}
    rows = torch.tensor([cache.row(image) for image in images], dtype=torch.long)
    device = next(model.parameters()).device
    chunks = []
    with cached_trunk(model, cache), evaluating(model), autocast(device):
        for start in range(0, len(rows), batch_size):
            chunks.append(model.embed_all(rows[start : start + batch_size].to(device)).float().cpu())
    embedded = torch.cat(chunks).numpy()

    def arrays(part: list[Label]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        part = [lab for lab in part if lab.image in at]
        attributes = np.asarray([lab.attribute for lab in part])
        return embedded[[at[lab.image] for lab in part], attributes], attributes, \
            np.asarray([lab.value for lab in part])

    return mean_average_precision(*arrays(split.queries), *arrays(split.candidates),
                                  names=dict(enumerate(model.schema.names)))


@contextlib.contextmanager
def cached_trunk(model: nn.Module, cache: FeatureCache) -> Iterator[None]:
    """Temporarily swap ``model.trunk`` for a :class:`CachedTrunk` (restored on exit)."""
    real = model._modules["trunk"]
    real.eval()  # frozen: BatchNorm running statistics, exactly as when the cache was built
    model._modules["trunk"] = CachedTrunk(real, cache)
    try:
        yield
    finally:
        model._modules["trunk"] = real
