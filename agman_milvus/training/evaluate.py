"""Evaluate a model by the paper's protocols: ASFR MAP on a query/candidate split, TR accuracy.

Each evaluation image is embedded once, for its own attribute, in batches (``model.embed`` with
per-sample attribute ids), in eval mode under ``torch.no_grad`` (the reference forgot both).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from agman_milvus.training.datasets import ImageTable, LabeledImageDataset, collate_skipping, load_tensor
from agman_milvus.training.readers import Label, RetrievalSplit, Triplet
from agman_milvus.training.metrics import MAPResult, mean_average_precision, triplet_accuracy

logger = logging.getLogger(__name__)

Progress = Callable[[int], None]


def autocast(device: torch.device) -> torch.autocast | nullcontext:
    """bf16 autocast on CUDA, nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def embed_labels(
    model: torch.nn.Module,
    labels: Sequence[Label],
    table: ImageTable,
    *,
    batch_size: int = 64,
    workers: int = 0,
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Embed each labelled image for its attribute: (embeddings, attributes, values, dropped)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loader = DataLoader(
        LabeledImageDataset(labels, table, model.preprocess),
        batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_skipping,
        persistent_workers=False,
    )
    chunks, attrs, values = [], [], []
    dropped = 0
    try:
        for fields, skipped in loader:
            dropped += skipped
            if fields:
                images, attribute, value, _ = fields
                with autocast(device):
                    emb = model.embed(images.to(device, non_blocking=True), attribute.to(device))
                chunks.append(emb.float().cpu().numpy())
                attrs.append(attribute.numpy())
                values.append(value.numpy())
            if progress is not None:
                progress(skipped + (len(fields[0]) if fields else 0))
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError("no evaluation image could be decoded")
    return np.concatenate(chunks), np.concatenate(attrs), np.concatenate(values), dropped


def evaluate_map(
    model: torch.nn.Module,
    split: RetrievalSplit,
    table: ImageTable,
    *,
    batch_size: int = 64,
    workers: int = 0,
    progress: Progress | None = None,
) -> MAPResult:
    """Per-attribute and overall MAP (x100) of ``model`` on ``split``."""
    q = embed_labels(model, split.queries, table, batch_size=batch_size, workers=workers, progress=progress)
    c = embed_labels(model, split.candidates, table, batch_size=batch_size, workers=workers, progress=progress)
    if q[3] or c[3]:
        logger.warning("evaluation skipped %d undecodable image(s)", q[3] + c[3])
    names = dict(enumerate(model.schema.names))
    return mean_average_precision(q[0], q[1], q[2], c[0], c[1], c[2], names=names)


@torch.no_grad()
def evaluate_triplets(
    model: torch.nn.Module,
    triplets: Sequence[Triplet],
    table: ImageTable,
    *,
    batch_size: int = 64,
    progress: Progress | None = None,
) -> float:
    """TR accuracy (x100): s(anchor, positive) > s(anchor, negative), all with the condition."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    close, far = [], []
    try:
        for start in range(0, len(triplets), batch_size):
            batch = triplets[start : start + batch_size]
            loaded = [[load_tensor(table, i, model.preprocess) for i in t[:3]] for t in batch]
            keep = [(t, imgs) for t, imgs in zip(batch, loaded) if all(x is not None for x in imgs)]
            if keep:
                ids = torch.tensor([t.attribute for t, _ in keep], device=device)
                a, n, p = (torch.stack([imgs[k] for _, imgs in keep]).to(device) for k in range(3))
                with autocast(device):
                    ea, en, ep = model.embed(a, ids), model.embed(n, ids), model.embed(p, ids)
                close.append((ea.float() * ep.float()).sum(1).cpu().numpy())
                far.append((ea.float() * en.float()).sum(1).cpu().numpy())
            if progress is not None:
                progress(len(batch))
    finally:
        model.train(was_training)
    if not close:
        raise ValueError("no evaluation triplet could be decoded")
    return triplet_accuracy(np.concatenate(close), np.concatenate(far))
