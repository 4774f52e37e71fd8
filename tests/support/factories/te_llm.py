"""LLM text encoders of the newer families, shrunk and seeded: the same transformers class the official
pipeline uses, saved in the HF key layout ComfyUI's own text-encoder classes load, and loaded into those
ComfyUI classes unchanged (their config is shrunk through ComfyUI's ``<name>_model_config`` model option).

Z-Image: Qwen3 (``comfy.text_encoders.z_image`` / ``llama.Qwen3_4B``), reference ``ZImagePipeline``.
ComfyUI's Qwen3 keeps ``head_dim`` 128 as a class constant, so the tiny model keeps it too (2 heads).
"""
from __future__ import annotations

import functools

import sys
from pathlib import Path

import torch

from . import common
from .loaded import no_random_init

# Qwen3-4B's architecture (ComfyUI llama.Qwen3_4BConfig / Qwen/Qwen3-4B config.json), shrunk: fewer, narrower
# layers; vocabulary, head_dim, rope theta, eps and norms kept.
QWEN3_TINY = {"vocab_size": 151936, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128, "max_position_embeddings": 40960,
              "rms_norm_eps": 1e-6, "rope_theta": 1000000.0}
# the config keys ComfyUI's Qwen3_4BConfig dataclass accepts (head_dim is a class constant there)
_COMFY_QWEN3 = {k: v for k, v in QWEN3_TINY.items() if k != "head_dim"}

# The branch of Qwen3's chat template (Qwen/Qwen3-4B tokenizer_config.json) that one user message with
# add_generation_prompt=True takes: no system turn unless given, '<|im_start|>user\n' + content +
# '<|im_end|>\n', then '<|im_start|>assistant\n', and the empty think block only for enable_thinking=False.
# ComfyUI ships Qwen2.5's tokenizer files (same BPE and special tokens), whose template adds a default system
# prompt, so the Qwen3 branch is set on the reference tokenizer here.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def _qwen3_config():
    from transformers import Qwen3Config

    return Qwen3Config(**QWEN3_TINY, tie_word_embeddings=True)


def qwen3_tiny_file(seed: int = 31) -> Path:
    """A seeded tiny Qwen3 (``model.*`` keys, fp32 safetensors) as ComfyUI's Qwen3_4B loads it. Norm weights
    are perturbed away from 1 so that a norm applied in the wrong place changes the output."""
    path = common.cached_file(f"qwen3-tiny-s{seed}", common.source_key(sys.modules[__name__]))
    if not path.exists():
        from transformers import Qwen3Model

        model = Qwen3Model(_qwen3_config()).eval()
        common.seeded_llm_(model, seed)
        common.atomic_save({f"model.{k}": v.clone() for k, v in model.state_dict().items()}, path)
    return path


def qwen_tokenizer_dir() -> Path:
    import comfy.text_encoders.z_image as z

    return Path(z.__file__).parent / "qwen25_tokenizer"


def qwen3_transformers(path: Path):
    """The same weights as transformers' ``Qwen3Model`` (fp32, eval) and the reference tokenizer."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen3Model

    with no_random_init():
        model = Qwen3Model(_qwen3_config()).eval()
    sd = {k.removeprefix("model."): v for k, v in load_file(str(path)).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    tok = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir()))
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    return model, tok


def z_image_clip(path: Path, embedding_directory=None):
    """A ComfyUI ``CLIP`` built from ComfyUI's Z-Image classes unchanged (``ZImageTokenizer`` +
    ``z_image.te()``), with the tiny Qwen3 config passed as the ``qwen3_4b_model_config`` model option."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.z_image as z
    import comfy.utils

    target = comfy.supported_models_base.ClipTarget(z.ZImageTokenizer, z.te())
    clip = comfy.sd.CLIP(target=target, embedding_directory=embedding_directory,
                         model_options={"dtype": torch.float32, "qwen3_4b_model_config": dict(_COMFY_QWEN3)})
    missing, unexpected = clip.load_sd(comfy.utils.load_torch_file(str(path)))
    return clip


@functools.lru_cache(maxsize=None)  # one per session: encode_prompt only reads it
def z_image_pipeline(path: Path):
    """diffusers' ZImagePipeline around the tiny Qwen3 (no transformer/VAE: only encode_prompt is used)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    model, tok = qwen3_transformers(path)
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=model, tokenizer=tok,
                          transformer=None)
