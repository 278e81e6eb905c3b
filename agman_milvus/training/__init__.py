"""Training and evaluation: losses, the trainer, metrics (ASFR MAP, TR accuracy)."""

from agman_milvus.training.metrics import MAPResult, mean_average_precision, triplet_accuracy

__all__ = ["MAPResult", "mean_average_precision", "triplet_accuracy"]
