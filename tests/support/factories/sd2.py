"""A tiny SD2.x (768-v) bundle built from ComfyUI's own classes: the ``SD20`` config and its UNet, the SD2 text
encoder (``SD2ClipModel`` with the tiny OpenCLIP-H of ``te_more``) and the 4-channel SD VAE.

The prediction type comes from ComfyUI's own detection, ``SD20.model_type``: an SD2 UNet is v-prediction when the
norm bias of ``output_blocks.11.1.transformer_blocks.0`` has a standard deviation over 0.09 (trained 768-v weights
do; the 512 eps weights do not). The tiny UNet therefore keeps SD2's layout of four levels with two res blocks
each (12 output blocks; linear projections, 64-channel heads), at 64 channels and a context width of the tiny
CLIP-H (192), with attention on the first level and in the middle only (SD2 also has it on levels 2 and 3: left
out to keep the tests fast); the ``v`` bundle's seeded weights give that
bias a spread of 0.2, the ``eps`` twin leaves it at 0. Both are ``SD20.get_model(state_dict)``, weights loaded
as the loaders load them.
"""
from __future__ import annotations

import sys

import torch

from . import common, families, te_more

UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=64, num_res_blocks=[2, 2, 2, 2],
    channel_mult=[1, 1, 1, 1], transformer_depth=[1] * 2 + [0] * 6, transformer_depth_output=[1] * 3 + [0] * 9,
    transformer_depth_middle=1, use_spatial_transformer=True, context_dim=te_more.CLIP_H_TINY["hidden_size"],
    use_linear_in_transformer=True, legacy=False, adm_in_channels=None, use_temporal_attention=False,
    use_temporal_resblock=False,
)
V_MARK = "output_blocks.11.1.transformer_blocks.0.norm1.bias"  # what SD20.model_type reads


def model_config():
    import comfy.supported_models

    cfg = comfy.supported_models.SD20(dict(UNET))
    cfg.set_inference_dtype(torch.float32, None)
    return cfg


def unet_state_dict(v_prediction: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    import comfy.model_management as mm

    model = model_config().get_model({}, "", device=mm.unet_offload_device())
    sd = {k: v.clone() for k, v in common.seeded_init_(model.diffusion_model, seed).state_dict().items()}
    if v_prediction:
        sd[V_MARK] = torch.randn(sd[V_MARK].shape, generator=torch.Generator().manual_seed(seed + 7)) * 0.2
    return sd


def build_model(v_prediction: bool = True, seed: int = 0):
    """MODEL: ``SD20.get_model`` on the seeded weights (so ComfyUI decides eps or v), weights loaded."""
    import comfy.model_management as mm
    import comfy.model_patcher

    kind = "v" if v_prediction else "eps"
    path = common.cached_file(f"tiny-sd2-{kind}-unet-s{seed}", common.source_key(sys.modules[__name__]))
    if not path.exists():
        common.atomic_save(unet_state_dict(v_prediction, seed), path)
    sd = families._load(path)
    model = model_config().get_model(sd, "", device=mm.unet_offload_device())
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def build_clip():
    return te_more.sd2_clip(te_more.clip_h_file())


def build_vae(seed: int = 2):
    import comfy.sd

    sd = families._cached(f"tiny-vae4q-s{seed}", lambda: families.vae_state_dict(4, True, seed))  # SDXL's VAE
    return comfy.sd.VAE(sd=dict(sd))


def build(v_prediction: bool = True, seed: int = 0):
    """(MODEL, CLIP, VAE) of the tiny SD2.x; ``v_prediction`` picks the 768-v or the 512 eps weights."""
    return build_model(v_prediction, seed), build_clip(), build_vae(seed + 2)
