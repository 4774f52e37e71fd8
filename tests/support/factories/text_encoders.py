"""Seeded text encoders saved as files ComfyUI's loaders read, plus the same weights as transformers
models for the reference pipelines. Tokenizers come from the files ComfyUI ships (no downloads)."""
from __future__ import annotations

import functools

import sys
from pathlib import Path

import torch

from . import common
from .loaded import no_random_init
from .sd15 import CLIP_L, clip_l_state_dict


def comfy_tokenizer_dir(name: str) -> Path:
    """Tokenizer folders ComfyUI ships: ``sd1`` (CLIP BPE) and ``t5``."""
    import comfy.sd1_clip

    root = Path(comfy.sd1_clip.__file__).parent
    return {"sd1": root / "sd1_tokenizer", "t5": root / "text_encoders" / "t5_tokenizer"}[name]


def clip_l_file(seed: int = 11) -> Path:
    """A CLIP-L text encoder (fp32 safetensors, ``text_model.*`` keys) for ``CLIPLoader``/``load_clip``."""
    path = common.cached_file(f"clip-l-s{seed}", common.source_key(sys.modules[__name__], sys.modules["support.factories.sd15"]))
    if not path.exists():
        common.atomic_save(clip_l_state_dict(seed), path)
    return path


def clip_l_transformers(path: Path):
    """The same weights as a transformers ``CLIPTextModel`` (fp32, eval) and its tokenizer."""
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with no_random_init():
        model = CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval()
    sd = load_file(str(path))
    missing, unexpected = model.load_state_dict(
        {k if k in model.state_dict() else k.removeprefix("text_model."): v for k, v in sd.items()}, strict=False)
    assert not [m for m in missing if "position_ids" not in m], missing
    # openai/clip-vit-large-patch14's tokenizer_config has model_max_length=77; ComfyUI's copy does not.
    tok = CLIPTokenizer.from_pretrained(str(comfy_tokenizer_dir("sd1")), model_max_length=77)
    return model, tok


def load_comfy_clip(paths: list[Path], clip_type: str, embedding_directory=None):
    """Load text-encoder files the way ComfyUI's CLIPLoader does, computing in fp32."""
    import comfy.sd

    ct = getattr(comfy.sd.CLIPType, clip_type.upper())
    return comfy.sd.load_clip(ckpt_paths=[str(p) for p in paths], clip_type=ct,
                              embedding_directory=embedding_directory, model_options={"dtype": torch.float32})


# --- FLUX.1: CLIP-L + a shrunk T5 (same class and code path as T5-XXL, fewer/narrower layers) -----------
T5_TINY = {"d_ff": 256, "d_kv": 16, "d_model": 128, "num_heads": 4, "num_layers": 2, "dense_act_fn": "gelu_pytorch_tanh",
           "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "relative_attention_num_buckets": 32,
           "relative_attention_max_distance": 128, "vocab_size": 32128, "eos_token_id": 1, "pad_token_id": 0,
           "decoder_start_token_id": 0, "is_encoder_decoder": True, "tie_word_embeddings": False,
           "feed_forward_proj": "gated-gelu"}


def t5_tiny_file(seed: int = 12) -> Path:
    """A seeded tiny T5 encoder in the HF key layout ComfyUI's T5 loads (fp32 safetensors)."""
    path = common.cached_file(f"t5-tiny-s{seed}", common.source_key(sys.modules[__name__]))
    if not path.exists():
        from transformers import T5Config, T5EncoderModel

        torch.manual_seed(seed)
        model = T5EncoderModel(T5Config(**T5_TINY)).eval()
        common.atomic_save({k: v.clone() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}, path)
    return path


def t5_transformers(path: Path):
    from safetensors.torch import load_file
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    with no_random_init():
        model = T5EncoderModel(T5Config(**T5_TINY)).eval()
    _load_t5(model, path)
    tok = T5TokenizerFast.from_pretrained(str(comfy_tokenizer_dir("t5")))
    return model, tok


def _load_t5(model, path: Path) -> None:
    """A T5 encoder file into a transformers ``T5EncoderModel``: the file has ``shared.weight`` and not its tied
    copy ``encoder.embed_tokens.weight``; every other parameter must come from the file."""
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}, (missing, unexpected)
    assert model.encoder.embed_tokens.weight is model.shared.weight


def flux_clip(clip_l: Path, t5: Path, embedding_directory=None):
    """ComfyUI's FLUX text encoder (FluxTokenizer + FluxClipModel) with the T5 built from ``T5_TINY``."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.flux
    import comfy.text_encoders.t5
    import comfy.utils

    class TinyT5XXLModel(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, attention_mask=False, model_options={}):
            super().__init__(device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=dict(T5_TINY),
                             dtype=dtype, special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                             enable_attention_masks=attention_mask, return_attention_masks=attention_mask,
                             model_options={**model_options, "model_name": "t5xxl"})

    class TinyFluxClipModel(comfy.text_encoders.flux.FluxClipModel):
        def __init__(self, dtype_t5=None, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, return_projected_pooled=False,
                                                     model_options=model_options)
            self.t5xxl = TinyT5XXLModel(device=device, dtype=dtype, model_options=model_options)
            self.dtypes = {dtype}

    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer, TinyFluxClipModel)
    clip = comfy.sd.CLIP(target=target, embedding_directory=embedding_directory,
                         model_options={"dtype": torch.float32})
    for p in (clip_l, t5):
        clip.load_sd(comfy.utils.load_torch_file(str(p)))
    return clip


# --- the reference pipelines (diffusers), on the same weights ---------------------------------------------
def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))


@functools.lru_cache(maxsize=None)  # one per session: encode_prompt only reads it
def sd_pipeline(clip_l: Path):
    """diffusers' StableDiffusionPipeline around our CLIP-L (tiny UNet/VAE: only encode_prompt is used)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    model, tok = clip_l_transformers(clip_l)
    unet = UNet2DConditionModel(block_out_channels=(32,), layers_per_block=1, cross_attention_dim=768,
                                down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                                norm_num_groups=8, attention_head_dim=8, sample_size=8)
    return StableDiffusionPipeline(vae=_tiny_vae(), text_encoder=model, tokenizer=tok, unet=unet,
                                   scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@functools.lru_cache(maxsize=None)  # one per session: encode_prompt only reads it
def flux_pipeline(clip_l: Path, t5: Path):
    """diffusers' FluxPipeline around our CLIP-L and tiny T5 (tiny transformer/VAE: only encode_prompt is used)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip_m, clip_tok = clip_l_transformers(clip_l)
    t5_m, t5_tok = t5_transformers(t5)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=T5_TINY["d_model"],
                                pooled_projection_dim=768, axes_dims_rope=(4, 6, 6))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(), text_encoder=clip_m,
                        tokenizer=clip_tok, text_encoder_2=t5_m, tokenizer_2=t5_tok, transformer=tr)


# --- SDXL / SD3: CLIP-L with its projection, a shrunk CLIP-G, and (SD3) a T5 4096 wide ---------------------
# ComfyUI's SD3 text encoder pads the CLIP features to 4096 and concatenates them with T5's sequence, so the
# SD3 T5 keeps d_model=4096 (one narrow layer); CLIP-G keeps its code path (gelu, pad id 0, projection).
CLIP_G_TINY = dict(vocab_size=49408, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=77, hidden_act="gelu", projection_dim=256, bos_token_id=49406,
                   eos_token_id=49407, pad_token_id=1, layer_norm_eps=1e-5)
T5_SD3 = dict(T5_TINY, d_model=4096, d_ff=32, d_kv=8, num_heads=2, num_layers=1)


def _clip_with_projection_file(name: str, config: dict, seed: int) -> Path:
    path = common.cached_file(f"{name}-s{seed}", common.source_key(sys.modules[__name__]))
    if not path.exists():
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        torch.manual_seed(seed)
        model = CLIPTextModelWithProjection(CLIPTextConfig(**config)).eval()
        sd = {(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v.clone()
              for k, v in model.state_dict().items()}
        common.atomic_save(sd, path)
    return path


def clip_lp_file(seed: int = 13) -> Path:
    """CLIP-L with its text_projection (SDXL/SD3 use CLIPTextModelWithProjection)."""
    return _clip_with_projection_file("clip-lp", CLIP_L, seed)


def clip_g_file(seed: int = 14) -> Path:
    return _clip_with_projection_file("clip-g-tiny", CLIP_G_TINY, seed)


def t5_sd3_file(seed: int = 15) -> Path:
    path = common.cached_file(f"t5-sd3-s{seed}", common.source_key(sys.modules[__name__]))
    if not path.exists():
        from transformers import T5Config, T5EncoderModel

        torch.manual_seed(seed)
        model = T5EncoderModel(T5Config(**T5_SD3)).eval()
        common.atomic_save({k: v.clone() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}, path)
    return path


def clip_transformers(path: Path, config: dict, pad_token: str | None = None):
    """A ``CLIPTextModelWithProjection`` holding the file's weights and ComfyUI's CLIP tokenizer files."""
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    with no_random_init():
        model = CLIPTextModelWithProjection(CLIPTextConfig(**config)).eval()
    sd = load_file(str(path))
    own = model.state_dict()
    missing, _ = model.load_state_dict({k if k in own else k.removeprefix("text_model."): v for k, v in sd.items()},
                                       strict=False)
    assert not [m for m in missing if "position_ids" not in m], missing
    extra = {"pad_token": pad_token} if pad_token else {}
    tok = CLIPTokenizer.from_pretrained(str(comfy_tokenizer_dir("sd1")), model_max_length=77, **extra)
    return model, tok


def _tiny_clip_g_class():
    import comfy.sd1_clip
    import comfy.sdxl_clip

    class TinySDXLClipG(comfy.sdxl_clip.SDXLClipG):
        """ComfyUI's SDXLClipG (same arguments) built from CLIP_G_TINY instead of the bigG config file."""

        def __init__(self, device="cpu", dtype=None, model_options={}):
            comfy.sd1_clip.SDClipModel.__init__(
                self, device=device, layer="hidden", layer_idx=-2, textmodel_json_config=dict(CLIP_G_TINY), dtype=dtype,
                special_tokens={"start": 49406, "end": 49407, "pad": 0}, layer_norm_hidden_state=False,
                return_projected_pooled=True, model_options={**model_options, "model_name": "clip_g"})

    return TinySDXLClipG


def _load_parts(clip, files: dict):
    import comfy.utils

    for attr, path in files.items():
        getattr(clip.cond_stage_model, attr).load_sd(comfy.utils.load_torch_file(str(path)))
    return clip


def sdxl_clip(clip_l: Path, clip_g: Path, embedding_directory=None):
    """ComfyUI's SDXL text encoder (SDXLTokenizer + SDXLClipModel) with the tiny CLIP-G."""
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models_base

    TinyG = _tiny_clip_g_class()

    class TinySDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                                     layer_norm_hidden_state=False, model_options=model_options)
            self.clip_g = TinyG(device=device, dtype=dtype, model_options=model_options)
            self.dtypes = {dtype}

    import comfy.sd1_clip

    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, TinySDXLClipModel)
    clip = comfy.sd.CLIP(target=target, embedding_directory=embedding_directory,
                         model_options={"dtype": torch.float32})
    return _load_parts(clip, {"clip_l": clip_l, "clip_g": clip_g})


def sd3_clip(clip_l: Path, clip_g: Path, t5: Path, embedding_directory=None):
    """ComfyUI's SD3 text encoder (SD3Tokenizer + SD3ClipModel, T5 unmasked as ComfyUI loads it) with the tiny
    CLIP-G and the one-layer 4096-wide T5."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.sd3_clip
    import comfy.text_encoders.t5

    TinyG = _tiny_clip_g_class()

    class TinyT5(comfy.text_encoders.sd3_clip.T5XXLModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            comfy.sd1_clip.SDClipModel.__init__(
                self, device=device, layer="last", layer_idx=None, textmodel_json_config=dict(T5_SD3), dtype=dtype,
                special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                enable_attention_masks=False, return_attention_masks=False,
                model_options={**model_options, "model_name": "t5xxl"})

    class TinySD3ClipModel(comfy.text_encoders.sd3_clip.SD3ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                                     layer_norm_hidden_state=False, return_projected_pooled=False,
                                                     model_options=model_options)
            self.clip_g = TinyG(device=device, dtype=dtype, model_options=model_options)
            self.t5_attention_mask = False
            self.t5xxl = TinyT5(device=device, dtype=dtype, model_options=model_options)
            self.dtypes = {dtype}

    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.sd3_clip.SD3Tokenizer, TinySD3ClipModel)
    clip = comfy.sd.CLIP(target=target, embedding_directory=embedding_directory,
                         model_options={"dtype": torch.float32})
    return _load_parts(clip, {"clip_l": clip_l, "clip_g": clip_g, "t5xxl": t5})


@functools.lru_cache(maxsize=None)  # one per session: encode_prompt only reads it
def sdxl_pipeline(clip_l: Path, clip_g: Path):
    """diffusers' StableDiffusionXLPipeline around the same weights (no UNet/VAE: only encode_prompt is used).
    tokenizer_2 pads with '!' (id 0) as stabilityai/stable-diffusion-xl-base-1.0/tokenizer_2 does."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    l_m, l_tok = clip_l_transformers(clip_l)  # SDXL's text_encoder is a CLIPTextModel (no projection)
    g_m, g_tok = clip_transformers(clip_g, CLIP_G_TINY, pad_token="!")
    return StableDiffusionXLPipeline(vae=None, text_encoder=l_m, text_encoder_2=g_m, tokenizer=l_tok, tokenizer_2=g_tok,
                                     unet=None, scheduler=EulerDiscreteScheduler())


@functools.lru_cache(maxsize=None)  # one per session: encode_prompt only reads it
def sd3_pipeline(clip_l: Path, clip_g: Path, t5: Path, identity_l_projection: bool = False):
    """diffusers' StableDiffusion3Pipeline around the same weights (no transformer/VAE). With
    ``identity_l_projection`` the diffusers copy of CLIP-L gets an identity text_projection, so its
    "projected" pooled vector is the unprojected one Stability's reference code uses."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from safetensors.torch import load_file
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    l_m, l_tok = clip_transformers(clip_l, CLIP_L)
    if identity_l_projection:
        with torch.no_grad():
            l_m.text_projection.weight.copy_(torch.eye(CLIP_L["hidden_size"]))
    g_m, g_tok = clip_transformers(clip_g, CLIP_G_TINY, pad_token="!")
    with no_random_init():
        t5_m = T5EncoderModel(T5Config(**T5_SD3)).eval()
    _load_t5(t5_m, t5)
    t5_tok = T5TokenizerFast.from_pretrained(str(comfy_tokenizer_dir("t5")))
    return StableDiffusion3Pipeline(transformer=None, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                    text_encoder=l_m, tokenizer=l_tok, text_encoder_2=g_m, tokenizer_2=g_tok,
                                    text_encoder_3=t5_m, tokenizer_3=t5_tok)
