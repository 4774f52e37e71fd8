"""The official diffusers models built from the SAME base weights as the tiny ComfyUI models, with diffusers'
own single-file converters (``diffusers.loaders.single_file_utils``), and wrapped in the family's diffusers
pipeline so that its standard ``load_lora_weights(path)`` can be called."""
from __future__ import annotations

import torch

from . import families
from . import sd15 as sd15_factory
from .loaded import no_random_init


def sd15_original_config() -> dict:
    """The LDM config (the original ``v1-inference.yaml`` layout) of the tiny SD1.5 checkpoint: the input
    diffusers' ``create_unet_diffusers_config_from_ldm`` reads."""
    u = sd15_factory.UNET_CONFIG
    unet_params = dict(in_channels=u["in_channels"], out_channels=u["out_channels"],
                       model_channels=u["model_channels"], attention_resolutions=[1],  # attention at every level
                       num_res_blocks=u["num_res_blocks"][0], channel_mult=u["channel_mult"],
                       num_heads=u["num_heads"], use_spatial_transformer=True, transformer_depth=1,
                       context_dim=u["context_dim"], use_linear_in_transformer=u["use_linear_in_transformer"],
                       legacy=False)
    return {"model": {"params": {"unet_config": {"params": unet_params},
                                 "first_stage_config": {"params": {"ddconfig": sd15_factory.VAE_DDCONFIG}}}}}


def sd15_unet(checkpoint_path) -> torch.nn.Module:
    """diffusers' UNet2DConditionModel (fp32) converted from the tiny SD1.5 checkpoint file."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    from safetensors.torch import load_file

    ckpt = {k: v.float() for k, v in load_file(str(checkpoint_path)).items()}
    config = create_unet_diffusers_config_from_ldm(sd15_original_config(), ckpt)
    with no_random_init():
        unet = UNet2DConditionModel(**config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, config), strict=True)
    return unet.eval()


def sdxl_original_config() -> dict:
    """The SGM config (``sd_xl_base.yaml``'s ``network_config`` layout) of the tiny SDXL UNet
    (``families.SDXL_UNET``): attention at the second level only, 64-channel heads as ComfyUI's SDXL uses."""
    u = families.SDXL_UNET
    params = dict(in_channels=u["in_channels"], out_channels=u["out_channels"], model_channels=u["model_channels"],
                  attention_resolutions=[2 ** i for i, d in enumerate(u["transformer_depth"]) if d],
                  num_res_blocks=u["num_res_blocks"][0], channel_mult=u["channel_mult"], num_head_channels=64,
                  use_linear_in_transformer=u["use_linear_in_transformer"], transformer_depth=u["transformer_depth"],
                  context_dim=u["context_dim"], num_classes="sequential", adm_in_channels=u["adm_in_channels"],
                  legacy=False)
    return {"model": {"params": {"network_config": {"params": params},
                                 "first_stage_config": {"params": {"ddconfig": families.VAE_DDCONFIG}}}}}


def sdxl_unet(diffusion_state_dict: dict) -> torch.nn.Module:
    """diffusers' UNet2DConditionModel (fp32) converted from the tiny SDXL's diffusion-model weights (ComfyUI's
    = the original SGM names). diffusers' ``create_unet_diffusers_config_from_ldm`` recognises SDXL's size
    conditioning only by the full-size context width (2048 or 1280); the tiny one is 1088 wide, so the config it
    derives is corrected to SDXL's ``text_time`` embedding (what it sets for the full-size model). The weights
    are converted by diffusers' own ``convert_ldm_unet_checkpoint``."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    ckpt = {"model.diffusion_model." + k: v.float() for k, v in diffusion_state_dict.items()}
    config = create_unet_diffusers_config_from_ldm(sdxl_original_config(), ckpt)
    config.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=256)
    with no_random_init():
        unet = UNet2DConditionModel(**config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, config), strict=True)
    return unet.eval()


def sdxl_pipeline(unet):
    """A StableDiffusionXLPipeline around ``unet`` (no text encoders: the LoRAs under test have UNet keys only)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=EulerDiscreteScheduler())


def sd3_pipeline(diffusion_state_dict: dict):
    """A StableDiffusion3Pipeline around diffusers' SD3Transformer2DModel converted from the tiny SD3's MMDiT weights
    with diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` (every key must match); the model config is
    written from the tiny factory's ``families.SD3_MMDIT`` (ComfyUI: hidden = 64 * depth, heads = depth)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    u = families.SD3_MMDIT
    ctx = u["context_embedder_config"]["params"]
    with no_random_init():
        transformer = SD3Transformer2DModel(
            sample_size=32, patch_size=u["patch_size"], in_channels=u["in_channels"], out_channels=u["out_channels"],
            num_layers=u["depth"], attention_head_dim=64, num_attention_heads=u["depth"],
            joint_attention_dim=ctx["in_features"], caption_projection_dim=ctx["out_features"],
            pooled_projection_dim=u["adm_in_channels"], pos_embed_max_size=u["pos_embed_max_size"])
    converted = convert_sd3_transformer_checkpoint_to_diffusers({k: v.float().clone()
                                                                 for k, v in diffusion_state_dict.items()})
    transformer.load_state_dict(converted, strict=True)
    return StableDiffusion3Pipeline(transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)


def sd_pipeline(unet):
    """A StableDiffusionPipeline around ``unet`` (no text encoder: the LoRAs under test have UNet keys only)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def lora_modules(model, adapter_name: str = "default_0") -> list[str]:
    """Names of the modules of a diffusers model that carry a loaded peft LoRA adapter."""
    return sorted(n for n, m in model.named_modules()
                  if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and adapter_name in m.lora_A)


# FLUX.1 at the width diffusers' FLUX converters hard-code (3072: inner_dim in
# convert_flux_transformer_checkpoint_to_diffusers, dims=[3072]*3+[12288] in _convert_kohya_flux_lora_to_diffusers),
# with one double and one single block and the tiny family's small text/vector widths. 24 heads of 128, rope axes
# 16/56/56 as FLUX.1's own config (black-forest-labs/flux, flux1-dev params).
FLUX_FULL_WIDTH = dict(families.FLUX_DIT, hidden_size=3072, num_heads=24, axes_dim=[16, 56, 56], guidance_embed=True)


def flux_full_width_model(seed: int = 0):
    """MODEL: ComfyUI's FLUX.1 dev model (``supported_models.Flux``, fp32) at ``FLUX_FULL_WIDTH``, seeded weights (not
    cached: ~2 GB)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    from .common import seeded_init_

    cfg = comfy.supported_models.Flux(dict(FLUX_FULL_WIDTH))
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, "", device=mm.unet_offload_device())
    with torch.no_grad():
        seeded_init_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def flux_pipeline(diffusion_state_dict: dict):
    """A FluxPipeline around diffusers' FluxTransformer2DModel converted from ComfyUI's FLUX.1 weights with diffusers'
    ``convert_flux_transformer_checkpoint_to_diffusers`` (every key must match). The converter takes the tensors as
    they are (no copy where it does not fuse or reorder), and the model is built on the meta device and takes them
    by assignment, so the diffusers model shares the weights it does not reorder with ComfyUI's model: neither side
    may change base weights while the other is used."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    u = FLUX_FULL_WIDTH
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=u["in_channels"] * u["patch_size"] ** 2, out_channels=None,
            num_layers=u["depth"], num_single_layers=u["depth_single_blocks"],
            attention_head_dim=u["hidden_size"] // u["num_heads"], num_attention_heads=u["num_heads"],
            joint_attention_dim=u["context_in_dim"], pooled_projection_dim=u["vec_in_dim"],
            guidance_embeds=u["guidance_embed"], axes_dims_rope=tuple(u["axes_dim"]))
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(diffusion_state_dict))
    transformer.load_state_dict(converted, strict=True, assign=True)
    return FluxPipeline(transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)


def hidream_transformer_pipeline(diffusion_state_dict: dict):
    """diffusers' HiDreamImagePipeline around a HiDreamImageTransformer2DModel of the tiny HiDream config
    (``families.HIDREAM_DIT``) holding ComfyUI's weights (the module names are the same: loaded strictly); no text
    encoders or VAE (``load_lora_weights`` loads into the transformer only; callers feed it conditioning directly)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel

    cfg = {k: v for k, v in families.HIDREAM_DIT.items() if k != "image_model"}
    transformer = HiDreamImageTransformer2DModel(**cfg).eval()
    transformer.load_state_dict(diffusion_state_dict, strict=True)
    none = {f"{part}{i}": None for part in ("text_encoder", "tokenizer") for i in ("", "_2", "_3", "_4")}
    return HiDreamImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, transformer=transformer, **none)


def flux2_pipeline(diffusion_state_dict: dict):
    """diffusers' Flux2Pipeline around a Flux2Transformer2DModel of the tiny FLUX.2 config (``families.FLUX2_DIT``)
    holding ComfyUI's weights converted with diffusers' ``convert_flux2_transformer_checkpoint_to_diffusers`` (every
    key must match); no text encoder or VAE (``load_lora_weights`` loads into the transformer only)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    u = families.FLUX2_DIT
    transformer = Flux2Transformer2DModel(
        patch_size=u["patch_size"], in_channels=u["in_channels"], out_channels=u["out_channels"], num_layers=u["depth"],
        num_single_layers=u["depth_single_blocks"], attention_head_dim=u["hidden_size"] // u["num_heads"],
        num_attention_heads=u["num_heads"], joint_attention_dim=u["context_in_dim"], mlp_ratio=u["mlp_ratio"],
        axes_dims_rope=tuple(u["axes_dim"]), rope_theta=u["theta"], guidance_embeds=u["guidance_embed"]).eval()
    converted = convert_flux2_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in diffusion_state_dict.items()})
    transformer.load_state_dict(converted, strict=True)
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                         transformer=transformer)
