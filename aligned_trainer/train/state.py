"""The training-run state (immutable) and its checkpoints.

A checkpoint is one safetensors file holding the adapter weights, the optimizer state tensors, the EMA
weights and the RNG state; the scheduler state, optimizer hyper-parameters, history and configs go in its
metadata. It is written to a temporary name and renamed, so a crash mid-write leaves the previous
checkpoint intact. The last K are kept.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..data.types import TrainingSet
from .config import LoraConfig, OptimizerConfig, TimestepConfig, as_dict


@dataclass(frozen=True)
class RunSettings:
    seed: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    precision: str = "fp32"          # fp32 | bf16 | fp16 (autocast)
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0           # 0 = off
    guidance: float = 1.0            # guidance value fed to guidance-distilled models (FLUX dev)
    val_count: int = 0               # samples held out for validation (0: validate on training samples)
    val_timesteps: int = 4
    run_name: str = "run"
    reg_weight: float = 1.0          # multiplies the loss weight of regularization samples (dataset's weight x this)
    dop_weight: float = 0.0          # differential output preservation (needs TrainRun.preservation); 0 = off


@dataclass(frozen=True)
class TrainRun:
    model: Any                       # ComfyUI ModelPatcher (base model, no LoRA)
    training_set: TrainingSet
    lora: LoraConfig
    timesteps: TimestepConfig
    optimizer: OptimizerConfig
    settings: RunSettings
    run_dir: str
    step: int = 0
    state: dict | None = None        # adapters/optimizer/scheduler/ema/rng, None before the first step
    history: tuple = ()
    checkpoints: tuple = ()
    te_spec: dict | None = None
    meta: dict = field(default_factory=dict)
    preservation: list | None = None  # CONDITIONING of the preservation prompt (DOP), e.g. "a photo of a person"

    def advanced(self, **kw) -> "TrainRun":
        return replace(self, **kw)

    def config_json(self) -> dict:
        return {"lora": as_dict(self.lora), "timesteps": as_dict(self.timesteps),
                "optimizer": as_dict(self.optimizer), "settings": as_dict(self.settings)}


def _flatten(prefix: str, obj, tensors: dict, meta):
    """Split a nested state (dicts/lists of tensors and plain values) into tensors + JSON structure."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(f"{prefix}.{i}", k, tensors, meta), _flatten(f"{prefix}.{i}v", v, tensors, meta)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(f"{prefix}.{i}", v, tensors, meta) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    return obj


def _unflatten(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [_unflatten(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


def save_checkpoint(run: TrainRun, keep_last: int = 3) -> tuple[str, ...]:
    """Write the run's state at ``run.step``; return the kept checkpoint paths (oldest first)."""
    folder = Path(run.run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{run.step:07d}.safetensors"
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten("s", run.state, tensors, None)
    meta = {"format": "aligned_trainer.checkpoint.v1", "step": str(run.step), "state": json.dumps(structure),
            "history": json.dumps(list(run.history)), "config": json.dumps(run.config_json()),
            "te_spec": json.dumps(run.te_spec)}
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors or {"empty": torch.zeros(1)}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    kept = [str(path)] + [c for c in run.checkpoints if c != str(path)]
    kept = sorted(set(kept))
    for old in kept[:-keep_last] if keep_last > 0 else []:
        Path(old).unlink(missing_ok=True)
    return tuple(kept[-keep_last:]) if keep_last > 0 else tuple(kept)


def load_checkpoint(path: str | Path) -> dict:
    """{'step', 'state', 'history', 'config', 'te_spec'} from a checkpoint file."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"checkpoint {path} cannot be read ({e}); resume from an earlier one") from None
    if meta.get("format") != "aligned_trainer.checkpoint.v1":
        raise ValueError(f"{path} is not an Aligned Trainer checkpoint")
    return {"step": int(meta["step"]), "state": _unflatten(json.loads(meta["state"]), tensors),
            "history": tuple(json.loads(meta["history"])), "config": json.loads(meta["config"]),
            "te_spec": json.loads(meta["te_spec"]), "path": str(path)}


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = sorted((Path(run_dir) / "checkpoints").glob("step_*.safetensors"))
    return found[-1] if found else None
