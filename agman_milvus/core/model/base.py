"""The interface every retrieval model implements, and the shared inference plumbing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from agman_milvus.core.model.backbones import Trunk
from agman_milvus.core.model.layers import GeM, l2_normalize
from agman_milvus.core.model.transforms import Preprocess
from agman_milvus.core.model.value_head import ValueHead
from agman_milvus.core.schema import AttributeSchema

AttributeIds = torch.Tensor | Sequence[int | str] | int | str


@dataclass
class ModelOutput:
    """Training-time output: unit embeddings [B, D] and attribute-type logits [B, A] (or None)."""

    embeddings: torch.Tensor
    logits: torch.Tensor | None


class AttributeEmbeddingModel(nn.Module):
    """Base class: one image -> one ``embed_dim`` unit vector per attribute of ``schema``.

    Subclasses implement :meth:`_features` (attribute-independent, run once per image),
    :meth:`_heads` (one attribute id per image) and :meth:`_all_heads` (all attributes at once).
    """

    model_name: str = ""
    has_classifier: bool = False
    #: whether the model reads the trunk's fine level (``taps="late_fine"``)
    uses_fine_level: bool = False

    def __init__(self, schema: AttributeSchema, trunk: Trunk, embed_dim: int, image_size: int = 224) -> None:
        super().__init__()
        if trunk.fine_channels and not self.uses_fine_level:
            raise ValueError(f"{self.model_name} reads no fine level: build it with taps 'late', not "
                             f"{trunk.taps!r}")
        self.schema = schema
        self.trunk = trunk
        self.embed_dim = embed_dim
        self.image_size = image_size
        self.mean, self.std = trunk.mean, trunk.std
        self.descriptor_pool = GeM(p=3.0)
        self.value_head: ValueHead | None = None
        self.version: str | None = None

    # -- what subclasses provide ---------------------------------------------------------------
    def _features(self, images: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """Return (head inputs, mid map, high map) for a batch of images."""
        raise NotImplementedError

    def _heads(self, inputs: tuple[torch.Tensor, ...], attribute_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _all_heads(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        raise NotImplementedError

    # -- public API --------------------------------------------------------------------------
    @property
    def backbone_name(self) -> str:
        return self.trunk.name

    @property
    def num_attributes(self) -> int:
        return len(self.schema)

    @property
    def descriptor_dim(self) -> int:
        """Copy descriptor size: the top map's channels when the trunk has its top stage."""
        if self.trunk.has_top:
            return self.trunk.top_channels
        return self.trunk.mid_channels + self.trunk.high_channels

    @property
    def preprocess(self) -> Preprocess:
        """PIL image -> normalised float tensor [3, S, S], the transform the model was built for."""
        return Preprocess(self.image_size, self.mean, self.std)

    def attribute_tensor(self, attribute_ids: AttributeIds, batch: int) -> torch.Tensor:
        """Attribute ids as a LongTensor [batch] from names, ids, or one name/id for all."""
        device = self._device()
        if isinstance(attribute_ids, torch.Tensor):
            ids = attribute_ids.to(device=device, dtype=torch.long).reshape(-1)
            if ids.numel() == 1 and batch != 1:
                ids = ids.expand(batch)
        elif isinstance(attribute_ids, (str, int)):
            ids = torch.full((batch,), self.schema.resolve(attribute_ids), dtype=torch.long, device=device)
        else:
            ids = torch.tensor([self.schema.resolve(a) for a in attribute_ids], dtype=torch.long,
                               device=device)
        if ids.numel() != batch:
            raise ValueError(f"got {ids.numel()} attribute ids for {batch} images")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_attributes):
            raise ValueError(f"attribute ids must lie in [0, {self.num_attributes})")
        return ids

    def forward(self, images: torch.Tensor, attribute_ids: AttributeIds) -> ModelOutput:
        """Training forward; models with a classifier override this to add its logits."""
        return ModelOutput(self.embed(images, attribute_ids), None)

    def attach_value_head(self, scale: float = 16.0, weight: float = 0.0) -> ValueHead:
        """Give the model per-attribute value proxies (see :mod:`.value_head`); returns the head."""
        counts = [attribute.num_values for attribute in self.schema.attributes]
        self.value_head = ValueHead(counts, self.embed_dim, scale=scale, weight=weight).to(self._device())
        return self.value_head

    def embed(self, images: torch.Tensor, attribute_ids: AttributeIds) -> torch.Tensor:
        """Retrieval vectors [B, D], one attribute per image (no classifier branch)."""
        inputs, _, _ = self._features(images)
        ids = self.attribute_tensor(attribute_ids, images.shape[0])
        embeddings = self._heads(inputs, ids)
        return embeddings if self.value_head is None else self.value_head(embeddings, ids)

    def head_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit embeddings [B, K, D] straight from the heads, before the value head (what the
        losses train)."""
        inputs, _, _ = self._features(images)
        return self._all_heads(inputs)

    def embed_all(self, images: torch.Tensor) -> torch.Tensor:
        """Retrieval vectors [B, K, D] for all K attributes from one backbone pass."""
        return self._retrieval(self.head_embeddings(images))

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embed_all [B, K, D], copy descriptor [B, Dc])`` from a single backbone pass."""
        inputs, mid, high = self._features(images)
        return self._retrieval(self._all_heads(inputs)), self._descriptor(mid, high)

    def _retrieval(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings if self.value_head is None else self.value_head(embeddings)

    def attention_map(self, images: torch.Tensor, attribute_ids: AttributeIds) -> torch.Tensor:
        """The attribute-guided spatial attention map [B, H, W] (sums to 1 per image)."""
        raise NotImplementedError(f"{self.model_name} has no attribute attention map")

    def _descriptor(self, mid: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """SSCD-style GeM(p=3) + L2 over the trunk's top map (computed from ``high``, i.e. the
        plain ImageNet path), or over [mid, high] for trunks without a top stage.

        bench/copydetect.py (docs/benchmarks.md, "Copy detection") measured the top map far
        better than [mid, high] on edited catalogue copies (mobilenet_v2: the 128-d [mid, high]
        GeM has too few channels to tell near-identical products apart).
        """
        if self.trunk.has_top:
            return l2_normalize(self.descriptor_pool(self.trunk.forward_top(high).float()))
        pooled = torch.cat([self.descriptor_pool(mid.float()), self.descriptor_pool(high.float())], dim=1)
        return l2_normalize(pooled)

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def config(self) -> dict[str, object]:
        """Everything needed to rebuild this model (stored in checkpoints)."""
        return {
            "model": self.model_name,
            "backbone": self.backbone_name,
            "taps": self.trunk.taps,
            "schema": self.schema.to_json(),
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "embed_dim": self.embed_dim,
            "descriptor_dim": self.descriptor_dim,
            "value_head": None if self.value_head is None else self.value_head.config(),
        }
