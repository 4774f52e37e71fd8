"""Tiny model bundles built from ComfyUI's own classes (the loaders' code path, smaller sizes).

FLUX.1: ``comfy.supported_models.Flux`` -> ``model_base.Flux`` with a shrunk transformer (hidden 64, one
double and one single block), guidance embedding for dev and none for schnell, ComfyUI's 16-channel VAE
(``comfy.sd.VAE`` detecting a seeded AutoencoderKL state dict) and ComfyUI's FLUX text encoder (CLIP-L +
the shrunk T5 from text_encoders.py). SDXL and SD3 bundles are not written yet.
"""
from __future__ import annotations

import sys

import torch

from . import common
from .text_encoders import T5_TINY, clip_l_file, flux_clip, t5_tiny_file

NAMES = ("flux1-dev", "flux1-schnell")
FLUX_TINY = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=T5_TINY["d_model"],
                 hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12],
                 theta=10000, patch_size=2, qkv_bias=True)
VAE16 = dict(double_z=True, z_channels=16, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
             num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def _vae16(seed: int):
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    path = common.cached_file(f"vae16-s{seed}", common.source_key(sys.modules[__name__]))
    if not path.exists():
        vae = AutoencoderKL(ddconfig=VAE16, embed_dim=16)
        common.seeded_init_(vae, seed)
        common.atomic_save(vae.state_dict(), path)
    import comfy.utils

    return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))


def flux(name: str = "flux1-dev", seed: int = 0):
    """(MODEL, CLIP, VAE) of a tiny FLUX.1 dev/schnell."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    cfg = dict(FLUX_TINY, guidance_embed=name == "flux1-dev")
    model_config = comfy.supported_models.Flux(cfg)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device="cpu")
    common.seeded_init_(model.diffusion_model, seed)
    model.diffusion_model.float()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    return patcher, flux_clip(clip_l_file(), t5_tiny_file()), _vae16(seed + 5)


def build(name: str, seed: int = 0):
    if name.startswith("flux1"):
        return flux(name, seed)
    raise NotImplementedError(f"no tiny bundle for {name} yet (available: {NAMES})")
