"""Optimizers and learning-rate schedules from established libraries (torch, prodigyopt, transformers'
Adafactor, bitsandbytes when installed, lion-pytorch), diffusers' ``get_scheduler`` and its ``EMAModel``."""
from __future__ import annotations

import torch

from .config import ConfigError, OptimizerConfig


def build_optimizer(cfg: OptimizerConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
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
