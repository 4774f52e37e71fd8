"""HiDream-I1's four text encoders, shrunk and seeded: CLIP-L and CLIP-G with HiDream's 248 positions (pooled
only), a tiny T5 and a tiny Llama-3.1, loaded into ComfyUI's own ``comfy.text_encoders.hidream`` classes unchanged
(``HiDreamTokenizer`` + ``hidream_clip()``; each encoder's config shrunk through ComfyUI's ``<name>_model_config``
model option), and diffusers' ``HiDreamImagePipeline`` around the same weights in transformers'
``CLIPTextModelWithProjection`` / ``T5EncoderModel`` / ``LlamaForCausalLM``.

HiDream retrained its CLIPs with 248 positions (its pipeline pads them to 128 tokens). ComfyUI's ``load_clip``
reads the position count from the file (``comfy.text_encoders.long_clipl.model_options_long_clip``) and sets the
tokenizer's and the model's length to it; the tiny CLIP-G has too few layers for that detection (it looks for
layer 30), so the factory passes the same two options itself.

ComfyUI's Llama keeps ``head_dim`` 128 as a class constant, so the tiny Llama has 128-wide heads (2 heads, 1 KV
head). Meta-Llama-3.1-8B-Instruct's config scales RoPE (``rope_type`` llama3, factor 8); ComfyUI's Llama does not
implement that scaling, so the reference runs with plain RoPE (what ComfyUI computes); ``llama31_rope`` switches the
reference to the official scaling for measuring the difference.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path

import torch

from . import common
from .loaded import no_random_init
from .text_encoders import T5_TINY, _load_t5, comfy_tokenizer_dir, t5_tiny_file

POSITIONS = 248  # HiDream-I1's retrained CLIP-L/CLIP-G position embeddings
# CLIP-L (quick_gelu) and CLIP-G (gelu) code paths, shrunk to different widths so that a swapped concatenation
# shows in the shapes
CLIP_L_TINY = dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   max_position_embeddings=POSITIONS, hidden_act="quick_gelu", projection_dim=64, bos_token_id=49406,
                   eos_token_id=49407, pad_token_id=1, layer_norm_eps=1e-5)
CLIP_G_TINY = dict(CLIP_L_TINY, hidden_size=96, intermediate_size=192, num_hidden_layers=3, hidden_act="gelu",
                   projection_dim=96)  # 3 layers: ComfyUI's SDXLClipG is built with layer_idx -2
# Meta-Llama-3.1-8B-Instruct's architecture (ComfyUI llama.Llama2Config), shrunk: fewer, narrower layers; the
# vocabulary, head_dim, rope theta and eps kept.
LLAMA_TINY = {"vocab_size": 128256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
              "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 131072,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0}
LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# Meta-Llama-3.1-8B-Instruct's tokenizer_config: eos_token <|eot_id|> (the pipeline pads with it); ComfyUI's
# llama_tokenizer folder (llava-llama-3's) has the same tokenizer.json with eos <|end_of_text|>
LLAMA31_EOS = "<|eot_id|>"


def _src():
    return common.source_key(sys.modules[__name__])


def _clip_file(name: str, config: dict, seed: int) -> Path:
    path = common.cached_file(f"hidream-{name}-s{seed}", _src())
    if not path.exists():
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        torch.manual_seed(seed)
        model = CLIPTextModelWithProjection(CLIPTextConfig(**config)).eval()
        sd = {(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v.clone()
              for k, v in model.state_dict().items()}
        common.atomic_save(sd, path)
    return path


def llama_config(official_rope: bool = False):
    from transformers import LlamaConfig

    rope = dict(LLAMA31_ROPE) if official_rope else {"rope_type": "default", "rope_theta": LLAMA_TINY["rope_theta"]}
    cfg = {k: v for k, v in LLAMA_TINY.items() if k != "rope_theta"}
    return LlamaConfig(**cfg, head_dim=128, rope_parameters=rope, bos_token_id=128000,
                       eos_token_id=[128001, 128008, 128009], tie_word_embeddings=False)


def llama_file(seed: int = 61) -> Path:
    """A seeded tiny Llama-3.1 (``model.*`` keys, fp32) as ComfyUI's Llama2 loads it; norms perturbed from 1."""
    path = common.cached_file(f"hidream-llama-s{seed}", _src())
    if not path.exists():
        from transformers import LlamaModel

        model = LlamaModel(llama_config()).eval()
        common.seeded_llm_(model, seed)
        common.atomic_save({f"model.{k}": v.clone() for k, v in model.state_dict().items()}, path)
    return path


def files() -> dict[str, Path]:
    """The four tiny encoder files by ComfyUI's attribute name."""
    return {"clip_l": _clip_file("clip-l", CLIP_L_TINY, 57), "clip_g": _clip_file("clip-g", CLIP_G_TINY, 58),
            "t5xxl": t5_tiny_file(), "llama": llama_file()}


def _comfy_config(config: dict, drop=("bos_token_id", "pad_token_id")) -> dict:
    return {k: v for k, v in config.items() if k not in drop}


def hidream_clip(paths: dict[str, Path], embedding_directory=None):
    """A ComfyUI ``CLIP`` from ComfyUI's HiDream classes unchanged, the tiny configs passed as model options."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.hidream as h
    import comfy.utils

    t5 = {k: v for k, v in T5_TINY.items() if k not in ("is_encoder_decoder", "decoder_start_token_id")}
    options = {"dtype": torch.float32, "clip_l_model_config": _comfy_config(CLIP_L_TINY),
               "clip_g_model_config": _comfy_config(CLIP_G_TINY), "t5xxl_model_config": t5,
               "llama_model_config": dict(LLAMA_TINY)}
    # what comfy.sd.load_clip sets for 248-position CLIP files (long_clipl.model_options_long_clip)
    tokenizer_data = {"clip_l_max_length": POSITIONS, "clip_g_max_length": POSITIONS}
    target = comfy.supported_models_base.ClipTarget(h.HiDreamTokenizer, h.hidream_clip())
    clip = comfy.sd.CLIP(target=target, embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                         model_options=options)
    for attr, path in paths.items():  # HiDreamTEModel.load_sd routes full-size files by their layer count
        missing, unexpected = getattr(clip.cond_stage_model, attr).load_sd(comfy.utils.load_torch_file(str(path)))
        assert not unexpected and not [m for m in missing if "position_ids" not in m], (attr, missing, unexpected)
    return clip


def _clip_transformers(path: Path, config: dict):
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with no_random_init():
        model = CLIPTextModelWithProjection(CLIPTextConfig(**config)).eval()
    own = model.state_dict()
    missing, _ = model.load_state_dict({k if k in own else k.removeprefix("text_model."): v
                                        for k, v in load_file(str(path)).items()}, strict=False)
    assert not [m for m in missing if "position_ids" not in m], missing
    return model


def llama_transformers(path: Path, official_rope: bool = False):
    """transformers' ``LlamaForCausalLM`` with the file's weights (its LM head passes the hidden state through:
    ``encode_prompt`` reads ``hidden_states`` only) and the Llama-3.1 tokenizer the pipeline uses."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = llama_config(official_rope)
    cfg._attn_implementation = "eager"  # encode_prompt asks for attentions too
    with no_random_init():
        model = LlamaForCausalLM(cfg).eval()
    missing, unexpected = model.model.load_state_dict(
        {k.removeprefix("model."): v for k, v in load_file(str(path)).items()}, strict=True)
    assert not missing and not unexpected, (missing, unexpected)
    model.lm_head = torch.nn.Identity()
    tok_dir = Path(comfy_tokenizer_dir("t5")).parent / "llama_tokenizer"
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), bos_token="<|begin_of_text|>",
                                  eos_token=LLAMA31_EOS)
    return model, tok


@contextlib.contextmanager
def llama31_rope(pipe):
    """Inside, the pipeline's Llama rotates with Meta-Llama-3.1's RoPE scaling (``rope_type`` llama3, factor 8), as
    the official config has it; the same weights otherwise."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model = pipe.text_encoder_4.model
    saved = model.rotary_emb
    model.rotary_emb = LlamaRotaryEmbedding(config=llama_config(official_rope=True))
    try:
        yield
    finally:
        model.rotary_emb = saved


@functools.lru_cache(maxsize=None)  # one per session: encode_prompt only reads it
def hidream_pipeline(clip_l: Path, clip_g: Path, t5: Path, llama: Path):
    """diffusers' HiDreamImagePipeline around the same weights (no transformer/VAE: only encode_prompt is used)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    with no_random_init():
        t5_m = T5EncoderModel(T5Config(**T5_TINY)).eval()
    _load_t5(t5_m, t5)
    clip_tok = CLIPTokenizer.from_pretrained(str(comfy_tokenizer_dir("sd1")))
    llama_m, llama_tok = llama_transformers(llama)
    return HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
        text_encoder=_clip_transformers(clip_l, CLIP_L_TINY), tokenizer=clip_tok,
        text_encoder_2=_clip_transformers(clip_g, CLIP_G_TINY), tokenizer_2=clip_tok,
        text_encoder_3=t5_m, tokenizer_3=T5TokenizerFast.from_pretrained(str(comfy_tokenizer_dir("t5"))),
        text_encoder_4=llama_m, tokenizer_4=llama_tok, transformer=None)


def reference(pipe, prompts) -> dict[str, dict]:
    """``HiDreamImagePipeline.encode_prompt`` as ``__call__`` runs it (its default ``max_sequence_length``, no CFG), in
    one batched call (every encoder pads to max_length, so each row is that prompt's own encoding): prompt ->
    {cond: T5 sequence, conditioning_llama3: Llama stack as (1, layers, tokens, width), pooled_output: CLIP-L +
    CLIP-G}, the keys of ComfyUI's HiDream conditioning."""
    import inspect

    prompts = list(dict.fromkeys(prompts))
    n = inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default
    with torch.no_grad():
        t5, _, llama, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False,
                                                        max_sequence_length=n)
    return {p: {"cond": t5[i:i + 1], "conditioning_llama3": llama[:, i:i + 1].permute(1, 0, 2, 3),
                "pooled_output": pooled[i:i + 1]} for i, p in enumerate(prompts)}
