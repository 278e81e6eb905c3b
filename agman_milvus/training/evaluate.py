"""Evaluate a model by the paper's protocols: ASFR MAP on a query/candidate split, TR accuracy.

Each evaluation image is embedded once, for its own attribute, in batches (``model.embed`` with
per-sample attribute ids), in eval mode under ``torch.no_grad`` (the reference forgot both).
Batches run on the embedding engine (:mod:`agman_milvus.core.engine`): ``workers`` threads
decode the next batch while the model runs the current one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager

import numpy as np
import torch

from agman_milvus.core.config import Precision
from agman_milvus.core.engine import Batch, Decoded, EmbeddingEngine, batched
from agman_milvus.core.runtime import inference_autocast, uses_bfloat16
from agman_milvus.training.datasets import ImageTable, decode_image
from agman_milvus.training.metrics import MAPResult, mean_average_precision, triplet_accuracy
from agman_milvus.training.readers import Label, RetrievalSplit, Triplet

logger = logging.getLogger(__name__)

Progress = Callable[[int], None]


def computed_precision(device: torch.device, precision: Precision | None = None) -> Precision:
    """What evaluation on ``device`` computes in for ``precision``: "bfloat16" or "float32"
    (:func:`~agman_milvus.core.runtime.uses_bfloat16`). By default bfloat16 on CUDA and float32
    on CPU: training and evaluation stay float32 there, where the service may compute in
    bfloat16 (``precision`` "auto" evaluates as it would)."""
    if precision is None:
        precision = "auto" if device.type == "cuda" else "float32"
    return "bfloat16" if uses_bfloat16(device, precision) else "float32"


def autocast(device: torch.device, precision: Precision | None = None) -> AbstractContextManager:
    """Autocast for what ``precision`` computes in on ``device`` (:func:`computed_precision`)."""
    return inference_autocast(device, computed_precision(device, precision))


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode; its previous mode is restored on exit."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def embed_labels(
    model: torch.nn.Module,
    labels: Sequence[Label],
    table: ImageTable,
    *,
    batch_size: int = 64,
    workers: int = 2,
    progress: Progress | None = None,
    precision: Precision | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Embed each labelled image for its attribute: (embeddings, attributes, values, dropped);
    ``precision``: :func:`autocast`'s."""
    device = next(model.parameters()).device

    def decode(label: Label) -> Decoded:
        decoded = decode_image(table, label.image, model.preprocess)
        if decoded.ok:
            decoded.inputs = (decoded.inputs, torch.tensor(label.attribute))  # type: ignore[assignment]
        return decoded

    def embed(inputs: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
        images, attribute = inputs
        with autocast(device, precision):
            emb = model.embed(images.to(device, non_blocking=True), attribute.to(device))
        return emb.float().cpu().numpy()

    chunks, attrs, values = [], [], []
    dropped = 0

    def collect(batch: Batch[Label, Decoded], embeddings: np.ndarray | None) -> None:
        nonlocal dropped
        dropped += len(batch.failures)
        if embeddings is not None:
            chunks.append(embeddings)
            attrs.append(np.asarray([label.attribute for label in batch.ok_items]))
            values.append(np.asarray([label.value for label in batch.ok_items]))
        if progress is not None:
            progress(len(batch.items))

    with evaluating(model):
        engine = EmbeddingEngine(decode, embed, decode_workers=workers)
        engine.run(batched(labels, batch_size), collect)
    if not chunks:
        raise ValueError("no evaluation image could be decoded")
    return np.concatenate(chunks), np.concatenate(attrs), np.concatenate(values), dropped


def evaluate_map(
    model: torch.nn.Module,
    split: RetrievalSplit,
    table: ImageTable,
    *,
    batch_size: int = 64,
    workers: int = 2,
    progress: Progress | None = None,
    precision: Precision | None = None,
) -> MAPResult:
    """Per-attribute and overall MAP (x100) of ``model`` on ``split`` (``precision``:
    :func:`autocast`'s)."""
    q, c = (embed_labels(model, labels, table, batch_size=batch_size, workers=workers, progress=progress,
                         precision=precision) for labels in (split.queries, split.candidates))
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
    workers: int = 2,
    progress: Progress | None = None,
    precision: Precision | None = None,
) -> float:
    """TR accuracy (x100): s(anchor, positive) > s(anchor, negative), all with the condition
    (``precision``: :func:`autocast`'s)."""
    device = next(model.parameters()).device

    def decode(triplet: Triplet) -> Decoded:
        images = []
        for image in triplet[:3]:
            decoded = decode_image(table, image, model.preprocess)
            if not decoded.ok:
                return decoded  # the triplet is dropped whole
            images.append(decoded.inputs)
        return Decoded((*images, torch.tensor(triplet.attribute)))

    def similarities(inputs: tuple[torch.Tensor, ...]) -> tuple[np.ndarray, np.ndarray]:
        ids = inputs[3].to(device)
        a, n, p = (x.to(device) for x in inputs[:3])
        with autocast(device, precision):
            ea, en, ep = model.embed(a, ids), model.embed(n, ids), model.embed(p, ids)
        positive = (ea.float() * ep.float()).sum(1)
        negative = (ea.float() * en.float()).sum(1)
        return positive.cpu().numpy(), negative.cpu().numpy()

    close, far = [], []

    def collect(batch: Batch[Triplet, Decoded], scores: tuple[np.ndarray, np.ndarray] | None) -> None:
        if scores is not None:
            close.append(scores[0])
            far.append(scores[1])
        if progress is not None:
            progress(len(batch.items))

    with evaluating(model):
        engine = EmbeddingEngine(decode, similarities, decode_workers=workers)
        engine.run(batched(triplets, batch_size), collect)
    if not close:
        raise ValueError("no evaluation triplet could be decoded")
    return triplet_accuracy(np.concatenate(close), np.concatenate(far))
