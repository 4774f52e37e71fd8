"""Tiny SDXL, SD3, FLUX.1 (dev/schnell), Z-Image, Chroma, Qwen-Image, Lumina 2, HiDream-I1 and FLUX.2 [dev] bundles built from
ComfyUI's own classes.

Each bundle is what ComfyUI's loaders hand out: a ``ModelPatcher`` around the family's ``comfy.model_base``
model, made by the family's ``comfy.supported_models`` config (``SDXL``, ``SD3``, ``Flux``, ``FluxSchnell``,
``ZImage``, ``Chroma``, ``QwenImage``, ``Lumina2``) with a shrunk UNet/transformer config; a ``comfy.sd.CLIP`` whose target comes from that
config's own ``clip_target`` (so the family's real text-encoder classes: ``SDXLClipModel``, ``SD3ClipModel``,
``FluxClipModel``, ``ZImageTEModel``, Chroma's ``PixArtT5XXL``), shrunk through ComfyUI's own per-encoder config
override
(``model_options["<clip_l|clip_g|t5xxl>_model_config"]``); and a ``comfy.sd.VAE`` that ComfyUI's VAE
detection builds from a state dict. Weights are loaded the way the loaders load them
(``load_model_weights``, ``CLIP.load_sd(full_model=True)``, ``VAE(sd=...)``) from seeded state dicts cached
in ``.work/cache/models`` under this module's source key.

What keeps its real size, and why:
- CLIP-L width 768 (3 of 12 layers): 768 is the pooled/vector width FLUX's ``vector_in`` and SD3's text
  encoder are written for. CLIP-G: width 320 (of 1280), 3 of 32 layers; ComfyUI's CLIP projects
  hidden->hidden, so its pooled vector is 320 wide too (SDXL's ADM input 320+1536, SD3's 768+320).
  3 layers is the minimum: SDXL/SD3 read layer -2.
- SD3's T5 keeps ``d_model`` 4096: ``sd3_clip`` pads CLIP-L+G to a hard-coded 4096 and concatenates T5 on
  the sequence axis. Everything else about it is tiny, but its 32128-token embedding alone is 132M
  parameters. FLUX's T5 has no such constraint: d_model 128.
- VAEs are full size: ComfyUI's detection of an SD-style VAE state dict hard-codes ch=128, ch_mult
  [1, 2, 4, 4] and reads only the latent channel count. SDXL uses the 4-channel KL VAE (with quant convs,
  as SDXL's VAE file has), SD3/FLUX the 16-channel one (without quant convs, as their VAE files have).
- FLUX's DiT: hidden 64 (2 heads of 32, axes 8/12/12), one double and one single block; dev has the
  guidance embedding, schnell does not. SD3's MMDiT: depth 2 (hidden 128, 2 heads; ComfyUI derives hidden
  = 64*depth), sin-cos position table of 64x64 patches. SDXL's UNet: 64/128 channels, two levels, the
  first without attention (as SDXL), one transformer block per attention level.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from . import common

NAMES = ("sdxl", "sd3", "flux1-dev", "flux1-schnell", "z-image", "chroma", "qwen-image", "lumina2", "hidream",
         "flux2-dev")

# ComfyUI's own text-encoder configs (sd1_clip_config.json, clip_config_bigg.json, t5_config_xxl.json),
# overridden key by key through model_options["<model_name>_model_config"].
CLIP_L = {"num_hidden_layers": 3}
CLIP_G = {"hidden_size": 320, "intermediate_size": 1280, "num_attention_heads": 5, "num_hidden_layers": 3}
T5_SD3 = {"num_layers": 2, "num_heads": 4, "d_kv": 16, "d_ff": 256}
T5_FLUX = dict(T5_SD3, d_model=128)
# ComfyUI's CLIP text_projection is hidden->hidden, so CLIP-G's pooled vector is as wide as its hidden state.
CLIP_L_WIDTH, CLIP_G_WIDTH = 768, CLIP_G["hidden_size"]
CLIP_G_POOLED = CLIP_G_WIDTH

SDXL_UNET = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, num_classes="sequential",
    adm_in_channels=CLIP_G_POOLED + 6 * 256, in_channels=4, out_channels=4, model_channels=64,
    num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1],
    transformer_depth_middle=1, use_linear_in_transformer=True, context_dim=CLIP_L_WIDTH + CLIP_G_WIDTH,
    use_temporal_attention=False, use_temporal_resblock=False,
)
SD3_MMDIT = dict(
    in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=CLIP_L_WIDTH + CLIP_G_POOLED,
    context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
    num_patches=64 * 64, pos_embed_max_size=64, pos_embed_scaling_factor=None, x_block_self_attn_layers=[],
)
FLUX_DIT = dict(
    image_model="flux", in_channels=16, out_channels=16, vec_in_dim=CLIP_L_WIDTH, context_in_dim=T5_FLUX["d_model"],
    hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000,
    patch_size=2, qkv_bias=True,
)
FLUX_TINY = FLUX_DIT  # earlier name, kept for callers
# Z-Image: ComfyUI's NextDiT (comfy/ldm/lumina/model.py) with the keys model_detection gives Z-Image (dim 3840 ->
# 30 heads, axes 32/48/48, rope theta 256, ffn 8/3, z_image_modulation, time_scale 1000, caption pad token), shrunk:
# dim 256 (the least z_image_modulation allows: its time embedding is 256 wide) = 2 heads of 128 (the real axes
# 32/48/48), one main and one refiner layer of each kind; caption width = the tiny Qwen3.
QWEN3 = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2,
         "num_key_value_heads": 1}
ZIMAGE_DIT = dict(
    image_model="lumina2", patch_size=2, in_channels=16, dim=256, cap_feat_dim=QWEN3["hidden_size"], n_layers=1,
    n_refiner_layers=1, qk_norm=True, n_heads=2, n_kv_heads=2, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
    rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32,
)
# Chroma: ComfyUI's Chroma DiT (comfy/ldm/chroma/model.py) with the keys model_detection gives Chroma (FLUX's
# blocks without per-block modulation, patchified 16-channel latents in: in/out_channels 64; a distilled guidance
# Approximator of in_dim 64 producing the 344 modulation vectors of out_dim = hidden), shrunk like FLUX's DiT:
# hidden 64 (2 heads of 32, axes 8/12/12), one double and one single block, Approximator hidden 128 and 1 layer
# (of 5); caption width = the tiny T5.
CHROMA_DIT = dict(
    image_model="chroma", in_channels=64, out_channels=64, context_in_dim=T5_FLUX["d_model"], hidden_size=64,
    mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, patch_size=2,
    qkv_bias=True, in_dim=64, out_dim=64, hidden_dim=128, n_layers=1,
)
# Qwen-Image: ComfyUI's QwenImage config and QwenImageTransformer2DModel (60 blocks of 24 x 128 heads in the 20B
# release), shrunk to two blocks (the last block's text-stream output is unused, as in the real model) of 2 x 32 heads
# over text states as wide as the tiny Qwen2.5-VL of
# support.factories.te_qwen_image (its language model through ComfyUI's own Qwen-Image text-encoder classes: the
# bundle's CLIP). Its VAE is the Wan 2.1 VAE (as Qwen-Image's own): support.factories.wan's tiny one.
QWEN_IMAGE_DIT = dict(image_model="qwen_image", in_channels=64, num_layers=2, attention_head_dim=32,
                      num_attention_heads=2, joint_attention_dim=128, axes_dims_rope=(8, 12, 12))
# Lumina 2 (Lumina-Image 2.0): ComfyUI's NextDiT with the keys model_detection gives the original Lumina 2 (dim 2304
# -> 24 heads of 96 with 8 key/value heads, axes 32/32/32, axes_lens 300/512/512, rope theta 10000, ffn x4), shrunk:
# dim 192 = 2 heads of 96 (the real axes) with 1 key/value head, one main and one refiner layer of each kind; caption
# width = the tiny Gemma-2 of support.factories.te_lumina2 (through ComfyUI's own Lumina 2 text-encoder classes).
LUMINA2_DIT = dict(
    image_model="lumina2", patch_size=2, in_channels=16, dim=192, cap_feat_dim=64, n_layers=1, n_refiner_layers=1,
    qk_norm=True, n_heads=2, n_kv_heads=1, axes_dims=[32, 32, 32], axes_lens=[300, 512, 512], rope_theta=10000.0,
    ffn_dim_multiplier=4.0,
)
# HiDream-I1: ComfyUI's HiDreamImageTransformer2DModel with the keys model_detection gives HiDream (20 heads of 128,
# axes 64/32/32, 16 double-stream + 32 single-stream blocks, each with a mixture of 4 routed experts (2 active) and a
# shared expert; caption projections: one per block for the Llama layer it reads (llama_layers) + one for T5; pooled
# CLIP-L + CLIP-G into the adaLN input), shrunk: 2 heads of 32 (axes 16/8/8, the real proportions), one double- and
# one single-stream block, the MoE kept (4 routed experts, 2 active); caption and pooled widths = the tiny encoders of
# support.factories.te_hidream (T5 128, Llama 64, CLIP-L 64 + CLIP-G 96 pooled), through ComfyUI's HiDream
# text-encoder classes. The double block reads the Llama stack's first layer, the single block its last (as the real
# model's first and last entries). Its VAE is FLUX's 16-channel VAE (ComfyUI's HiDream template loads ae.safetensors).
HIDREAM_DIT = dict(
    image_model="hidream", patch_size=2, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1,
    attention_head_dim=32, num_attention_heads=2, caption_channels=[128, 64], text_emb_dim=64 + 96,
    num_routed_experts=4, num_activated_experts=2, axes_dims_rope=[16, 8, 8], max_resolution=[128, 128],
    llama_layers=[0, 2],
)
# FLUX.2 [dev]: ComfyUI's Flux DiT with the keys model_detection gives FLUX.2 (image_model "flux2": 48 heads of 128 over
# four rope axes 32/32/32/32, theta 2000, mlp ratio 3 with SiLU-gated MLPs, no biases, modulation shared by all blocks
# (global_modulation), no pooled vector, 128-channel latents at patch size 1 (the VAE's 32 channels patchified 2x2),
# reference images placed by index (ref_index_scale 10); the guidance embedding of [dev]), shrunk like FLUX.1's tiny
# DiT: hidden 64 = 2 heads of 32 (four axes of 8), one double and one single block. Its caption is three stacked
# Mistral-Small hidden states (layers 10, 20, 30: width 3 x hidden, 15360 in the real model): here 3 x 64.
FLUX2_TE_HIDDEN = 64
FLUX2_DIT = dict(
    image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=3 * FLUX2_TE_HIDDEN,
    hidden_size=64, mlp_ratio=3.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 8, 8, 8], theta=2000,
    patch_size=1, qkv_bias=False, guidance_embed=True, global_modulation=True, mlp_silu_act=True, ops_bias=False,
    default_ref_method="index", ref_index_scale=10.0,
)
VAE_DDCONFIG = dict(double_z=True, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                    num_res_blocks=2, attn_resolutions=[], dropout=0.0)


@dataclass(frozen=True)
class Spec:
    config: str                  # class in comfy.supported_models
    unet: dict
    te_name: str                 # text encoders are shared between FLUX dev and schnell
    te: dict = field(default_factory=dict)      # model_name -> config override
    te_keys: tuple = ()          # one key per encoder: what the config's clip_target looks for
    vae_channels: int = 4
    vae_quant_conv: bool = True
    # families whose text encoder or VAE is not made from the config's clip_target / an SD-style KL VAE:
    # seed -> CLIP / VAE (Qwen-Image: the language model of Qwen2.5-VL only; the Wan 2.1 VAE)
    make_clip: object = None
    make_vae: object = None


_TE_MARK = "{}.transformer.text_model.final_layer_norm.weight"
_T5_MARK = "t5xxl.transformer.encoder.final_layer_norm.weight"
_QWEN3_MARK = "qwen3_4b.transformer.model.norm.weight"
SPECS = {
    "sdxl": Spec("SDXL", SDXL_UNET, "sdxl", {"clip_l": CLIP_L, "clip_g": CLIP_G},
                 (_TE_MARK.format("clip_l"), _TE_MARK.format("clip_g"))),
    "sd3": Spec("SD3", SD3_MMDIT, "sd3", {"clip_l": CLIP_L, "clip_g": CLIP_G, "t5xxl": T5_SD3},
                (_TE_MARK.format("clip_l"), _TE_MARK.format("clip_g"), _T5_MARK), 16, False),
    "flux1-dev": Spec("Flux", dict(FLUX_DIT, guidance_embed=True), "flux1", {"clip_l": CLIP_L, "t5xxl": T5_FLUX},
                      (_TE_MARK.format("clip_l"), _T5_MARK), 16, False),
    "flux1-schnell": Spec("FluxSchnell", dict(FLUX_DIT, guidance_embed=False), "flux1",
                          {"clip_l": CLIP_L, "t5xxl": T5_FLUX}, (_TE_MARK.format("clip_l"), _T5_MARK), 16, False),
    "z-image": Spec("ZImage", ZIMAGE_DIT, "z-image", {"qwen3_4b": QWEN3}, (_QWEN3_MARK,), 16, False),
    "chroma": Spec("Chroma", CHROMA_DIT, "chroma", {"t5xxl": T5_FLUX}, (_T5_MARK,), 16, False),
    "qwen-image": Spec("QwenImage", QWEN_IMAGE_DIT, "qwen-image", vae_channels=16, vae_quant_conv=False,
                       make_clip=lambda seed: _qwen_image_clip(seed), make_vae=lambda seed: _wan_vae(seed)),
    "lumina2": Spec("Lumina2", LUMINA2_DIT, "lumina2", vae_channels=16, vae_quant_conv=False,
                    make_clip=lambda seed: _lumina2_clip(seed)),
    "hidream": Spec("HiDream", HIDREAM_DIT, "hidream", vae_channels=16, vae_quant_conv=False,
                    make_clip=lambda seed: _hidream_clip()),
    "flux2-dev": Spec("Flux2", FLUX2_DIT, "flux2", vae_channels=32, make_clip=lambda seed: _flux2_clip(seed),
                      make_vae=lambda seed: _flux2_vae(seed)),
}


def _flux2_clip(seed: int):
    """ComfyUI's FLUX.2 text encoder (Flux2Tokenizer + flux2_te(): Mistral-Small-3.1 layers 10/20/30 stacked) around
    the tiny seeded Mistral of support.factories.te_flux2 (seed 70 + ``seed``: the default 1 gives the parity tests'
    file); its width x 3 is the tiny DiT's caption width."""
    from . import te_flux2

    assert 3 * te_flux2.MISTRAL_TINY["hidden_size"] == FLUX2_DIT["context_in_dim"]
    return te_flux2.flux2_clip(te_flux2.mistral_tiny_file(70 + seed))


def flux2_cond(seed: int, tokens: int = 16, guidance: float | None = None) -> list:
    """A seeded FLUX.2 CONDITIONING of the real layout (context: [1, tokens, 3 x Mistral hidden], the stacked layers
    10/20/30; no pooled output), as CLIPTextEncode gives it with the tiny encoder, for tests that need conditioning
    only (no text)."""
    emb = torch.randn(1, tokens, FLUX2_DIT["context_in_dim"], generator=torch.Generator().manual_seed(seed))
    extras = {"pooled_output": None}  # as CLIPTextEncode gives it for an encoder without a pooled output
    if guidance is not None:
        extras["guidance"] = guidance
    return [[emb, extras]]


def flux2_vae_state_dict(seed: int = 2) -> dict[str, torch.Tensor]:
    """A seeded FLUX.2 VAE in the layout of its file: the 32-channel KL VAE with quant convs and the batch-norm
    latent statistics (``bn.running_mean``/``running_var``, the key ComfyUI's VAE detection looks for)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    dd = dict(VAE_DDCONFIG, z_channels=32, batch_norm_latent=True)
    vae = AutoencoderKL(ddconfig=dd, embed_dim=32)
    common.seeded_init_(vae, seed)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():  # batch-norm statistics of a latent: means near 0, variances near 1 (never 0)
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g) * 0.1)
        vae.bn.running_var.copy_(1.0 + torch.rand(vae.bn.running_var.shape, generator=g))
    return {k: v.clone() for k, v in vae.state_dict().items()}


def flux2_vae_file(seed: int = 2):
    """The file of the tiny FLUX.2 VAE (what ``VAELoader`` loads as flux2-vae.safetensors; ComfyUI's detection builds
    it from the state dict)."""
    _cached(f"tiny-flux2-vae-s{seed}", lambda: flux2_vae_state_dict(seed))
    return common.cached_file(f"tiny-flux2-vae-s{seed}", _key())


def _flux2_vae(seed: int):
    import comfy.sd

    sd = _cached(f"tiny-flux2-vae-s{seed}", lambda: flux2_vae_state_dict(seed))
    vae = comfy.sd.VAE(sd=dict(sd))
    assert vae.latent_channels == 128, f"tiny flux2-dev: VAE detected {vae.latent_channels} channels (FLUX.2: 32 x 2 x 2)"
    return vae


def _hidream_clip():
    """ComfyUI's HiDream text encoders (HiDreamTokenizer + hidream_clip(): CLIP-L, CLIP-G, T5, Llama-3.1) around the
    tiny seeded encoders of support.factories.te_hidream (the parity tests' files)."""
    from . import te_hidream

    assert HIDREAM_DIT["caption_channels"] == [te_hidream.T5_TINY["d_model"], te_hidream.LLAMA_TINY["hidden_size"]]
    assert HIDREAM_DIT["text_emb_dim"] == te_hidream.CLIP_L_TINY["projection_dim"] + te_hidream.CLIP_G_TINY["projection_dim"]
    assert max(HIDREAM_DIT["llama_layers"]) < te_hidream.LLAMA_TINY["num_hidden_layers"]
    return te_hidream.hidream_clip(te_hidream.files())


def _lumina2_clip(seed: int):
    """ComfyUI's Lumina 2 text encoder (LuminaTokenizer + lumina2.te(), the tokenizer from the file's sentencepiece
    model) around a seeded tiny Gemma-2 (support.factories.te_lumina2, seed 50 + ``seed``: the default 1 gives the
    parity tests' file)."""
    from . import te_lumina2

    assert te_lumina2.GEMMA2_TINY["hidden_size"] == LUMINA2_DIT["cap_feat_dim"]
    return te_lumina2.lumina2_clip(te_lumina2.gemma2_tiny_file(50 + seed))


def _qwen_image_clip(seed: int):
    """ComfyUI's Qwen-Image text encoder (QwenImageTokenizer + qwen_image.te()) around a seeded tiny Qwen2.5-VL
    language model (support.factories.te_qwen_image, seed 40 + ``seed``: the default 1 gives the parity tests' file)."""
    from . import te_qwen_image

    return te_qwen_image.qwen_image_clip(te_qwen_image.qwen25vl_tiny_file(40 + seed))


def _wan_vae(seed: int):
    from . import wan

    return wan.build_vae(seed)


def _key() -> str:
    return common.source_key(sys.modules[__name__])


def _load(path) -> dict[str, torch.Tensor]:
    import comfy.utils

    return comfy.utils.load_torch_file(str(path), safe_load=True)


def _cached(name: str, make) -> dict[str, torch.Tensor]:
    path = common.cached_file(name, _key())
    if not path.exists():
        common.atomic_save(make(), path, metadata={"generator": f"aligned-trainer tiny {name}"})
    return _load(path)


@torch.no_grad()
def _seed_all_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seed every parameter; fill the buffers a checkpoint carries (SD3's sin-cos position table)."""
    common.seeded_init_(module, seed)
    pos = getattr(module, "pos_embed", None)
    if isinstance(pos, torch.Tensor):
        from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

        grid = int(round(pos.shape[1] ** 0.5))
        pos.copy_(torch.from_numpy(get_2d_sincos_pos_embed(pos.shape[2], grid)).float().unsqueeze(0))
    return module


def model_config(name: str):
    import comfy.supported_models

    spec = SPECS[name]
    cfg = getattr(comfy.supported_models, spec.config)(dict(spec.unet))
    cfg.set_inference_dtype(torch.float32, None)
    return cfg


def diffusion_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Freshly generated (uncached) seeded weights of the family's tiny diffusion model."""
    import comfy.model_management as mm

    model = model_config(name).get_model({}, "", device=mm.unet_offload_device())
    return {k: v.clone() for k, v in _seed_all_(model.diffusion_model, seed).state_dict().items()}


def build_model(name: str, seed: int = 0):
    """MODEL: the family's model_base model made by its supported_models config, weights loaded as loaders do."""
    import comfy.model_management as mm
    import comfy.model_patcher

    sd = _cached(f"tiny-{name}-dit-s{seed}", lambda: diffusion_state_dict(name, seed))
    model = model_config(name).get_model({}, "", device=mm.unet_offload_device())
    expected = set(model.diffusion_model.state_dict())
    assert set(sd) == expected, f"tiny {name}: cached weights do not cover the model ({set(sd) ^ expected})"
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def qwen_image_model(seed: int = 0):
    """MODEL: the tiny Qwen-Image diffusion model alone (seeded weights, loaded as loaders do)."""
    return build_model("qwen-image", seed)


def _clip_options(spec: Spec) -> dict:
    return {"dtype": torch.float32, **{f"{n}_model_config": dict(c) for n, c in spec.te.items()}}


def _clip_from(name: str, sd: dict[str, torch.Tensor], load: bool = True):
    """Like load_checkpoint_guess_config: target from the config's clip_target(state dict), then load_sd."""
    import comfy.sd

    spec, cfg = SPECS[name], model_config(name)
    prefix = cfg.text_encoder_key_prefix[0]
    target = cfg.clip_target({prefix + k: v for k, v in sd.items()})
    clip = comfy.sd.CLIP(target=target, model_options=_clip_options(spec))
    if load:
        missing, unexpected = clip.load_sd(sd, full_model=True)
        assert not missing and not unexpected, f"tiny {name} text encoders: missing {missing}, unexpected {unexpected}"
    return clip


def text_encoder_state_dict(name: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """Freshly generated seeded weights of the family's text encoders (keys as CLIP.cond_stage_model has them)."""
    spec = SPECS[name]
    marks = {k: torch.zeros(1) for k in spec.te_keys}
    clip = _clip_from(name, marks, load=False)
    clip_keys = set(clip.cond_stage_model.state_dict())
    assert set(marks) <= clip_keys, f"tiny {name}: text encoders lack {set(marks) - clip_keys}"
    return {k: v.clone() for k, v in common.seeded_init_(clip.cond_stage_model, seed).state_dict().items()}


def build_clip(name: str, seed: int = 1):
    """CLIP: the family's real text-encoder classes (shrunk through ComfyUI's config override), seeded."""
    spec = SPECS[name]
    if spec.make_clip is not None:
        return spec.make_clip(seed)
    sd = _cached(f"tiny-{spec.te_name}-te-s{seed}", lambda: text_encoder_state_dict(name, seed))
    return _clip_from(name, sd)


def vae_state_dict(channels: int, quant_conv: bool, seed: int = 2) -> dict[str, torch.Tensor]:
    """A seeded SD-style KL VAE in the layout ComfyUI's VAE detection reads (with or without quant convs)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL, AutoencodingEngine

    dd = dict(VAE_DDCONFIG, z_channels=channels)
    if quant_conv:
        vae = AutoencoderKL(ddconfig=dd, embed_dim=channels)
    else:
        vae = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": dd},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": dd})
    return {k: v.clone() for k, v in common.seeded_init_(vae, seed).state_dict().items()}


def build_vae(name: str, seed: int = 2):
    import comfy.sd

    spec = SPECS[name]
    if spec.make_vae is not None:
        return spec.make_vae(seed)
    q = "q" if spec.vae_quant_conv else ""
    sd = _cached(f"tiny-vae{spec.vae_channels}{q}-s{seed}", lambda: vae_state_dict(spec.vae_channels, spec.vae_quant_conv, seed))
    vae = comfy.sd.VAE(sd=dict(sd))
    assert vae.latent_channels == spec.vae_channels, f"tiny {name}: VAE detected {vae.latent_channels} channels"
    assert len(vae.first_stage_model.state_dict()) == len(sd), f"tiny {name}: VAE weights do not cover the model"
    return vae


def build(name: str, seed: int = 0):
    """(MODEL, CLIP, VAE) of the tiny ``name`` (one of ``NAMES``); components use seeds seed, seed+1, seed+2."""
    if name not in SPECS:
        raise ValueError(f"no tiny bundle named {name!r}; available: {', '.join(SPECS)}")
    return build_model(name, seed), build_clip(name, seed + 1), build_vae(name, seed + 2)


# Earlier entry point, kept for callers.
def flux(name: str = "flux1-dev", seed: int = 0):
    return build(name, seed)
