"""Text-encoder swap, the UNet's attention layers: the context width they read (:func:`context_dim`), the layers a
reset mode names (:func:`reset_layers`) and their fresh init as ComfyUI ``diff`` patches (:func:`reset_diffs`).

Layers are named by their module names in ComfyUI's UNet (``CrossAttention`` modules ``attn1``/``attn2`` of the
SpatialTransformer blocks) and drawn again the way they were first initialised. The original LDM code (CompVis
``ldm/modules/attention.py``, which trained SD1.x) and diffusers' ``Attention`` both build these layers as plain
``nn.Linear`` and leave PyTorch's default init in place: weight kaiming-uniform with a = sqrt(5), i.e.
U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the bias (``to_out.0`` only) from the same bound. We draw exactly that
(:func:`default_linear_`, which the projection's layers use too) from a seeded generator, in module-name order. The
reset is a set of patches (new init - base weight): the shared base weights are never written; ComfyUI applies the
patches while the model is loaded, like a LoRA.
"""
from __future__ import annotations

import math

import torch
from comfy.ldm.modules.attention import CrossAttention, SpatialTransformer

from .te_swap_measure import SwapError

RESET_MODES = ("none", "cross_attention", "qk", "all_attention")
_LAYERS = {"cross_attention": (("attn2",), ("to_q", "to_k", "to_v", "to_out.0")),
           "qk": (("attn2",), ("to_q", "to_k")),
           "all_attention": (("attn1", "attn2"), ("to_q", "to_k", "to_v", "to_out.0"))}


def default_linear_(layer: torch.nn.Linear, g: torch.Generator) -> None:
    """PyTorch's default nn.Linear init (kaiming-uniform, a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for
    the weight and the bias, drawn from ``g``."""
    bound = 1.0 / math.sqrt(layer.weight.shape[1])
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=g) * 2 * bound - bound)
        if layer.bias is not None:
            layer.bias.copy_(torch.rand(layer.bias.shape, generator=g) * 2 * bound - bound)


def attention_layers(diffusion_model: torch.nn.Module) -> dict[str, list[str]]:
    """'attn1'/'attn2' -> module names of the CrossAttention modules of the SpatialTransformer blocks."""
    out = {"attn1": [], "attn2": []}
    inside = [n for n, m in diffusion_model.named_modules() if isinstance(m, SpatialTransformer)]
    for name, m in diffusion_model.named_modules():
        last = name.rpartition(".")[2]
        if isinstance(m, CrossAttention) and last in out and any(name.startswith(t + ".") for t in inside):
            out[last].append(name)
    return out


def reset_layers(diffusion_model: torch.nn.Module, mode: str) -> list[str]:
    """Module names (Linear layers) a reset mode re-initialises, sorted."""
    if mode not in RESET_MODES:
        raise SwapError(f"reset mode {mode!r} is not one of {RESET_MODES}")
    if mode == "none":
        return []
    which, parts = _LAYERS[mode]
    found = attention_layers(diffusion_model)
    names = sorted(f"{a}.{p}" for w in which for a in found[w] for p in parts)
    if not names:
        raise SwapError("this model has no SpatialTransformer cross-attention (attn1/attn2): the swap's reset is for "
                        "UNets (SD1.5, SD2, SDXL); set reset to 'none'")
    return names


def context_dim(diffusion_model: torch.nn.Module) -> int:
    """The width the UNet's cross-attention reads (attn2.to_k's input width)."""
    mods = dict(diffusion_model.named_modules())
    names = attention_layers(diffusion_model)["attn2"]
    if not names:
        raise SwapError("this model has no cross-attention reading a text context (attn2): the text-encoder swap "
                        "is for UNets such as SD1.5 and SDXL")
    return int(mods[names[0] + ".to_k"].weight.shape[1])


def reset_diffs(patcher, names: list[str], seed: int) -> dict[str, torch.Tensor]:
    """ComfyUI state keys (``diffusion_model.<layer>.weight`` / ``.bias``) -> (fresh default init - base value),
    the base values as ComfyUI holds them before any patch (``get_key_patches``). Drawn in name order from one
    generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    base = patcher.get_key_patches("diffusion_model.")
    out = {}
    for n in names:
        wkey, bkey = f"diffusion_model.{n}.weight", f"diffusion_model.{n}.bias"
        w = base[wkey][0][0]
        fresh = torch.nn.Linear(w.shape[1], w.shape[0], bias=bkey in base)
        default_linear_(fresh, g)
        out[wkey] = fresh.weight.detach() - w.detach().float().cpu()
        if bkey in base:
            out[bkey] = fresh.bias.detach() - base[bkey][0][0].detach().float().cpu()
    return out
