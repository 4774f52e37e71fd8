"""Optimizers and learning-rate schedules from established libraries (torch, prodigyopt, transformers'
Adafactor, bitsandbytes when installed, lion-pytorch), diffusers' ``get_scheduler`` and its ``EMAModel``.

``optimizer_impl`` (the Speed Options node, train/speed.py) picks how torch's AdamW runs its update: ``default``
(torch chooses: its multi-tensor ``foreach`` kernels on a GPU, a per-tensor loop on the CPU), ``foreach`` or
``fused`` (one fused kernel per group; torch has it on the CPU as well). The moments are the same tensors either
way, so a run may switch implementations on resume (``load_optimizer_state``). The other optimizers have no such
choice in their libraries (``impl_note`` says so under Train Init) and run their own code."""
from __future__ import annotations

import logging

import torch

from .config import ConfigError, OptimizerConfig


log = logging.getLogger(__name__)
IMPLS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}  # torch AdamW's keyword for each
IMPL_KEYS = ("foreach", "fused")
# what each other optimizer's library offers instead (none has a foreach/fused switch)
OWN_CODE = {"adamw8bit": "bitsandbytes' AdamW8bit always runs its own 8-bit CUDA kernels",
            "prodigy": "prodigyopt's Prodigy has only its per-tensor loop",
            "adafactor": "transformers' Adafactor has only its per-tensor loop",
            "lion": "lion-pytorch's Lion runs its per-tensor loop (its Triton kernel, CUDA only, is not used)"}


def build_optimizer(cfg: OptimizerConfig, params: list[torch.nn.Parameter],
                    impl: str = "default") -> torch.optim.Optimizer:
    """The optimizer of ``cfg`` over ``params``; ``impl``: torch AdamW's implementation (``IMPLS``), ignored by the
    other optimizers (``impl_note``)."""
    if impl not in IMPLS:
        raise ConfigError(f"optimizer_impl must be one of {tuple(IMPLS)} (got {impl!r})")
    if cfg.name == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                **IMPLS[impl])
        if impl != "default":
            log.info("optimizer_impl %s: %s over %d tensors", impl, describe(opt), len(params))
        return opt
    if cfg.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("AdamW8bit needs bitsandbytes (pip install bitsandbytes, CUDA only); use adamw") from None
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, d_coef=cfg.d_coef,
                       decouple=cfg.decouple, use_bias_correction=cfg.use_bias_correction,
                       safeguard_warmup=cfg.safeguard_warmup)
    if cfg.name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay, relative_step=False, scale_parameter=False,
                         warmup_init=False)
    if cfg.name == "lion":
        from lion_pytorch import Lion

        return Lion(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown optimizer {cfg.name}")


def impl_note(cfg: OptimizerConfig, impl: str) -> str | None:
    """A line for Train Init when ``impl`` cannot act on ``cfg``'s optimizer (None when it acts or is default)."""
    if impl == "default" or cfg.name == "adamw":
        return None
    return (f"optimizer_impl {impl}: applies to AdamW only; {OWN_CODE.get(cfg.name, cfg.name + ' runs its own code')}, "
            "so the run steps as with default")


def describe(opt: torch.optim.Optimizer) -> str:
    """Which implementation ``opt`` runs, from its own settings (e.g. ``AdamW (fused)``)."""
    group = opt.param_groups[0]
    impl = next((k for k in reversed(IMPL_KEYS) if group.get(k)), "default")
    return f"{type(opt).__name__} ({impl})"


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """``opt.load_state_dict(state)`` keeping ``opt``'s own implementation: torch takes every group setting from
    the saved groups, ``foreach``/``fused`` included, so a checkpoint written with another ``optimizer_impl``
    would otherwise bring its implementation back. The moments and step counts load as saved (a fused optimizer
    keeps its step counts on the parameters' device, as torch places them)."""
    groups = state.get("param_groups")
    if isinstance(groups, list) and len(groups) == len(opt.param_groups):
        own = [{k: g[k] for k in IMPL_KEYS if k in g} for g in opt.param_groups]
        state = {**state, "param_groups": [{**saved, **mine} for saved, mine in zip(groups, own)]}
    opt.load_state_dict(state)


def build_scheduler(cfg: OptimizerConfig, optimizer):
    kwargs = {}
    if cfg.scheduler == "cosine_with_restarts":
        kwargs["num_cycles"] = cfg.num_cycles
    if cfg.scheduler == "polynomial":
        kwargs["power"] = cfg.power
    # diffusers' "constant" ignores num_warmup_steps; its warmup variant is the documented constant + warmup
    name = "constant_with_warmup" if cfg.scheduler == "constant" and cfg.warmup_steps else cfg.scheduler
    from diffusers.optimization import get_scheduler  # (imported on use, not when ComfyUI loads the pack)

    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=cfg.total_steps, **kwargs)


def build_ema(params: list[torch.nn.Parameter], decay: float):
    """diffusers' EMAModel over the trained parameters, updated with ``torch._foreach`` ops: a few kernels per step
    for all parameters instead of three per parameter (thousands of launches per step for an SDXL/FLUX LoRA); the
    same average (``shadow - (1 - d)(shadow - param)``), equal to the per-parameter update within float rounding."""
    from diffusers.training_utils import EMAModel  # (imported on use, not when ComfyUI loads the pack)

    return EMAModel(params, decay=decay, foreach=True)
