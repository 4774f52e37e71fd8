"""Qwen-Image's text encoder, shrunk and seeded: Qwen2.5-VL's language model saved in the key layout ComfyUI's
``comfy.text_encoders.qwen_image`` classes load (``model.*``), loaded into those classes unchanged (the text
config is shrunk through ComfyUI's ``qwen25_7b_model_config`` model option), and diffusers' ``QwenImagePipeline``
around the same weights in transformers' ``Qwen2_5_VLForConditionalGeneration`` (with a tiny vision tower: only
the language model computes prompt embeddings).

ComfyUI's ``llama.Qwen25_7BVLI`` always builds Qwen2.5-VL-7B's vision tower at full width (1280, 32 blocks,
~660M parameters). ComfyUI's ops skip weight initialisation, so those tensors are allocated but never written
(nor read: only images run the tower), and building the tiny text encoder costs about a second and little
resident memory; the tower is left as ComfyUI builds it, and the tiny weights file holds the language model only.

ComfyUI's Qwen2.5-VL keeps ``head_dim`` 128 as a class constant, and transformers derives it from
hidden_size / heads, so the tiny model has one 128-wide head (multimodal RoPE sections 16/24/24 kept).
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

from . import common

# Qwen2.5-VL-7B-Instruct's language model (ComfyUI llama.Qwen25_7BVLI_Config / the model's config.json), shrunk:
# fewer, narrower layers; vocabulary, head_dim, rope theta and sections, eps and q/k/v biases kept.
QWEN25VL_TINY = {"vocab_size": 152064, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3,
                 "num_attention_heads": 1, "num_key_value_heads": 1, "max_position_embeddings": 128000,
                 "rms_norm_eps": 1e-6}
ROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
# the keys ComfyUI's Qwen25_7BVLI_Config dataclass accepts (rope sections and head_dim are class constants there)
_COMFY_QWEN25VL = {**QWEN25VL_TINY, "rope_theta": ROPE["rope_theta"]}
# a vision tower for the transformers side only (the prompt path never runs it)
_VISION_TINY = {"depth": 1, "hidden_size": 32, "intermediate_size": 32, "num_heads": 1, "fullatt_block_indexes": [0],
                "out_hidden_size": QWEN25VL_TINY["hidden_size"]}


def _config():
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(text_config={**QWEN25VL_TINY, "rope_parameters": dict(ROPE)}, vision_config=_VISION_TINY)


def qwen25vl_tiny_file(seed: int = 41) -> Path:
    """A seeded tiny Qwen2.5-VL language model (``model.*`` keys, fp32 safetensors) as ComfyUI's Qwen25_7BVLI loads
    it. Norm weights are perturbed away from 1 so that a norm applied in the wrong place changes the output."""
    path = common.cached_file(f"qwen25vl-tiny-s{seed}", common.source_key(sys.modules[__name__]))
    if not path.exists():
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

        model = Qwen2_5_VLTextModel(_config().text_config).eval()
        common.seeded_llm_(model, seed)
        common.atomic_save({f"model.{k}": v.clone() for k, v in model.state_dict().items()}, path)
    return path


def qwen_tokenizer_dir() -> Path:
    import comfy.text_encoders.qwen_image as q

    return Path(q.__file__).parent / "qwen25_tokenizer"


def qwen_image_clip(path: Path, embedding_directory=None):
    """A ComfyUI ``CLIP`` built from ComfyUI's Qwen-Image classes unchanged (``QwenImageTokenizer`` +
    ``qwen_image.te()``), with the tiny config passed as the ``qwen25_7b_model_config`` model option."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.qwen_image as q
    import comfy.utils

    target = comfy.supported_models_base.ClipTarget(q.QwenImageTokenizer, q.te())
    clip = comfy.sd.CLIP(target=target, embedding_directory=embedding_directory,
                         model_options={"dtype": torch.float32, "qwen25_7b_model_config": dict(_COMFY_QWEN25VL)})
    missing, unexpected = clip.load_sd(comfy.utils.load_torch_file(str(path)))
    assert not unexpected and all(k.startswith("visual.") for k in missing), (missing[:5], unexpected[:5])
    return clip


def qwen25vl_transformers(path: Path):
    """transformers' Qwen2_5_VLForConditionalGeneration (fp32, eval) with the tiny language model's weights (its
    vision tower as transformers initialises it: text-only prompts never run it), and the reference tokenizer."""
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    model = Qwen2_5_VLForConditionalGeneration(_config()).eval()
    sd = {k.removeprefix("model."): v for k, v in load_file(str(path)).items()}
    missing, unexpected = model.model.language_model.load_state_dict(sd, strict=True)
    assert not missing and not unexpected, (missing, unexpected)
    # encode_prompt reads .hidden_states only; the LM head's next-token logits (152064 per position: 0.6 GB for a
    # 1058-token prompt) are never read, so the head passes the last hidden state through instead
    model.lm_head = torch.nn.Identity()
    return model, Qwen2Tokenizer.from_pretrained(str(qwen_tokenizer_dir()))


@functools.lru_cache(maxsize=None)  # one per session: encode_prompt only reads it
def qwen_image_pipeline(path: Path):
    """diffusers' QwenImagePipeline around the tiny Qwen2.5-VL (no transformer/VAE: only encode_prompt is used)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    model, tok = qwen25vl_transformers(path)
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=model, tokenizer=tok,
                             transformer=None)
