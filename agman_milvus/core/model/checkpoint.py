"""Checkpoints: one safetensors file holding the weights and, in its metadata, a JSON config.

Nothing is ever unpickled. The config names the model, backbone, attribute schema (with value
names), input size, normalisation, embedding sizes and a model version derived from the
weights; loading recomputes that digest, so a tampered file is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from agman_milvus.core.errors import AgmanError
from agman_milvus.core.model._registry import build_model
from agman_milvus.core.model.base import AttributeEmbeddingModel
from agman_milvus.core.schema import AttributeSchema

FORMAT = "agman-checkpoint/1"
_CONFIG_KEY = "agman_config"


class CheckpointError(AgmanError, ValueError):
    """A checkpoint that cannot be loaded safely: wrong format, unreadable or tampered."""


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def model_version(model: AttributeEmbeddingModel) -> str:
    """``{model}-{backbone}-{first 12 hex of the weights digest}``; cached on the model."""
    if model.version is None:
        model.version = _version(model.model_name, model.backbone_name, weights_digest(model.state_dict()))
    return model.version


def _version(name: str, backbone: str, digest: str) -> str:
    return f"{name}-{backbone}-{digest[:12]}"


def save_checkpoint(model: AttributeEmbeddingModel, path: str | Path,
                    extra: dict[str, Any] | None = None) -> str:
    """Write ``model`` to ``path`` (a .safetensors file); returns the model version."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"checkpoints are .safetensors files, not {path.name!r}")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    digest = weights_digest(state)
    model.version = _version(model.model_name, model.backbone_name, digest)
    config = {"format": FORMAT, **model.config(), "version": model.version, "weights_sha256": digest,
              "extra": extra or {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={_CONFIG_KEY: json.dumps(config)})
    tmp.replace(path)
    return model.version


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """The JSON config of a checkpoint, without loading its weights."""
    path = _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # safetensors raises several types for non-safetensors data
        raise CheckpointError(
            f"{path} is not a safetensors checkpoint ({exc}); refusing to load it") from None
    if _CONFIG_KEY not in metadata:
        raise CheckpointError(f"{path} is a safetensors file without an agman config")
    config = json.loads(metadata[_CONFIG_KEY])
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {config.get('format')!r}, expected {FORMAT!r}")
    return config


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> AttributeEmbeddingModel:
    """Rebuild the model described by a checkpoint and load its verified weights (eval mode)."""
    config = read_checkpoint_config(path)
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        state = {name: handle.get_tensor(name) for name in handle.keys()}
    digest = weights_digest(state)
    if digest != config["weights_sha256"]:
        raise CheckpointError(f"{path}: the weights do not match their recorded digest (file was modified)")
    model = build_model(
        config["model"],
        schema=AttributeSchema.from_json(config["schema"]),
        backbone=config["backbone"],
        image_size=int(config["image_size"]),
        embed_dim=int(config["embed_dim"]),
        taps=config.get("taps", "paper"),  # checkpoints from before the product recipe
    )
    model.mean, model.std = tuple(config["mean"]), tuple(config["std"])
    if config.get("value_head"):
        model.attach_value_head(**config["value_head"])
    model.load_state_dict(state, strict=True)
    model.version = config["version"]
    return model.to(map_location).eval()


def _check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with path.open("rb") as handle:
        head = handle.read(9)
    if head[8:9] == b"{":
        return path
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise CheckpointError(
            f"{path} is a pickled PyTorch file (.pt/.pth); only .safetensors checkpoints are loaded"
        )
    raise CheckpointError(f"{path} is not a safetensors checkpoint; refusing to load it")
