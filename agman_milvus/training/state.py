"""Resumable training state without pickle.

Optimizer tensors go to ``<stem>.optim.safetensors`` (keys ``state.<param index>.<name>``); the
optimizer's param groups, the LR scheduler's state, the epoch and the best score go to
``<stem>.state.json``. Model weights are a normal checkpoint (``save_checkpoint``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from agman_milvus.core.errors import AgmanError


class TrainingStateError(AgmanError, ValueError):
    """A training state that cannot be resumed (missing, or from a different setup)."""


def save_training_state(
    stem: Path, optimizer: torch.optim.Optimizer, scheduler: Any, info: dict[str, Any]
) -> None:
    """Write optimizer + scheduler + ``info`` next to ``stem`` (atomic replace)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    payload = {
        "param_groups": state["param_groups"],
        "scalars": scalars,
        "scheduler": scheduler.state_dict(),
        "info": info,
    }
    tensor_path, json_path = _paths(stem)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tensor_path) + ".tmp")
    Path(str(tensor_path) + ".tmp").replace(tensor_path)
    Path(str(json_path) + ".tmp").write_text(json.dumps(payload, indent=1))
    Path(str(json_path) + ".tmp").replace(json_path)


def load_training_state(
    stem: Path, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore optimizer and scheduler in place; returns the saved ``info``."""
    tensor_path, json_path = _paths(stem)
    if not tensor_path.exists() or not json_path.exists():
        raise TrainingStateError(f"no training state at {json_path} / {tensor_path}")
    payload = json.loads(json_path.read_text())
    device = optimizer.param_groups[0]["params"][0].device
    per_param: dict[int, dict[str, Any]] = {}
    for key, tensor in load_file(str(tensor_path)).items():
        _, index, name = key.split(".", 2)
        per_param.setdefault(int(index), {})[name] = tensor if name == "step" else tensor.to(device)
    for index, values in payload["scalars"].items():
        per_param.setdefault(int(index), {}).update(values)
    saved_sizes = [len(g["params"]) for g in payload["param_groups"]]
    own_sizes = [len(g["params"]) for g in optimizer.param_groups]
    if saved_sizes != own_sizes:
        raise TrainingStateError(
            f"saved optimizer has parameter groups of sizes {saved_sizes}, this run {own_sizes}; "
            "resume with the same model and --freeze-backbone setting"
        )
    try:
        optimizer.load_state_dict({"state": per_param, "param_groups": payload["param_groups"]})
    except ValueError as error:
        raise TrainingStateError(f"cannot restore optimizer state: {error}") from None
    scheduler.load_state_dict(payload["scheduler"])
    return payload["info"]


def _paths(stem: Path) -> tuple[Path, Path]:
    return stem.with_name(stem.name + ".optim.safetensors"), stem.with_name(stem.name + ".state.json")
