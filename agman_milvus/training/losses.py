"""AG-MAN training losses (spec §2).

* Ranking loss on cosine similarity: ``mean(max(0, margin + s(a, neg) - s(a, pos)))``, margin 0.2
  (``MarginRankingLoss(sim_neg, sim_pos, target=-1)`` in the reference).
* Attribute-type classification loss: ``BCEWithLogits(logits, one_hot(attribute))`` on each of
  the three images of the triplet, averaged. It predicts *which attribute* the triplet is about.
* Combined 1:1: ``L = L_rank + L_cls``. The reference wraps both in ``AutomaticWeightedLoss``
  whose parameters are never given to the optimizer, so its weights stay fixed at 1:1 (times a
  constant). Optimising them would be wrong: d/dp (0.5·e^p·L + p) > 0 always, so p -> -inf and
  both losses would vanish. We therefore use fixed, equal weights and no learnable weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def ranking_loss(sim_negative: torch.Tensor, sim_positive: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Mean hinge ``max(0, margin + s(a, neg) - s(a, pos))``."""
    return F.relu(margin + sim_negative - sim_positive).mean()


def attribute_type_loss(logits: list[torch.Tensor], attributes: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits against one-hot(attribute), averaged over the triplet's images."""
    target = F.one_hot(attributes, num_classes=logits[0].shape[1]).to(logits[0].dtype)
    return torch.stack([F.binary_cross_entropy_with_logits(x.float(), target.float()) for x in logits]).mean()


@dataclass
class LossParts:
    """The total loss and its detached parts (for logging)."""

    total: torch.Tensor
    ranking: float
    classification: float | None
    sim_positive: float
    sim_negative: float


def triplet_objective(
    anchor: torch.Tensor,
    negative: torch.Tensor,
    positive: torch.Tensor,
    attributes: torch.Tensor,
    logits: list[torch.Tensor] | None,
    margin: float = 0.2,
    cls_weight: float = 1.0,
) -> LossParts:
    """Ranking loss on unit embeddings plus (when ``logits`` is given) the classification loss."""
    sim_neg = (anchor.float() * negative.float()).sum(dim=1)
    sim_pos = (anchor.float() * positive.float()).sum(dim=1)
    rank = ranking_loss(sim_neg, sim_pos, margin)
    total = rank
    cls_value = None
    if logits is not None:
        cls = attribute_type_loss(logits, attributes)
        total = rank + cls_weight * cls
        cls_value = float(cls.detach())
    return LossParts(total, float(rank.detach()), cls_value,
                     float(sim_pos.detach().mean()), float(sim_neg.detach().mean()))


# -- product recipe (issue #12) ------------------------------------------------------------------
def in_batch_triplet_loss(embeddings: torch.Tensor, values: torch.Tensor, margin: float = 0.2,
                          generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Random in-batch triplets: each anchor with one random positive (same value, another image)
    and one random negative (other value); mean hinge on cosine. None when no anchor has both."""
    same = values[:, None] == values[None, :]
    eye = torch.eye(len(values), dtype=torch.bool, device=values.device)
    positive_mask, negative_mask = same & ~eye, ~same
    usable = positive_mask.any(dim=1) & negative_mask.any(dim=1)
    if not bool(usable.any()):
        return None
    noise = torch.rand(same.shape, generator=generator).to(values.device)
    positive = torch.where(positive_mask, noise, -1.0).argmax(dim=1)
    negative = torch.where(negative_mask, noise, -1.0).argmax(dim=1)
    sim = embeddings.float() @ embeddings.float().T
    rows = torch.arange(len(values), device=values.device)
    return ranking_loss(sim[rows, negative][usable], sim[rows, positive][usable], margin)
