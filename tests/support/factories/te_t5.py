"""T5-only text encoders (PixArt-Sigma, Chroma): ComfyUI's own tokenizer/encoder classes with the shrunk
seeded T5 of ``text_encoders.py``, and diffusers' pipelines around the same weights for the reference.

ComfyUI loads PixArt and Chroma text encoders through the same classes (``CLIPType.PIXART`` /
``CLIPType.CHROMA`` -> ``pixart_t5.PixArtTokenizer`` + ``pixart_t5.PixArtT5XXL``); only the T5 size differs.
"""
from __future__ import annotations

import functools

from pathlib import Path

import torch

from .text_encoders import T5_TINY, t5_transformers


def pixart_clip(t5: Path, embedding_directory=None):
    """A ComfyUI ``CLIP`` exactly as the PIXART/CHROMA loader builds it, with the tiny T5."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.pixart_t5 as pixart
    import comfy.text_encoders.t5
    import comfy.utils

    class TinyT5XXLModel(pixart.T5XXLModel):
        """pixart_t5.T5XXLModel (sd3_clip.T5XXLModel defaults: no masks) with the T5_TINY config."""

        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, attention_mask=False, model_options={}):
            comfy.sd1_clip.SDClipModel.__init__(
                self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=dict(T5_TINY),
                dtype=dtype, special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                enable_attention_masks=attention_mask, return_attention_masks=attention_mask,
                model_options={**model_options, "model_name": "t5xxl"})

    class TinyPixArtT5XXL(pixart.PixArtT5XXL):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            comfy.sd1_clip.SD1ClipModel.__init__(self, device=device, dtype=dtype, name="t5xxl",
                                                 clip_model=TinyT5XXLModel, model_options=model_options)

    target = comfy.supported_models_base.ClipTarget(pixart.PixArtTokenizer, TinyPixArtT5XXL)
    clip = comfy.sd.CLIP(target=target, embedding_directory=embedding_directory,
                         model_options={"dtype": torch.float32})
    clip.load_sd(comfy.utils.load_torch_file(str(t5)))
    return clip


@functools.lru_cache(maxsize=None)  # one per session: encode_prompt only reads it
def pixart_sigma_pipeline(t5: Path):
    """diffusers' PixArtSigmaPipeline around the tiny T5 (no transformer/VAE: only encode_prompt is used)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    model, tok = t5_transformers(t5)
    return PixArtSigmaPipeline(tokenizer=tok, text_encoder=model, vae=None, transformer=None,
                               scheduler=DPMSolverMultistepScheduler())


@functools.lru_cache(maxsize=None)  # one per session: encode_prompt only reads it
def chroma_pipeline(t5: Path):
    """diffusers' ChromaPipeline around the tiny T5 (no transformer/VAE: only encode_prompt is used)."""
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler

    model, tok = t5_transformers(t5)
    return ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=model,
                          tokenizer=tok, transformer=None)
