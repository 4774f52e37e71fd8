"""The models the benchmarks train.

- ``tiny(c, tmp, family, n)``: the generated tiny SD1.5 checkpoint (loaded by ComfyUI's CheckpointLoaderSimple)
  or the tiny FLUX.1-dev bundle of ``tests/support/factories/families.py`` (ComfyUI's own classes), with its
  text encoder's conditioning and ``n`` random latents of a 64 px image.
- ``random_model(family, ...)``: a full-size (or, with ``tiny=True``, the tests' tiny) SDXL or FLUX.1-dev
  diffusion model built by the family's ``comfy.supported_models`` config, random weights drawn on the device
  (no download, no checkpoint file), plus random conditioning of the real shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

TINY_FAMILIES = ("sd15", "flux1")
GPU_FAMILIES = ("sdxl", "flux1")
CAPTION = "ohwx, a red circle, blue background"

# Full-size configs, as ComfyUI's model detection reads them from the released checkpoints
# (comfy/model_detection.py: the SDXL dict of unet_config_from_diffusers_unet; detect_unet_config for FLUX.1).
SDXL_FULL = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
    transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
    use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_temporal_attention=False, use_temporal_resblock=False,
)
FLUX_DEV_FULL = dict(
    image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
    mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
    qkv_bias=True, guidance_embed=True,
)


# Qwen-Image (20B): ComfyUI's model detection reads only these keys from the checkpoint (comfy/model_detection.py);
# the rest are QwenImageTransformer2DModel's defaults, which are the released model's (60 blocks of 24 x 128 heads,
# joint attention over the 3584-wide Qwen2.5-VL text states).
QWEN_IMAGE_FULL = dict(image_model="qwen_image", in_channels=64, num_layers=60)
QWEN_IMAGE_TINY = dict(image_model="qwen_image", in_channels=64, num_layers=1, attention_head_dim=32,
                       num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(8, 12, 12))


@dataclass
class Bundle:
    model: object          # ComfyUI ModelPatcher
    cond: list             # CONDITIONING
    latents: torch.Tensor  # (N, C, H, W)
    label: str


def tiny(c, tmp: Path, family: str, n_images: int) -> Bundle:
    """The tiny model of ``family`` (sd15 | flux1), its conditioning for CAPTION, ``n_images`` latents (64 px)."""
    g = torch.Generator().manual_seed(0)
    if family == "sd15":
        from support.factories import sd15

        link = tmp / "models/checkpoints/tiny-sd15.safetensors"
        if not link.exists():
            link.symlink_to(sd15.checkpoint())
        model, clip, _ = c.nodes.CheckpointLoaderSimple().load_checkpoint(link.name)
        latents = torch.randn(n_images, 4, 8, 8, generator=g)
        label = "tiny SD1.5 (one-level 320-ch UNet, CLIP-L context)"
    elif family == "flux1":
        from support.factories import families

        model, clip, _ = families.build("flux1-dev")
        latents = torch.randn(n_images, 16, 8, 8, generator=g)
        d = families.FLUX_DIT
        label = (f"tiny FLUX.1-dev (hidden {d['hidden_size']}, {d['depth']} double + {d['depth_single_blocks']} single "
                 "block, guidance embed, T5 context 256 tokens)")
    else:
        raise SystemExit(f"unknown family {family!r}; use one of {', '.join(TINY_FAMILIES)}")
    (cond,) = c.nodes.CLIPTextEncode().encode(clip, CAPTION)
    return Bundle(model, cond, latents, label)


def _config(family: str, tiny_size: bool):
    import comfy.supported_models as sm

    if tiny_size:
        from support.factories import families

        unet = {"sdxl": families.SDXL_UNET, "flux1": dict(families.FLUX_DIT, guidance_embed=True),
                "qwen_image": QWEN_IMAGE_TINY}[family]
    else:
        unet = {"sdxl": SDXL_FULL, "flux1": FLUX_DEV_FULL, "qwen_image": QWEN_IMAGE_FULL}[family]
    return {"sdxl": sm.SDXL, "flux1": sm.Flux, "qwen_image": sm.QwenImage}[family](dict(unet)), unet


@torch.no_grad()
def random_model(family: str, device: str, dtype: torch.dtype, tiny_size: bool = False, seed: int = 0):
    """ModelPatcher of a randomly initialised SDXL / FLUX.1-dev built by ComfyUI's supported_models config,
    weights in ``dtype`` on ``device`` (drawn there: no host copy of a 12B model)."""
    import comfy.model_patcher

    cfg, _ = _config(family, tiny_size)
    cfg.set_inference_dtype(dtype, None)
    model = cfg.get_model({}, "", device=torch.device(device))
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.diffusion_model.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, 0.02, generator=g)
        elif name.endswith("bias"):
            p.zero_()
        else:  # norm scales
            p.fill_(1.0)
    model.diffusion_model.to(device)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device(device),
                                            offload_device=torch.device(device))


def random_cond(family: str, tiny_size: bool, tokens: int | None = None) -> list:
    """CONDITIONING of the family's real shapes (SDXL: CLIP-L+G context 77x2048 and the 1280 pooled vector;
    FLUX.1: T5 context ``tokens`` x 4096 and the 768 CLIP-L pooled vector), random values."""
    _, unet = _config(family, tiny_size)
    g = torch.Generator().manual_seed(1)
    if family == "qwen_image":  # Qwen2.5-VL's last hidden states after the template prefix, no pooled vector
        return [[torch.randn(1, tokens or 512, unet.get("joint_attention_dim", 3584), generator=g), {}]]
    if family == "sdxl":
        ctx = torch.randn(1, tokens or 77, unet["context_dim"], generator=g)
        pooled = torch.randn(1, unet["adm_in_channels"] - 6 * 256, generator=g)
        return [[ctx, {"pooled_output": pooled}]]
    ctx = torch.randn(1, tokens or 512, unet["context_in_dim"], generator=g)
    pooled = torch.randn(1, unet["vec_in_dim"], generator=g)
    return [[ctx, {"pooled_output": pooled}]]


def latent_channels(family: str) -> int:
    return {"sd15": 4, "sdxl": 4, "flux1": 16, "qwen_image": 16}[family]
