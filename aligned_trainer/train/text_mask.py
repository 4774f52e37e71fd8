"""The aligned text mask, delivered to denoisers whose ComfyUI model drops it.

A spec with ``denoiser_attention_mask`` (Chroma, PixArt, Z-Image) leaves a per-token text mask ``(B, T)`` in the
conditioning (``attention_mask``; Chroma's shows one pad token). Some ComfyUI models read it as it is (Lumina 2 /
Z-Image); the FLUX-derived ones (``model_base.Flux.extra_conds``: FLUX, Chroma) read ``attention_mask`` only as a
joint text+image attention bias ``(B, T+N, T+N)`` with ``attention_mask_img_shape`` = the image's token grid,
the form ComfyUI's own nodes write (``StyleModelApply``), and otherwise discard it: the denoiser would then attend
every pad token, unlike the official pipeline (diffusers ``ChromaPipeline._prepare_attention_mask``).

Which form a model takes is asked of the model itself (its ``extra_conds``), not of a family name: the text mask
is passed as it is where the model keeps it, as the joint bias where the model keeps that, and nowhere else.
The bias hides the masked text tokens as keys from every query (text and image); masked text queries still
attend the visible tokens (no all-masked rows), their outputs are never read by the image tokens.
"""
from __future__ import annotations

import math

import torch

KEY, SHAPE_KEY = "attention_mask", "attention_mask_img_shape"


def joint_bias(text_mask: torch.Tensor, image_tokens: int, dtype=torch.float32) -> torch.Tensor:
    """``(B, T+N, T+N)`` additive bias: ``-inf`` in the columns of masked text tokens, 0 elsewhere."""
    mask = text_mask.reshape(text_mask.shape[0], -1) > 0
    keys = torch.cat([mask, torch.ones(mask.shape[0], image_tokens, dtype=torch.bool, device=mask.device)], dim=1)
    bias = torch.zeros(keys.shape, dtype=dtype, device=mask.device).masked_fill(~keys, float("-inf"))
    return bias.unsqueeze(1).expand(-1, keys.shape[1], -1).contiguous()


def _token_grid(diffusion_model, latent: torch.Tensor) -> tuple[int, int] | None:
    patch = getattr(diffusion_model, "patch_size", None)
    if not isinstance(patch, int) or latent.ndim != 4:
        return None
    return math.ceil(latent.shape[-2] / patch), math.ceil(latent.shape[-1] / patch)


def _keeps(base_model, extras: dict, latent: torch.Tensor) -> bool:
    probe = {"pooled_output": None, **extras, "noise": latent, "device": latent.device}
    try:
        return KEY in base_model.extra_conds(**probe)
    except Exception:  # a model that needs other inputs to build its conds: ask no further
        return False


_FORM: dict[type, str] = {}  # model class -> "plain" | "joint" | "none": asked once, not on every training step


def _form(base_model, extras: dict, latent: torch.Tensor, grid: tuple[int, int] | None) -> str:
    kind = type(base_model)
    if kind not in _FORM:
        if _keeps(base_model, extras, latent):
            _FORM[kind] = "plain"
        elif grid is not None and _keeps(base_model, {**extras, KEY: joint_bias(extras[KEY], grid[0] * grid[1]),
                                                      SHAPE_KEY: grid}, latent):
            _FORM[kind] = "joint"
        else:
            _FORM[kind] = "none"
    return _FORM[kind]


def for_model(base_model, extras: dict, latent: torch.Tensor) -> dict:
    """``extras`` (a conditioning's dict) with its text mask in the form ``base_model`` takes (unchanged when
    it holds no 2-D text mask, when the mask hides nothing, or when the model keeps the mask as it is)."""
    mask = extras.get(KEY)
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or SHAPE_KEY in extras or bool((mask > 0).all()):
        return extras
    grid = _token_grid(base_model.diffusion_model, latent)
    if _form(base_model, extras, latent, grid) != "joint" or grid is None:
        return extras
    return {**extras, KEY: joint_bias(mask, grid[0] * grid[1]), SHAPE_KEY: grid}
