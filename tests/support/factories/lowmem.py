"""The tiny family models (``families``) loaded the way ComfyUI loads a diffusion model with a weight dtype:
``UNETLoader``'s ``weight_dtype`` (fp8_e4m3fn, fp8_e5m2) becomes ``model_options["dtype"]``, and
``comfy.sd.load_diffusion_model_state_dict`` then picks the compute (manual cast) dtype, sets the config's
inference dtype, builds the model with the operations ComfyUI picks for it (``comfy.ops.manual_cast`` on a
device without fp8 compute) and loads the weights. ComfyUI's detection cannot read the tiny FLUX.1 from a
file (its head count is fixed at 24), so the same lines run here on the family's config.

Scaled fp8 (``scaled=True``): the state dict a scaled-fp8 checkpoint carries: each Linear weight stored as
fp8 ``W / s`` with its ``scale_weight`` ``s`` (per tensor), and the config's ``scaled_fp8`` dtype, which makes
ComfyUI build ``comfy.ops.scaled_fp8_ops`` layers, as ``model_detection`` does for a file with a
``scaled_fp8`` key."""
from __future__ import annotations

import torch

from . import families


def scaled_fp8_state_dict(sd: dict[str, torch.Tensor], model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = dict(sd)
    fmax = torch.finfo(dtype).max
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and f"{name}.weight" in sd:
            w = sd[f"{name}.weight"].float()
            scale = (w.abs().max() / fmax).clamp(min=1e-12)
            out[f"{name}.weight"] = (w / scale).to(dtype)
            out[f"{name}.scale_weight"] = scale.reshape(())
    return out


def build_model(name: str, dtype: torch.dtype, seed: int = 0, scaled: bool = False):
    """MODEL of the tiny ``name`` loaded with weight dtype ``dtype`` (as ComfyUI's loader does it)."""
    import comfy.model_management as mm
    import comfy.model_patcher

    sd = families._cached(f"tiny-{name}-dit-s{seed}", lambda: families.diffusion_state_dict(name, seed))
    cfg = families.model_config(name)
    load_device = mm.get_torch_device()
    if scaled:
        cfg.scaled_fp8 = dtype
    manual_cast = mm.unet_manual_cast(dtype, load_device, cfg.supported_inference_dtypes)
    cfg.set_inference_dtype(dtype, manual_cast)
    model = cfg.get_model(sd, "")
    model = model.to(mm.unet_offload_device())
    if scaled:
        sd = scaled_fp8_state_dict(sd, model.diffusion_model, dtype)
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())
