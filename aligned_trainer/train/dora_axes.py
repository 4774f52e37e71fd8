"""DoRA on the output axis (LoRA Config ``dora_axis: output``): peft's DoRA, written so that ComfyUI and diffusers
both apply exactly the trained weight.

Training (``adapters.TrainAdapter._dora``) keeps one magnitude per output row, ``m``, and merges
``W' = (W + dW) * m / ||W + dW||_row``, as peft's DoRA layer does (diffusers loads peft's form as
``<module>.lora_magnitude_vector``). ComfyUI reads an output-axis ``dora_scale`` (shape (out, 1, ...)) differently:
its ``weight_decompose`` divides it by the BASE weight's row norms, ``W' = (W + dW) * c / ||W||_row``. Both are a
row scaling of the same ``W + dW``, so with the LoRA fixed (at save time) the ComfyUI file carries
``c = m * ||W|| / ||W + dW||`` and the diffusers file carries ``m``: the same merged weight in both, from the
base weight the LoRA is saved against. The adapter state keeps ``m`` under ``<module>.dora_magnitude``; every path
that hands the trained LoRA to ComfyUI's loader goes through ``for_comfyui``."""
from __future__ import annotations

import comfy.model_patcher
import torch

MAGNITUDE = "dora_magnitude"


def has_output_axis(adapters: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith("." + MAGNITUDE) for k in adapters)


def base_weight(model, module: str) -> torch.Tensor:
    """The diffusion model's weight of ``module`` in fp32, as ComfyUI's patcher merges a LoRA into it
    (``get_key_weight`` + the layer's ``convert_weight``: scaled fp8 checkpoints' scale applied)."""
    base = getattr(model, "model", model)
    weight, _, convert = comfy.model_patcher.get_key_weight(base, f"diffusion_model.{module}.weight")
    weight = weight.detach()
    # a quantized base (train/quantize.py): its dequantized values. Only a tensor subclass: every torch.Tensor has
    # ``dequantize``, which on an ordinary float Parameter returns the Parameter itself and (with requires_grad on)
    # turns the shared model's weight into a non-leaf tensor that Train Init can no longer freeze
    if type(weight) is not torch.Tensor and hasattr(weight, "dequantize"):
        weight = weight.dequantize()
    w = weight.to("cpu", torch.float32, copy=True)
    return convert(w, inplace=True) if convert is not None else w


def _delta(adapters: dict[str, torch.Tensor], module: str, shape: torch.Size) -> torch.Tensor:
    up = adapters[f"{module}.lora_up.weight"].float()
    down = adapters[f"{module}.lora_down.weight"].float()
    alpha = adapters.get(f"{module}.alpha")
    scale = (float(alpha) if alpha is not None else down.shape[0]) / down.shape[0]
    return scale * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)


def _row_norms(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1).norm(dim=1)


def norms(model, adapters: dict[str, torch.Tensor], module: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(||W|| per row + eps, ||W + dW|| per row + eps, W's ndim) for ``module``, eps as both sides add it."""
    w = base_weight(model, module)
    eps = torch.finfo(torch.float32).eps
    return _row_norms(w) + eps, _row_norms(w + _delta(adapters, module, w.shape)) + eps, w.dim()


def for_comfyui(model, adapters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``adapters`` with each trained output-axis magnitude ``<module>.dora_magnitude`` (out,) replaced by the
    ``<module>.dora_scale`` (out, 1, ...) that ComfyUI's loader turns into the same merged weight."""
    if not has_output_axis(adapters):
        return adapters
    out = {k: v for k, v in adapters.items() if not k.endswith("." + MAGNITUDE)}
    for key, m in adapters.items():
        if not key.endswith("." + MAGNITUDE):
            continue
        module = key[:-len(MAGNITUDE) - 1]
        w_norm, new_norm, ndim = norms(model, adapters, module)
        c = m.detach().float().cpu() * w_norm / new_norm
        out[f"{module}.dora_scale"] = c.reshape(-1, *[1] * (ndim - 1))
    return out


def from_comfyui(model, adapters: dict[str, torch.Tensor], module: str, dora_scale: torch.Tensor) -> torch.Tensor:
    """The trained magnitude ``m`` (out,) back from an output-axis ``dora_scale`` that ComfyUI reads (a file saved
    from an output-axis run), given the module's LoRA pair in ``adapters``: the inverse of ``for_comfyui``."""
    w_norm, new_norm, _ = norms(model, adapters, module)
    return dora_scale.detach().float().cpu().flatten() * new_norm / w_norm


def is_output_axis_scale(dora_scale: torch.Tensor, weight_shape) -> bool:
    """Whether a ``dora_scale`` is on the output axis, as ComfyUI's ``weight_decompose`` decides it: its first
    dimension is the weight's output size."""
    return dora_scale.shape[0] == weight_shape[0]
