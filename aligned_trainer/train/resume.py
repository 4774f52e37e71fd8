"""Opening a run at Train Init: which folder it writes to, which checkpoint it continues, and whether that
checkpoint fits the run's settings. Every refusal is one CheckpointError/ConfigError before any training,
naming the value and the fix (never a shape error from ``load_state_dict`` at Train Steps)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import state as st
from .config import LoraConfig, OptimizerConfig, as_dict

log = logging.getLogger("aligned_trainer")

# LoRA Config fields a checkpoint must share with the run to be continued (the rest may change on resume:
# dropout, max norm, init)
LORA_FIELDS = ("algorithm", "rank", "alpha", "dora", "dora_axis")


@dataclass(frozen=True)
class Opened:
    run_dir: Path
    checkpoint: dict | None = None            # load_checkpoint's dict, None for a fresh run
    kept: tuple[str, ...] = ()                # the run folder's checkpoints the run continues with
    replaced: tuple[Path, ...] = field(default=())  # old checkpoints to delete (if_exists 'overwrite')


def open_run(runs_root: Path, run_name: str, resume: str, if_exists: str, model, names: list[str],
             lora: LoraConfig, optimizer: OptimizerConfig, te_spec: dict | None) -> Opened:
    """Resolve ``resume`` inside the runs folder, choose the run folder (``if_exists``), load and check the
    checkpoint. Nothing is deleted here: the caller removes ``replaced`` once everything else has passed."""
    source = st.resolve_resume(resume, runs_root, run_name)
    run_dir, source, replaced = st.claim_run_dir(runs_root, run_name, source, if_exists)
    if run_dir.name != run_name:
        log.info("aligned_trainer: run name '%s' is taken; this run writes to '%s'", run_name, run_dir.name)
    if source is None:
        return Opened(run_dir, replaced=tuple(replaced))
    ck = st.load_checkpoint(source)
    check_compatible(ck, model, names, lora, optimizer, te_spec)
    kept = tuple(str(p) for p in st.existing_checkpoints(run_dir) if p not in replaced)
    return Opened(run_dir, ck, kept, tuple(replaced))


def _modules(keys, names: set[str]) -> tuple[set[str], list[str]]:
    """(target layers a checkpoint's adapter keys belong to, keys that belong to none)."""
    found, foreign = set(), []
    for key in keys:
        parts = key.split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in names),
                     None)
        if owner is None:
            foreign.append(key)
        else:
            found.add(owner)
    return found, foreign


def check_compatible(ck: dict, model, names: list[str], lora: LoraConfig, optimizer: OptimizerConfig,
                     te_spec: dict | None) -> None:
    """The checkpoint was trained with the same adapter kind, rank, alpha, optimizer, text-encoder spec and
    target layers (of a model with the same layer sizes) as this run."""
    name = Path(ck["path"]).name
    cfg = ck.get("config") or {}
    spec_was, spec_now = (ck.get("te_spec") or {}).get("id"), (te_spec or {}).get("id")
    if spec_was and spec_now and spec_was != spec_now:
        raise st.CheckpointError(f"checkpoint {name} belongs to a run with text-encoder spec {spec_was!r} (another "
                                 f"model family), this training set was cached with {spec_now!r}: resume it with "
                                 "that family's model and captions, or set resume to 'none'")
    adapters = (ck.get("state") or {}).get("adapters") or {}
    found, foreign = _modules(adapters, set(names))
    missing = [n for n in names if n not in found]
    if foreign or missing:
        eg = (f"{len(missing)} of this run's {len(names)} target layers are not in it (e.g. '{missing[0]}')"
              if missing else "")
        eg2 = f"{len(foreign)} of its tensors belong to no target layer (e.g. '{foreign[0]}')" if foreign else ""
        raise st.CheckpointError(f"checkpoint {name} does not fit this run's layers: {'; '.join(filter(None, (eg, eg2)))}."
                                 " It was trained on another model (family) or another target set (preset, "
                                 "include/exclude); resume it with the same model and LoRA Config, or set resume "
                                 "to 'none'")
    was, now = cfg.get("lora", {}), as_dict(lora)
    for k in LORA_FIELDS:
        if k in was and was[k] != now[k]:
            raise st.CheckpointError(f"checkpoint {name} was trained with LoRA Config {k} = {was[k]!r}, this run "
                                     f"has {k} = {now[k]!r}: set {k} to {was[k]!r} to resume it, or set resume "
                                     "to 'none' to start a new run")
    opt_was = cfg.get("optimizer", {}).get("name")
    if opt_was and opt_was != optimizer.name:
        raise st.CheckpointError(f"checkpoint {name} was trained with optimizer {opt_was!r}, this run uses "
                                 f"{optimizer.name!r}: choose {opt_was!r} in the Optimizer node to resume it, or "
                                 "set resume to 'none'")
    modules = dict(model.model.diffusion_model.named_modules())
    for n in names:
        up = adapters.get(f"{n}.lora_up.weight")
        w = getattr(modules.get(n), "weight", None)  # None: not a layer (a text-encoder swap's projection)
        if isinstance(up, torch.Tensor) and isinstance(w, torch.Tensor) and up.shape[0] != w.shape[0]:
            raise st.CheckpointError(f"checkpoint {name} was trained on a model whose layer '{n}' has "
                                     f"{up.shape[0]} outputs, this model's has {w.shape[0]}: resume it with the "
                                     "model it was trained on, or set resume to 'none'")


def samples_per_step(settings: dict) -> int:
    """Micro-batch samples one optimizer step consumes from the run's seeded stream."""
    return int(settings.get("batch_size", 1)) * int(settings.get("grad_accum", 1)) * int(settings.get("processes", 1))


def data_order_note(ck: dict, settings) -> str:
    """'' when resuming ``ck`` with ``settings`` continues exactly as the checkpoint's run would have; else one
    line saying what changes. Every rank draws the whole step from the one seeded stream, so a step is the same
    whatever the process count as long as batch_size x grad_accum x processes is unchanged (2 processes x
    grad_accum 2 == 1 process x grad_accum 4)."""
    was = (ck.get("config") or {}).get("settings") or {}
    if not was:
        return ""
    now = as_dict(settings)
    before, after = samples_per_step(was), samples_per_step(now)
    if before == after:
        return ""
    msg = (f"resume: the checkpoint's run took {before} samples per step (batch_size {was.get('batch_size', 1)} x "
           f"grad_accum {was.get('grad_accum', 1)} x processes {was.get('processes', 1)}), this run takes {after}: it "
           "continues the same sample stream with another step size (not the steps the old run would have taken); "
           f"keep batch_size x grad_accum x processes = {before} to continue it exactly")
    log.warning("aligned_trainer: %s", msg)
    return msg
