"""A tiny Wan 2.1 text-to-video bundle built from ComfyUI's own classes: ``(MODEL, CLIP, VAE)`` as the loaders
hand them out.

- MODEL: ``comfy.supported_models.WAN21_T2V`` (the config the 1.3B/14B T2V checkpoints and Wan 2.2's A14B
  experts load as) with a shrunk ``WanModel`` config, wrapped by ``model_base.WAN21`` in a ``ModelPatcher``;
  its sampling settings (flow, shift 8) are the config's own.
- CLIP: the tiny UMT5 of ``te_wan`` through ComfyUI's Wan text-encoder classes (``text_dim`` = its width).
- VAE: ComfyUI's Wan 2.1 VAE (``comfy.ldm.wan.vae.WanVAE``), made by ``comfy.sd.VAE`` from a state dict:
  ComfyUI reads only ``dim`` from the weights (``decoder.head.0.gamma``) and fixes the rest (16 latent
  channels, dim_mult [1, 2, 4, 4], 2 res blocks, 8x spatial and 4x temporal compression: 4k+1 frames in,
  k+1 latent frames out), so the tiny VAE is the real one at width 16 (of 96).

WanModel shrunk: dim 64 in 2 heads of 32 (the rope axes split 12/10/10 as ComfyUI splits a head), ffn 128,
2 blocks; freq_dim 256 and text_len 512 kept; patch (1, 2, 2).
"""
from __future__ import annotations

import sys

import torch

from . import common, te_wan

WAN21_DIT = dict(
    image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=64, ffn_dim=128,
    freq_dim=256, text_dim=te_wan.UMT5_SHRINK["d_model"], out_dim=16, num_heads=2, num_layers=2,
    window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6,
)
VAE_DIM = 16
TEMPORAL, SPATIAL = 4, 8  # the Wan 2.1 VAE's compression


def _key() -> str:
    return common.source_key(sys.modules[__name__])


def _cached(name: str, make) -> dict[str, torch.Tensor]:
    import comfy.utils

    path = common.cached_file(name, _key())
    if not path.exists():
        common.atomic_save(make(), path, metadata={"generator": f"aligned-trainer tiny {name}"})
    return comfy.utils.load_torch_file(str(path), safe_load=True)


def model_config():
    import comfy.supported_models

    cfg = comfy.supported_models.WAN21_T2V(dict(WAN21_DIT))
    cfg.set_inference_dtype(torch.float32, None)
    return cfg


def diffusion_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    import comfy.model_management as mm

    model = model_config().get_model({}, "", device=mm.unet_offload_device())
    return {k: v.clone() for k, v in common.seeded_init_(model.diffusion_model, seed).state_dict().items()}


def build_model(seed: int = 0, weight_dtype: torch.dtype | None = None):
    """MODEL: ``WAN21_T2V``'s model_base model with the tiny WanModel, weights loaded as the loaders do;
    ``weight_dtype`` (e.g. fp8 e4m3fn): as ``UNETLoader``'s weight_dtype makes ComfyUI load it (the config's
    inference dtype with the manual-cast compute dtype ComfyUI picks for the device, then the weights)."""
    import comfy.model_management as mm
    import comfy.model_patcher

    sd = _cached(f"tiny-wan21-dit-s{seed}", lambda: diffusion_state_dict(seed))
    cfg = model_config()
    if weight_dtype is not None:
        load_device = mm.get_torch_device()
        cfg.set_inference_dtype(weight_dtype, mm.unet_manual_cast(weight_dtype, load_device,
                                                                 cfg.supported_inference_dtypes))
    model = cfg.get_model({}, "", device=mm.unet_offload_device())
    expected = set(model.diffusion_model.state_dict())
    assert set(sd) == expected, f"tiny Wan 2.1: cached weights do not cover the model ({set(sd) ^ expected})"
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def vae_state_dict(seed: int = 2) -> dict[str, torch.Tensor]:
    from comfy.ldm.wan.vae import WanVAE

    vae = WanVAE(dim=VAE_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True], dropout=0.0)
    return {k: v.clone() for k, v in common.seeded_init_(vae, seed).state_dict().items()}


def vae_file(seed: int = 2):
    """The tiny Wan 2.1 VAE as a file the stock ``VAELoader`` reads (ComfyUI detects it from its keys)."""
    _cached(f"tiny-wan21-vae-s{seed}", lambda: vae_state_dict(seed))
    return common.cached_file(f"tiny-wan21-vae-s{seed}", _key())


def build_vae(seed: int = 2):
    """VAE: ComfyUI's Wan 2.1 VAE, detected by ``comfy.sd.VAE`` from the tiny state dict."""
    import comfy.ldm.wan.vae
    import comfy.sd

    sd = _cached(f"tiny-wan21-vae-s{seed}", lambda: vae_state_dict(seed))
    vae = comfy.sd.VAE(sd=dict(sd))
    assert isinstance(vae.first_stage_model, comfy.ldm.wan.vae.WanVAE), type(vae.first_stage_model)
    assert vae.latent_channels == 16 and vae.first_stage_model.dim == VAE_DIM
    assert len(vae.first_stage_model.state_dict()) == len(sd), "tiny Wan VAE: weights do not cover the model"
    return vae


def build(seed: int = 0):
    """(MODEL, CLIP, VAE) of the tiny Wan 2.1 T2V; the components use seeds seed, te_wan's, seed + 2."""
    return build_model(seed), te_wan.wan_clip(), build_vae(seed + 2)
