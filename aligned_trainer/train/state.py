"""The training-run state (immutable), its checkpoints, and the runs folder.

A checkpoint is one safetensors file holding the adapter weights, the optimizer state tensors, the EMA
weights and the RNG state; the scheduler state, optimizer hyper-parameters, history and configs go in its
metadata, with a digest of the tensors and of that metadata, verified on load (a flipped byte is refused,
never trained on). It is written to a temporary name and renamed, so a crash mid-write leaves the previous
checkpoint intact. The last K are kept.

Runs live in one folder (``output/aligned_trainer/runs/<run name>``). ``resume`` takes 'none', 'latest',
a run name or a checkpoint file inside that folder, nothing else (:func:`resolve_resume`); a run name that is
already taken needs an explicit choice (:func:`claim_run_dir`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..data.types import TrainingSet
from . import files
from .config import ConfigError, LoraConfig, check_finite, OptimizerConfig, TimestepConfig, as_dict

FORMAT = "aligned_trainer.checkpoint.v2"   # v2: with a digest
FORMAT_V1 = "aligned_trainer.checkpoint.v1"
RUN_NAME_MAX = 100
RUN_IF_EXISTS = ("new_name", "overwrite", "resume")
RUNS_HINT = "output/aligned_trainer/runs"
log = logging.getLogger("aligned_trainer")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed (damaged, foreign, incompatible with the run's settings)."""


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
    quantize: str = "none"           # none | int8 | int4: the frozen base's Linear weights (train/quantize.py)
    offload_blocks: int = 0          # blocks kept on the offload device and streamed in (train/offload.py)
    memory_budget_gb: float = 0.0    # the memory plan's budget; 0 = the device's free memory (train/memory.py)
    processes: int = 1               # data-parallel worker processes (train/distributed.py); 1 = in ComfyUI's process
    # speed options (train/speed.py): how a step is computed, not what it computes
    optimizer_impl: str = "default"  # default | foreach | fused
    channels_last: bool = False
    lora_math: str = "activation"    # activation | merged
    attention: str = "comfy"         # comfy (ComfyUI's choice) | a registered function | sdpa_<kernel> (attention.py)

    def __post_init__(self):
        check_finite(self)  # NaN passes every range check of a JSON prompt


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
        out = {"lora": as_dict(self.lora), "timesteps": as_dict(self.timesteps),
               "optimizer": as_dict(self.optimizer), "settings": as_dict(self.settings)}
        slider = (getattr(self.training_set, "meta", None) or {}).get("slider")  # concept sliders (train/slider.py)
        if slider is not None:
            out["slider"] = slider.config.record()
        return out


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


def digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes) and every metadata entry but the digest itself."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"T|{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for k in sorted(meta):
        if k != "digest":
            h.update(f"M|{k}|{len(meta[k])}|{meta[k]}".encode())
    return h.hexdigest()


def save_checkpoint(run: TrainRun, keep_last: int = 3) -> tuple[str, ...]:
    """Write the run's state at ``run.step``; return the kept checkpoint paths (oldest first)."""
    folder = Path(run.run_dir) / "checkpoints"
    path = folder / f"step_{run.step:07d}.safetensors"
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten("s", run.state, tensors, None)
    tensors = tensors or {"empty": torch.zeros(1)}
    meta = {"format": FORMAT, "step": str(run.step), "state": json.dumps(structure),
            "history": json.dumps(list(run.history)), "config": json.dumps(run.config_json()),
            "te_spec": json.dumps(run.te_spec)}
    if (run.meta or {}).get("started_at"):  # the first start of the run, kept across resumes (ss_training_started_at)
        meta["started_at"] = str(run.meta["started_at"])
    meta["digest"] = digest(tensors, meta)
    files.write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    kept = [str(path)] + [c for c in run.checkpoints if c != str(path)]
    kept = sorted(set(kept))
    for old in kept[:-keep_last] if keep_last > 0 else []:
        Path(old).unlink(missing_ok=True)
    return tuple(kept[-keep_last:]) if keep_last > 0 else tuple(kept)


def _earlier(path: Path) -> str:
    others = sorted(p.name for p in path.parent.glob("step_*.safetensors") if p.name != path.name)
    return (f"resume from an earlier checkpoint of the run ({', '.join(others[-3:])})" if others
            else "set resume to 'none' to start again")


def load_checkpoint(path: str | Path) -> dict:
    """{'step', 'state', 'history', 'config', 'te_spec'} from a checkpoint file, verified against its digest.
    The tensors are ordinary tensors even when called under ComfyUI's ``torch.inference_mode()`` (the optimizer
    updates its state in place when training goes on)."""
    path = Path(path)
    damaged = f"checkpoint {path.name} (in {path.parent}) is damaged"
    try:
        with torch.inference_mode(False), safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{damaged}: it cannot be read as safetensors ({str(e)[:200]}); {_earlier(path)}") from None
    fmt = meta.get("format")
    if fmt not in (FORMAT, FORMAT_V1):
        raise CheckpointError(f"{path.name} is not an Aligned Trainer checkpoint (format {fmt!r}); resume takes the "
                              "step_*.safetensors files Train Steps writes")
    if fmt == FORMAT and meta.get("digest") != digest(tensors, meta):
        raise CheckpointError(f"{damaged}: its contents do not match the digest stored in it (changed bytes, e.g. "
                              f"a disk or copy error); it was not used. {_earlier(path).capitalize()}")
    if fmt == FORMAT_V1:
        log.warning("aligned_trainer: checkpoint %s has no digest (written by an older version); not verified", path)
    try:
        ck = {"step": int(meta["step"]), "state": _unflatten(json.loads(meta["state"]), tensors),
              "history": tuple(json.loads(meta["history"])), "config": json.loads(meta["config"]),
              "te_spec": json.loads(meta["te_spec"]), "path": str(path),
              "started_at": float(meta["started_at"]) if meta.get("started_at") else None}
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{damaged}: its metadata is incomplete ({e}); {_earlier(path)}") from None
    bad = [k for k, v in (ck["state"] or {}).get("adapters", {}).items()
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"checkpoint {path.name} holds non-finite adapter weights (NaN/inf in {bad[0]}): the "
                              f"run had diverged by step {ck['step']}; {_earlier(path)} and lower the learning rate")
    return ck


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    return latest_in(Path(run_dir) / "checkpoints")


# -- the runs folder ---------------------------------------------------------------------------------------

def check_run_name(name: str) -> str:
    """The run name as a plain folder name, or one ConfigError naming it and the fix."""
    shown = repr(name if len(name) <= 60 else name[:57] + "...")
    why = files.name_problem(name, RUN_NAME_MAX)
    if why is None and name in ("none", "latest"):
        why = "'none' and 'latest' are resume keywords"
    if why:
        raise ConfigError(f"run name {shown} is not allowed: {why}. Use a plain name (a folder under "
                          f"{RUNS_HINT}: letters, digits, '_', '-', '.', spaces; at most {RUN_NAME_MAX} "
                          "characters), e.g. 'my_lora'")
    return name


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _refused(value: str) -> CheckpointError:
    shown = repr(value if len(value) <= 80 else value[:77] + "...")
    return CheckpointError(
        f"resume {shown} is refused: resume takes 'none', 'latest' (this run name's newest checkpoint), a run name, "
        f"or a checkpoint file inside the runs folder ({RUNS_HINT}) given relative to it, e.g. 'my_lora' or "
        "'my_lora/checkpoints/step_0000100.safetensors'")


def runs_path(value: str, runs_root: Path) -> Path:
    """``value`` (relative to the runs folder, or absolute) as a real path inside ``runs_root``; the same
    CheckpointError for everything else (absolute paths elsewhere, '..', '~', NUL, symlinks leading out) whether
    or not the target exists. The filesystem is consulted only for paths already known to lie inside."""
    root_abs = os.path.normpath(os.path.abspath(runs_root))
    root_real = os.path.realpath(runs_root)
    if not value or "\x00" in value or value.startswith("~") or \
            any(part == ".." for part in re.split(r"[\\/]", value)):
        raise _refused(value)
    from .. import paths

    if (err := paths.too_long(value, "resume")) is not None:
        raise CheckpointError(str(err))
    lexical = os.path.normpath(value if os.path.isabs(value) else os.path.join(root_abs, value))
    if not (_inside(lexical, root_abs) or _inside(lexical, root_real)):
        raise _refused(value)
    real = os.path.realpath(lexical)  # follows symlinks inside the runs folder
    if not _inside(real, root_real) or real == root_real:
        raise _refused(value)
    return Path(real)


def resolve_resume(value: str, runs_root: Path, run_name: str) -> Path | None:
    """The checkpoint file ``resume`` names, or None for 'none'. 'latest': the newest checkpoint of
    ``run_name``; a run name (folder): its newest; a file: that checkpoint."""
    value = (value or "none").strip()
    if value == "none":
        return None
    if value == "latest":
        target = Path(runs_root) / run_name
    else:
        target = runs_path(value, Path(runs_root))
    if target.is_dir():
        found = latest_checkpoint(target) or (latest_in(target) if target.name == "checkpoints" else None)
        if found is None:
            raise CheckpointError(f"no checkpoint to resume in {target}: train this run first, or set resume "
                                  "to 'none'")
        return found
    if target.is_file() and target.suffix == ".safetensors":
        return target
    what = f"run '{run_name}'" if value == "latest" else repr(value)
    raise CheckpointError(f"no checkpoint to resume: {what} is neither a run nor a checkpoint file in the runs "
                          f"folder ({RUNS_HINT}); check the name, or set resume to 'none'")


def latest_in(folder: Path) -> Path | None:
    found = sorted(Path(folder).glob("step_*.safetensors"))
    return found[-1] if found else None


def existing_checkpoints(run_dir: Path) -> list[Path]:
    return sorted((Path(run_dir) / "checkpoints").glob("step_*.safetensors"))


def claim_run_dir(runs_root: Path, run_name: str, source: Path | None, if_exists: str) -> tuple[Path, Path | None, list[Path]]:
    """Where the run writes its checkpoints: ``(run_dir, checkpoint to resume from, old checkpoints to delete)``.
    A run folder that already holds checkpoints is reused as is only when the run continues its newest
    checkpoint; otherwise ``if_exists`` decides: 'new_name' (the default; the first free '<name>_2', '<name>_3',
    ...: nothing is lost), 'overwrite' (its old checkpoints are deleted, so 'latest' cannot point into the old
    run) or 'resume' (continue its newest checkpoint; only with resume 'none')."""
    if if_exists not in RUN_IF_EXISTS:
        raise ConfigError(f"if_exists {if_exists!r} is not one of {RUN_IF_EXISTS}")
    run_dir = Path(runs_root) / run_name
    old = existing_checkpoints(run_dir)
    if not old or (source is not None and os.path.realpath(source) == os.path.realpath(old[-1])):
        return run_dir, source, []
    if if_exists == "resume":
        if source is not None:
            raise ConfigError(f"run '{run_name}' already has checkpoints (newest {old[-1].name}) and resume names "
                              f"another checkpoint ({source.name}): set if_exists to 'new_name' to continue it in "
                              "a new run folder, or 'overwrite' to replace the old run's checkpoints")
        return run_dir, old[-1], []
    if if_exists == "overwrite":
        return run_dir, source, [p for p in old if source is None or os.path.realpath(p) != os.path.realpath(source)]
    for n in range(2, files.MAX_SUFFIX):
        candidate = Path(runs_root) / f"{run_name}_{n}"
        if not existing_checkpoints(candidate):
            return candidate, source, []
    raise ConfigError(f"run name '{run_name}' and its numbered variants are all taken; choose another run name")
