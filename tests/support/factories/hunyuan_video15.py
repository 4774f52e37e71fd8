"""A tiny HunyuanVideo 1.5 diffusion model from ComfyUI's own classes: ``comfy.supported_models.HunyuanVideo15``
(the config ComfyUI detects for the 480p/720p T2V and I2V checkpoints: ``vision_in_dim`` 1152) with a shrunk
``HunyuanVideo`` transformer, wrapped by ``model_base.HunyuanVideo15`` in a ``ModelPatcher``; sampling settings
(flow, shift 7) are the config's own.

Shrunk: hidden 64 in 2 heads of 32 (rope axes 8/12/12 of the head, as the full model splits 16/56/56 of 128),
1 double and 1 single block; kept: 32 latent channels, 65 input channels (noise 32 + image latent 32 + mask 1, as
``HunyuanVideo15.concat_cond`` builds them), patch (1, 1, 1), byT5 and SigLIP (1152) inputs, the condition-type
embedding. The text input width is 64 instead of Qwen2.5-VL 7B's 3584: no tiny Qwen2.5-VL text encoder is built
(as for Qwen-Image), so callers give text states of that width. No VAE: ComfyUI's HunyuanVideo 1.5 VAE is not
built here."""
from __future__ import annotations

import sys

import torch

from . import common

HV15_DIT = dict(image_model="hunyuan_video", in_channels=65, out_channels=32, patch_size=[1, 1, 1], vec_in_dim=None,
                context_in_dim=64, hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1,
                axes_dim=[8, 12, 12], theta=256, qkv_bias=True, guidance_embed=False, byt5=True, meanflow=False,
                use_cond_type_embedding=True, vision_in_dim=1152)


def model_config(context_in_dim: int = HV15_DIT["context_in_dim"]):
    import comfy.supported_models

    cfg = comfy.supported_models.HunyuanVideo15(dict(HV15_DIT, context_in_dim=context_in_dim))
    cfg.set_inference_dtype(torch.float32, None)
    return cfg


def build_model(seed: int = 0, context_in_dim: int = HV15_DIT["context_in_dim"]):
    """MODEL: ``HunyuanVideo15``'s model_base model with the tiny transformer, seeded weights (cached).
    ``context_in_dim``: the text width (128 takes the tiny Qwen2.5-VL of ``te_hunyuan_video15``)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils

    ctx = "" if context_in_dim == HV15_DIT["context_in_dim"] else f"-ctx{context_in_dim}"
    path = common.cached_file(f"tiny-hv15-dit-s{seed}{ctx}", common.source_key(sys.modules[__name__]))
    if not path.exists():
        m = model_config(context_in_dim).get_model({}, "", device=mm.unet_offload_device())
        sd = {k: v.clone() for k, v in common.seeded_init_(m.diffusion_model, seed).state_dict().items()}
        common.atomic_save(sd, path, metadata={"generator": "aligned-trainer tiny hunyuan video 1.5"})
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    model = model_config(context_in_dim).get_model({}, "", device=mm.unet_offload_device())
    assert set(sd) == set(model.diffusion_model.state_dict()), "tiny HunyuanVideo 1.5: cached weights do not cover it"
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())
