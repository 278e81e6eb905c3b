"""The Embedder: images in, per-attribute vectors and copy descriptors out, in batches.

It loads its model lazily (once, thread-safe, never at import or before a worker forks), picks
CUDA when present and CPU otherwise, computes in bfloat16 where the hardware does natively
(:func:`~agman_milvus.core.runtime.inference_autocast`), and hides preprocessing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from agman_milvus.core.config import Precision
from agman_milvus.core.errors import AgmanError
from agman_milvus.core.model import AttributeEmbeddingModel, load_checkpoint, model_version
from agman_milvus.core.runtime import inference_autocast, prepare_for_inference, resolve_device, uses_bfloat16
from agman_milvus.core.schema import AttributeSchema

logger = logging.getLogger(__name__)


def compile_encode(model: AttributeEmbeddingModel, device: torch.device) -> Callable:
    """``torch.compile`` of ``model.encode`` (with weight freezing on CPU, where it pays off)."""
    if device.type == "cpu":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    return torch.compile(model.encode, dynamic=False)


class NoModelConfiguredError(AgmanError, RuntimeError):
    """No checkpoint was configured for the embedder."""


@dataclass
class EncodedBatch:
    """Per-image outputs of one pass: ``embeddings`` [N, K, D] and ``descriptors`` [N, Dc]."""

    embeddings: np.ndarray
    descriptors: np.ndarray


class Embedder:
    """Batched inference around an :class:`AttributeEmbeddingModel`."""

    def __init__(
        self,
        model: AttributeEmbeddingModel | None = None,
        *,
        checkpoint: str | Path | None = None,
        device: str = "auto",
        batch_size: int = 32,
        compile: bool = False,
        precision: Precision = "auto",
    ) -> None:
        if model is None and checkpoint is None:
            raise NoModelConfiguredError(
                "no model: pass a model or a checkpoint (set AGMAN_CHECKPOINT, or run `agman demo` "
                "to build the demo model)"
            )
        self._model = model
        self._checkpoint = Path(checkpoint) if checkpoint is not None and model is None else None
        self._device_name = device
        self.batch_size = batch_size
        self.compile = compile
        self.precision = precision
        self._lock = threading.Lock()
        self._device: torch.device | None = None
        self._encode_fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def load(self) -> AttributeEmbeddingModel:
        """Load (once) and return the model, ready for inference on the chosen device."""
        with self._lock:
            if self._device is None:
                device = resolve_device(self._device_name)
                model = self._model if self._model is not None else load_checkpoint(self._checkpoint)
                model_version(model)
                self._model = prepare_for_inference(model, device)
                self._encode_fn = compile_encode(self._model, device) if self.compile else self._model.encode
                self._device = device
                logger.info("model %s loaded on %s (%s)", self._model.version, device,
                            "bfloat16" if uses_bfloat16(device, self.precision) else "float32")
        return self._model  # type: ignore[return-value]

    @property
    def checkpoint(self) -> Path | None:
        """The file the model loads from; None for a model given in memory."""
        return self._checkpoint

    @property
    def model(self) -> AttributeEmbeddingModel:
        return self.load()

    @property
    def schema(self) -> AttributeSchema:
        return self.model.schema

    @property
    def version(self) -> str:
        return model_version(self.model)

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @property
    def descriptor_dim(self) -> int:
        return self.model.descriptor_dim

    # -- inference ------------------------------------------------------------------------------
    # encode_tensor is the model pass that the embedding engine (agman_milvus.core.engine) runs
    # for ingest and reindex; encode and embed serve queries. Each splits its batch into chunks
    # of ``batch_size`` on the model's device in one place, _in_chunks.
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.model.preprocess.batch(list(images))

    def encode(self, images: Sequence[Image.Image]) -> EncodedBatch:
        """All attribute vectors and the copy descriptor for every image."""
        return self.encode_tensor(self.preprocess(images)) if images else self._empty()

    def encode_tensor(self, batch: torch.Tensor) -> EncodedBatch:
        """As :meth:`encode`, for an already preprocessed batch [N, 3, S, S]."""
        if batch.shape[0] == 0:
            return self._empty()
        self.load()
        embeddings, descriptors = self._in_chunks(batch, self._run_encode, pad=self.compile)
        return EncodedBatch(embeddings, descriptors)

    def _run_encode(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (possibly compiled) encode; falls back to eager if compilation fails here."""
        try:
            return self._encode_fn(chunk)  # type: ignore[misc]
        except Exception as exc:  # inductor needs a C++ compiler; never lose work over speed
            if self._encode_fn == self.model.encode:
                raise
            logger.warning("torch.compile failed (%s); using eager mode", exc)
            self._encode_fn = self.model.encode
            return self._encode_fn(chunk)

    def embed(self, images: Sequence[Image.Image], attribute: str | int) -> np.ndarray:
        """Unit vectors [N, D] for one attribute (a query)."""
        model = self.load()
        if not images:
            return np.zeros((0, model.embed_dim), np.float32)
        ids = model.schema.resolve(attribute)

        def embed(chunk: torch.Tensor) -> tuple[torch.Tensor]:
            return (model.embed(chunk, ids),)

        (vectors,) = self._in_chunks(self.preprocess(images), embed, pad=False)
        return vectors

    def _in_chunks(
        self, batch: torch.Tensor, run: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], *,
        pad: bool,
    ) -> list[np.ndarray]:
        """``run`` over ``batch`` (N > 0) in chunks of ``batch_size`` on the model's device, each
        output as float32 numpy unit vectors (along the last axis), concatenated: a bfloat16
        pass leaves norms up to 0.2% off 1, so every output is normalised again in float32. With
        ``pad`` a short last chunk is padded with zeros to ``batch_size`` (one static shape for a
        compiled model: no recompiles)."""
        parts = []
        for start in range(0, batch.shape[0], self.batch_size):
            chunk = batch[start : start + self.batch_size]
            size = chunk.shape[0]
            if pad and size < self.batch_size:
                chunk = torch.cat([chunk, chunk.new_zeros((self.batch_size - size, *chunk.shape[1:]))])
            chunk = chunk.to(self._device, memory_format=torch.channels_last)
            with torch.inference_mode(), inference_autocast(self._device, self.precision):
                outputs = run(chunk)
            parts.append([F.normalize(out[:size].float(), dim=-1).cpu().numpy() for out in outputs])
        return [np.concatenate(column) for column in zip(*parts, strict=True)]

    def _empty(self) -> EncodedBatch:
        model = self.load()
        return EncodedBatch(
            np.zeros((0, len(model.schema), model.embed_dim), np.float32),
            np.zeros((0, model.descriptor_dim), np.float32),
        )
