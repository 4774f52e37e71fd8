"""A tiny HunyuanVideo 1.5 diffusion model from ComfyUI's own classes: ``comfy.supported_models.HunyuanVideo15``
(the config ComfyUI detects for the 480p/720p T2V and I2V checkpoints: ``vision_in_dim`` 1152) with a shrunk
``HunyuanVideo`` transformer, wrapped by ``model_base.HunyuanVideo15`` in a ``ModelPatcher``; sampling settings
(flow, shift 7) are the config's own.

Shrunk: hidden 64 in 2 heads of 32 (rope axes 8/12/12 of the head, as the full model splits 16/56/56 of 128),
1 double and 1 single block; kept: 32 latent channels, 65 input channels (noise 32 + image latent 32 + mask 1, as
``HunyuanVideo15.concat_cond`` builds them), patch (1, 1, 1), byT5 and SigLIP (1152) inputs, the condition-type
embedding. The text input width is 64 instead of Qwen2.5-VL 7B's 3584 (``context_in_dim`` 128 takes the tiny
Qwen2.5-VL of ``te_hunyuan_video15``).

The VAE (:func:`comfy_vae`): ``comfy.sd.VAE`` detects the HunyuanVideo 1.5 VAE from the one key it reads in a VAE
file (``decoder.conv_in.conv.weight`` with 32 latent channels: ComfyUI's ``AutoencodingEngine`` with
``comfy.ldm.hunyuan_video.vae_refiner`` ``Encoder`` / ``Decoder``, 16x spatial and 4x temporal compression, its
own encode, decode and tiling code) and always builds ``block_out_channels`` [128, 256, 512, 1024, 1024] whatever
the file holds; the tiny one is the same engine and classes built at [8, 16, 32, 64, 64] with one res block per
stage (of 2; :func:`vae_module`), held in place of the full-size module ComfyUI built (as ``wan22.ti2v_comfy_vae``).
64 is the least last width: the encoder's output skip averages groups of it into 2 x 32 channels."""
from __future__ import annotations

import sys

import torch

from . import common, te_hunyuan_video15

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


VAE_CONFIG = {"block_out_channels": [8, 16, 32, 64, 64], "in_channels": 3, "out_channels": 3, "num_res_blocks": 1,
              "ffactor_spatial": 16, "ffactor_temporal": 4, "downsample_match_channel": True,
              "upsample_match_channel": True, "z_channels": 32}
SPATIAL, TEMPORAL, LATENT_CHANNELS = 16, 4, 32
# The key comfy.sd.VAE reads to detect the HunyuanVideo 1.5 VAE, at the full model's shape (1024 <- 32 channels).
VAE_DETECT = {"decoder.conv_in.conv.weight": (1024, 32, 3, 3, 3)}


def vae_module(seed: int = 52):
    """ComfyUI's HunyuanVideo 1.5 VAE module (``AutoencodingEngine`` of the ``vae_refiner`` Encoder / Decoder, as
    ``comfy.sd.VAE`` configures it) at :data:`VAE_CONFIG`'s widths, seeded, in eval mode."""
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    m = AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.EmptyRegularizer"},
        encoder_config={"target": "comfy.ldm.hunyuan_video.vae_refiner.Encoder", "params": dict(VAE_CONFIG)},
        decoder_config={"target": "comfy.ldm.hunyuan_video.vae_refiner.Decoder", "params": dict(VAE_CONFIG)})
    return common.seeded_init_(m, seed).eval()


def comfy_vae(seed: int = 52):
    """VAE: ``comfy.sd.VAE`` detecting the HunyuanVideo 1.5 VAE from a state dict holding only its detection key
    (the full-size module it builds stays unwritten memory), with :func:`vae_module`'s tiny module in its place."""
    import comfy.ldm.hunyuan_video.vae_refiner as refiner
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd

    vae = comfy.sd.VAE(sd={k: torch.zeros(1).expand(shape) for k, shape in VAE_DETECT.items()})
    assert isinstance(vae.first_stage_model.encoder, refiner.Encoder) and vae.latent_channels == LATENT_CHANNELS
    tiny = vae_module(seed).to(vae.vae_dtype)
    vae.first_stage_model = tiny
    vae.patcher = comfy.model_patcher.ModelPatcher(tiny, load_device=vae.device, offload_device=mm.vae_offload_device())
    vae.size = None
    vae.model_size()
    return vae


def build_clip():
    """CLIP: the tiny Qwen2.5-VL + byT5 of ``te_hunyuan_video15`` in ComfyUI's HunyuanVideo 1.5 classes."""
    te = te_hunyuan_video15
    return te.hv15_clip(te.qwen25vl_tiny_file(), te.byt5_tiny_file())


class Bundle:
    """The tiny text-to-video bundle as the test-only loaders take one: the transformer at the tiny Qwen2.5-VL's
    text width, its text encoders and the tiny VAE."""

    @staticmethod
    def build_model():
        from . import te_qwen_image

        return build_model(context_in_dim=te_qwen_image.QWEN25VL_TINY["hidden_size"])

    build_clip = staticmethod(build_clip)
    build_vae = staticmethod(comfy_vae)

    def build(self):
        return self.build_model(), self.build_clip(), self.build_vae()


BUNDLE = Bundle()
