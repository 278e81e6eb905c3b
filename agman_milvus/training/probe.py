"""The supervised linear probe the product recipe is measured against (issue #12).

A frozen ImageNet trunk, global-average pooled (1,280-d for MobileNetV2), and one linear
classifier per attribute trained with cross-entropy on the training labels. An image's embedding
for an attribute is the vector of that classifier's class probabilities (zero-padded to the
largest value count, L2-normalised), so retrieval ranks candidates by how alike their predicted
value distributions are.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from agman_milvus.core.engine import Batch, Decoded, EmbeddingEngine, batched
from agman_milvus.core.schema import AttributeSchema
from agman_milvus.training.datasets import ImageTable, decode_image
from agman_milvus.training.floor import PooledImageNetFeatures
from agman_milvus.training.readers import Label

logger = logging.getLogger(__name__)


class LinearProbe(PooledImageNetFeatures):
    """``fit`` on labelled images, then ``embed(images, ids)`` like any retrieval model: the
    floor's frozen pooled features, one linear classifier per attribute on top."""

    model_name = "linear_probe"

    def __init__(self, schema: AttributeSchema, backbone: str = "mobilenet_v2", image_size: int = 224,
                 pretrained: str | None = "imagenet") -> None:
        super().__init__(schema, backbone, image_size, pretrained)
        counts = [max(1, attribute.num_values) for attribute in schema.attributes]
        self.width = max(counts)
        self.classifiers = nn.ModuleList(nn.Linear(self.trunk.top_channels, n) for n in counts)
        self.eval()

    def embed(self, images: torch.Tensor, attribute_ids: torch.Tensor) -> torch.Tensor:
        features = self.features(images)
        ids = attribute_ids.reshape(-1).to(features.device)
        ids = ids.expand(len(features)) if ids.numel() == 1 else ids
        out = torch.zeros(len(features), self.width, device=features.device)
        for attribute in ids.unique().tolist():
            rows = ids == attribute
            probabilities = self.classifiers[attribute](features[rows]).softmax(dim=1)
            out[rows, : probabilities.shape[1]] = probabilities
        return F.normalize(out, dim=1)

    @torch.no_grad()
    def pooled(self, table: ImageTable, images: Sequence[int], *, batch_size: int = 64,
               workers: int = 2) -> tuple[list[int], torch.Tensor]:
        """(decodable images, their pooled features) in one trunk pass each."""
        kept: list[int] = []
        chunks: list[torch.Tensor] = []

        def collect(batch: Batch[int, Decoded], features: torch.Tensor | None) -> None:
            if features is not None:
                kept.extend(batch.ok_items)
                chunks.append(features)

        engine = EmbeddingEngine(lambda image: decode_image(table, image, self.preprocess),
                                 lambda x: self.features(x).cpu(), decode_workers=workers)
        engine.run(batched(sorted(set(images)), batch_size), collect)
        if not chunks:
            raise ValueError("no training image could be decoded for the linear probe")
        return kept, torch.cat(chunks)

    def fit(self, labels: Sequence[Label], table: ImageTable, *, iterations: int = 200,
            weight_decay: float = 1e-4, batch_size: int = 64, workers: int = 2) -> None:
        """Cross-entropy per attribute on the frozen pooled features (full-batch L-BFGS)."""
        images, features = self.pooled(table, [label.image for label in labels],
                                       batch_size=batch_size, workers=workers)
        row = {image: i for i, image in enumerate(images)}
        for attribute, classifier in enumerate(self.classifiers):
            mine = [lab for lab in labels if lab.attribute == attribute and lab.image in row]
            if not mine:
                continue
            x = features[[row[lab.image] for lab in mine]]
            y = torch.tensor([lab.value for lab in mine], dtype=torch.long)
            _fit_linear(classifier, x, y, iterations, weight_decay)
            with torch.no_grad():
                logits = classifier(x)
            logger.info("linear probe %s: loss %.4f, train accuracy %.3f", self.schema.names[attribute],
                        float(F.cross_entropy(logits, y)), float((logits.argmax(dim=1) == y).float().mean()))
        self.eval()


def _fit_linear(classifier: nn.Linear, x: torch.Tensor, y: torch.Tensor, iterations: int,
                weight_decay: float) -> None:
    """Full-batch L-BFGS on cross-entropy plus ``weight_decay · ||W||²``."""
    optimizer = torch.optim.LBFGS(classifier.parameters(), lr=1.0, max_iter=iterations,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(classifier(x), y) + weight_decay * classifier.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)


def train_linear_probe(schema: AttributeSchema, labels: Sequence[Label], table: ImageTable, *,
                       backbone: str = "mobilenet_v2", image_size: int = 224,
                       workers: int = 2) -> LinearProbe:
    """A :class:`LinearProbe` fitted on ``labels``."""
    probe = LinearProbe(schema, backbone, image_size)
    probe.fit(labels, table, workers=workers)
    return probe

