"""Tiny Wan 2.2 models from ComfyUI's own classes.

- The A14B expert pair (:func:`expert_pair`): ComfyUI loads each Wan 2.2 A14B expert file (high-noise, low-noise)
  as ``WAN21_T2V`` (same architecture and detection as Wan 2.1 14B: ``image_model wan2.1``, ``model_type t2v``),
  so a tiny expert is the tiny ``WanModel`` of ``factories.wan`` with its own seeded weights; the pair is two
  such models. Nothing in the weights tells ComfyUI (or us) which expert a file is: the user picks it.
- The TI2V 5B (:func:`ti2v_model`): ``comfy.supported_models.WAN22_T2V`` (``out_dim`` 48, the config ComfyUI
  detects for the 5B) with the tiny WanModel widened to 48 input/output channels, wrapped by
  ``model_base.WAN22``; sampling settings (flow, shift 8) are the config's own.
- The Wan 2.2 VAE (:func:`ti2v_vae`): ``comfy.ldm.wan.vae2_2.WanVAE`` (48 latent channels, 16x spatial and 4x
  temporal compression) at width 8 (of 160). ``comfy.sd.VAE`` cannot build a tiny one: it reads no size from a Wan 2.2
  state dict and always builds ``dim=160``, ``dec_dim=256`` (705M parameters, of which 150M in the encoder), so
  the tiny VAE is ComfyUI's module built directly; its ``encode`` is the step ``comfy.sd.VAE.encode`` runs for
  this class (pixels in [-1, 1], ``(B, 3, T, H, W)``).
- The Wan 2.2 VAE as a ``comfy.sd.VAE`` (:func:`ti2v_comfy_vae`): ComfyUI detects it from the keys of a Wan 2.2 VAE
  file (its own 48 channels, 16x/4x ratios, decode and tiling code), then holds the width-8 module above in place
  of the 705M one it built (the only change: ``first_stage_model`` and its patcher).
"""
from __future__ import annotations

import sys

import torch

from . import common, te_wan, wan

HIGH_SEED, LOW_SEED = 20, 21
WAN22_5B_DIT = dict(wan.WAN21_DIT, in_dim=48, out_dim=48)
VAE_DIM = 8
SPATIAL = 16  # the Wan 2.2 VAE: 2x2 patchify + 8x


def expert_pair():
    """(high-noise, low-noise) MODELs: two tiny ``WAN21_T2V`` WanModels with their own seeded weights."""
    return wan.build_model(HIGH_SEED), wan.build_model(LOW_SEED)


class ExpertBundle:
    """One tiny A14B expert as the test-only loaders take a bundle (``build``, ``build_model``, ``te_wan``): the
    expert's MODEL with the tiny UMT5 and Wan 2.1 VAE (the A14B experts use Wan 2.1's VAE)."""
    te_wan = te_wan

    def __init__(self, seed: int):
        self.seed = seed

    def build_model(self):
        return wan.build_model(self.seed)

    def build(self):
        return self.build_model(), te_wan.wan_clip(), wan.build_vae()


HIGH, LOW = ExpertBundle(HIGH_SEED), ExpertBundle(LOW_SEED)


def _key() -> str:
    return common.source_key(sys.modules[__name__], wan)


def ti2v_config():
    import comfy.supported_models

    cfg = comfy.supported_models.WAN22_T2V(dict(WAN22_5B_DIT))
    cfg.set_inference_dtype(torch.float32, None)
    return cfg


def ti2v_model(seed: int = 30):
    """MODEL: ``WAN22_T2V``'s ``model_base.WAN22`` with the tiny 48-channel WanModel."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils

    def make():
        m = ti2v_config().get_model({}, "", device=mm.unet_offload_device())
        return {k: v.clone() for k, v in common.seeded_init_(m.diffusion_model, seed).state_dict().items()}

    path = common.cached_file(f"tiny-wan22-5b-dit-s{seed}", _key())
    if not path.exists():
        common.atomic_save(make(), path, metadata={"generator": "aligned-trainer tiny wan22 5b"})
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    model = ti2v_config().get_model({}, "", device=mm.unet_offload_device())
    assert set(sd) == set(model.diffusion_model.state_dict()), "tiny Wan 2.2 5B: cached weights do not cover it"
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def ti2v_vae(seed: int = 32):
    """ComfyUI's Wan 2.2 VAE module (``vae2_2.WanVAE``) at width 8 (encoder and decoder), seeded, in eval mode."""
    from comfy.ldm.wan.vae2_2 import WanVAE

    vae = WanVAE(dim=VAE_DIM, dec_dim=VAE_DIM, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True], dropout=0.0)
    return common.seeded_init_(vae, seed).eval()


# The two keys comfy.sd.VAE reads to detect the Wan 2.2 VAE, at the full model's shapes (dim 160, dec_dim 256).
WAN22_VAE_DETECT = {"decoder.middle.0.residual.0.gamma": (1024, 1, 1, 1),
                    "decoder.upsamples.0.upsamples.0.residual.2.weight": (1024, 1024, 3, 3, 3)}


def ti2v_comfy_vae(seed: int = 32):
    """VAE: ``comfy.sd.VAE`` detecting the Wan 2.2 VAE from a state dict holding only its detection keys (the rest
    of the 705M module it builds stays unwritten memory), with :func:`ti2v_vae`'s width-8 module in its place."""
    import comfy.ldm.wan.vae2_2
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd

    vae = comfy.sd.VAE(sd={k: torch.zeros(1).expand(shape) for k, shape in WAN22_VAE_DETECT.items()})
    assert isinstance(vae.first_stage_model, comfy.ldm.wan.vae2_2.WanVAE) and vae.latent_channels == 48
    tiny = ti2v_vae(seed).to(vae.vae_dtype)
    vae.first_stage_model = tiny
    vae.patcher = comfy.model_patcher.ModelPatcher(tiny, load_device=vae.device,
                                                   offload_device=mm.vae_offload_device())
    vae.size = None
    vae.model_size()
    return vae
