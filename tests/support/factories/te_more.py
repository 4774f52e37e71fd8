"""SD2.x (OpenCLIP-H) and AuraFlow (Pile-T5 / UMT5) text encoders: ComfyUI's own tokenizer/encoder classes
with shrunk seeded weights, and diffusers' pipelines around the same weights for the reference.

Only the widths and depths shrink; the tokenizers are the files ComfyUI ships, the encoder classes and their
arguments (special tokens, layer choice, masks) are ComfyUI's.
"""
from __future__ import annotations

import functools

import sys
from pathlib import Path

import torch

from . import common
from .loaded import no_random_init
from .text_encoders import comfy_tokenizer_dir

# OpenCLIP ViT-H-14 text tower as ComfyUI's sd2_clip_config.json describes it (gelu, 77 positions), shrunk.
CLIP_H_TINY = dict(vocab_size=49408, hidden_size=192, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=77, hidden_act="gelu", projection_dim=192, bos_token_id=0,
                   eos_token_id=49407, pad_token_id=1, layer_norm_eps=1e-5)
# Pile-T5-XL as ComfyUI's t5_pile_config_xl.json describes it (umt5: relative attention bias in every layer).
PILE_T5_TINY = dict(d_ff=256, d_kv=16, d_model=128, num_heads=4, num_layers=2, dense_act_fn="gelu_pytorch_tanh",
                    is_gated_act=True, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, model_type="umt5",
                    relative_attention_num_buckets=32, relative_attention_max_distance=128, vocab_size=32128,
                    eos_token_id=2, pad_token_id=1, decoder_start_token_id=0, is_encoder_decoder=True,
                    tie_word_embeddings=False)


def clip_h_file(seed: int = 21) -> Path:
    """A shrunk OpenCLIP-H text encoder in the HF ``text_model.*`` layout ComfyUI's SD2 encoder loads."""
    path = common.cached_file(f"clip-h-tiny-s{seed}", common.source_key(sys.modules[__name__]))
    if not path.exists():
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        torch.manual_seed(seed)
        model = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_H_TINY)).eval()
        common.atomic_save({(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v.clone()
                            for k, v in model.state_dict().items()}, path)
    return path


def sd2_clip(clip_h: Path, embedding_directory=None):
    """ComfyUI's SD2 text encoder (SD2Tokenizer + SD2ClipModel, SD2ClipHModel's arguments) with the tiny CLIP-H."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.sd2_clip as sd2
    import comfy.utils

    class TinySD2ClipH(sd2.SD2ClipHModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kw):
            comfy.sd1_clip.SDClipModel.__init__(
                self, device=device, layer="hidden", layer_idx=-2, textmodel_json_config=dict(CLIP_H_TINY),
                dtype=dtype, special_tokens={"start": 49406, "end": 49407, "pad": 0}, return_projected_pooled=True,
                model_options=model_options)

    class TinySD2ClipModel(sd2.SD2ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kw):
            comfy.sd1_clip.SD1ClipModel.__init__(self, device=device, dtype=dtype, model_options=model_options,
                                                 clip_name="h", clip_model=TinySD2ClipH)

    target = comfy.supported_models_base.ClipTarget(sd2.SD2Tokenizer, TinySD2ClipModel)
    clip = comfy.sd.CLIP(target=target, embedding_directory=embedding_directory,
                         model_options={"dtype": torch.float32})
    clip.load_sd(comfy.utils.load_torch_file(str(clip_h)))
    return clip


@functools.lru_cache(maxsize=None)  # one per session: encode_prompt only reads it
def sd2_pipeline(clip_h: Path):
    """diffusers' StableDiffusionPipeline as stabilityai/stable-diffusion-2-1 ships it: the text encoder is
    OpenCLIP-H with its last layer removed (text_encoder/config.json num_hidden_layers=23 of 24), so
    ``last_hidden_state`` is the penultimate layer after the final LayerNorm; tokenizer pad_token '!'."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfg = dict(CLIP_H_TINY, num_hidden_layers=CLIP_H_TINY["num_hidden_layers"] - 1)
    with no_random_init():
        model = CLIPTextModel(CLIPTextConfig(**cfg)).eval()
    own = model.state_dict()
    sd = {k if k in own else k.removeprefix("text_model."): v for k, v in load_file(str(clip_h)).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    last = CLIP_H_TINY["num_hidden_layers"] - 1
    assert not [m for m in missing if "position_ids" not in m], missing
    assert all(f"layers.{last}." in k or k == "text_projection.weight" for k in unexpected), unexpected
    tok = CLIPTokenizer.from_pretrained(str(comfy_tokenizer_dir("sd1")), model_max_length=77, pad_token="!")
    return StableDiffusionPipeline(vae=None, text_encoder=model, tokenizer=tok, unet=None, scheduler=DDIMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def pile_t5_file(seed: int = 22) -> Path:
    """A shrunk UMT5 encoder (Pile-T5 layout) in the HF key layout ComfyUI's AuraFlow encoder loads."""
    path = common.cached_file(f"pile-t5-tiny-s{seed}", common.source_key(sys.modules[__name__]))
    if not path.exists():
        from transformers import UMT5Config, UMT5EncoderModel

        torch.manual_seed(seed)
        model = UMT5EncoderModel(UMT5Config(**PILE_T5_TINY)).eval()
        common.atomic_save({k: v.clone() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"},
                           path)
    return path


def auraflow_clip(pile_t5: Path, embedding_directory=None):
    """ComfyUI's AuraFlow text encoder (AuraT5Tokenizer + AuraT5Model, PT5XlModel's arguments: masks on,
    padded positions zeroed) with the tiny Pile-T5."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.aura_t5 as aura
    import comfy.text_encoders.t5
    import comfy.utils

    class TinyPT5Xl(aura.PT5XlModel):
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, model_options={}):
            comfy.sd1_clip.SDClipModel.__init__(
                self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=dict(PILE_T5_TINY),
                dtype=dtype, special_tokens={"end": 2, "pad": 1}, model_class=comfy.text_encoders.t5.T5,
                enable_attention_masks=True, zero_out_masked=True, model_options=model_options)

    class TinyAuraT5Model(aura.AuraT5Model):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kw):
            comfy.sd1_clip.SD1ClipModel.__init__(self, device=device, dtype=dtype, model_options=model_options,
                                                 name="pile_t5xl", clip_model=TinyPT5Xl)

    target = comfy.supported_models_base.ClipTarget(aura.AuraT5Tokenizer, TinyAuraT5Model)
    clip = comfy.sd.CLIP(target=target, embedding_directory=embedding_directory,
                         model_options={"dtype": torch.float32})
    clip.load_sd(comfy.utils.load_torch_file(str(pile_t5)))
    return clip


def _pile_t5_tokenizer():
    """ComfyUI's copy of the Pile-T5 sentencepiece model behind transformers' tokenizer API, set up as
    fal/AuraFlow's tokenizer (a LlamaTokenizerFast with add_bos_token=False, add_eos_token=True): pieces + '</s>'
    (id 2), padding on the right, pad id 1 (ComfyUI's PT5XlTokenizer pad; pads are masked inside the encoder
    and zeroed afterwards, so the pad id does not change any embedding). transformers 5 converts a
    sentencepiece file to a fast tokenizer only with protobuf, which is not installed here, so the
    sentencepiece-backed base class is used with the same special-token rule."""
    from transformers import SentencePieceBackend

    import comfy.text_encoders.aura_t5 as aura

    class PileT5Tokenizer(SentencePieceBackend):
        def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
            out = list(token_ids_0) + [self.eos_token_id]
            return out + list(token_ids_1) + [self.eos_token_id] if token_ids_1 else out

    spm = Path(aura.__file__).parent / "t5_pile_tokenizer" / "tokenizer.model"
    return PileT5Tokenizer(vocab_file=str(spm), bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<s>",
                           padding_side="right", model_max_length=10**9)


@functools.lru_cache(maxsize=None)  # one per session: encode_prompt only reads it
def auraflow_pipeline(pile_t5: Path):
    """diffusers' AuraFlowPipeline around the same weights (no transformer/VAE: only encode_prompt is used)."""
    from diffusers import AuraFlowPipeline, FlowMatchEulerDiscreteScheduler
    from safetensors.torch import load_file
    from transformers import UMT5Config, UMT5EncoderModel

    with no_random_init():
        model = UMT5EncoderModel(UMT5Config(**PILE_T5_TINY)).eval()
    sd = load_file(str(pile_t5))
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return AuraFlowPipeline(tokenizer=_pile_t5_tokenizer(), text_encoder=model, vae=None, transformer=None,
                            scheduler=FlowMatchEulerDiscreteScheduler())
