"""A tiny SD1.5 checkpoint that ComfyUI's stock ``CheckpointLoaderSimple`` detects as SD1.5.

Detection matches ``model_channels=320`` and ``context_dim=768`` at any depth, so the UNet has one
level (one res block + one transformer per stage); the text encoder is a real CLIP-L (transformers'
``CLIPTextModel`` with CLIP-L's shape, seeded) and the VAE is ComfyUI's SD ``AutoencoderKL`` with SD's
config. Weights are seeded; the file is fp16, as real checkpoints usually are.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from . import common

UNET_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
    channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1,
    use_spatial_transformer=True, context_dim=768, num_heads=8, use_linear_in_transformer=False,
    legacy=False, adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False,
)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
              projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
VAE_DDCONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                    ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def clip_l_state_dict(seed: int = 1) -> dict[str, torch.Tensor]:
    """A seeded CLIP-L text model in the key layout real checkpoints use (``text_model.*``)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval()
    sd = {}
    for k, v in model.state_dict().items():
        # transformers 5.x drops the `text_model.` prefix that checkpoints (and ComfyUI) use.
        key = k if k.startswith("text_model.") else f"text_model.{k}"
        sd[key] = v
    return sd


def build_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**UNET_CONFIG, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    common.seeded_init_(unet, seed)
    vae = AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4)
    common.seeded_init_(vae, seed + 2)
    sd = {}
    sd.update({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()})
    sd.update({f"cond_stage_model.transformer.{k}": v for k, v in clip_l_state_dict(seed + 1).items()})
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    return {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}


def checkpoint(seed: int = 0) -> Path:
    """Path of the tiny SD1.5 checkpoint (generated once, then cached)."""
    path = common.cached_file(f"tiny-sd15-s{seed}", common.source_key(sys.modules[__name__]))
    if not path.exists():
        common.atomic_save(build_state_dict(seed), path, metadata={"generator": "aligned-trainer tiny sd15"})
    return path


def vae_file(seed: int = 0) -> Path:
    """The tiny SD1.5 checkpoint's VAE as a standalone file for ComfyUI's ``VAELoader`` (models/vae): the
    checkpoint's ``first_stage_model.*`` tensors, prefix dropped, as standalone SD VAE files are laid out.
    Generated once from ``checkpoint(seed)``, then cached."""
    from safetensors.torch import load_file

    path = common.cached_file(f"tiny-sd15-vae-s{seed}", common.source_key(sys.modules[__name__]))
    if not path.exists():
        prefix = "first_stage_model."
        sd = {k[len(prefix):]: v for k, v in load_file(str(checkpoint(seed))).items() if k.startswith(prefix)}
        common.atomic_save(sd, path, metadata={"generator": "aligned-trainer tiny sd15 vae"})
    return path
