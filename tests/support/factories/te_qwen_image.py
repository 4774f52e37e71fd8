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

Qwen-Image-Edit reads images through that vision tower. ``qwen25vl_edit_tiny_file`` adds a shrunk, seeded tower
(``visual.*`` keys, ``VISION_TINY``) to the same language model; ``qwen_image_clip(..., vision=True)`` puts
ComfyUI's own ``qwen_vl.Qwen2VLVisionTransformer`` built with that shrunk config (its constructor takes the sizes;
``Qwen25_7BVLI`` passes only the full-width ones) in place of the full-width one before loading, and transformers
gets the same sizes as its ``vision_config``. ComfyUI's tower always uses full attention in blocks 7/15/23/31 and
windowed attention elsewhere, as Qwen2.5-VL-7B's config does; 8 blocks exercise both kinds.
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


# the Qwen-Image-Edit vision tower, the same sizes on both sides (Qwen2.5-VL-7B: 1280 wide, 32 blocks, 16 heads,
# 3420 MLP); patch 14, temporal patch 2, merge 2, window 112 and full-attention blocks 7/15/23/31 kept
VISION_TINY = {"depth": 8, "hidden_size": 64, "intermediate_size": 64, "num_heads": 2,
               "fullatt_block_indexes": [7, 15, 23, 31], "window_size": 112,
               "out_hidden_size": QWEN25VL_TINY["hidden_size"]}
# Qwen2.5-VL-7B-Instruct's preprocessor_config.json (the processor Qwen-Image-Edit ships): pixel bounds of its
# smart resize; the same numbers are the defaults of ComfyUI's qwen_vl.process_qwen2vl_images
PROCESSOR_PIXELS = {"min_pixels": 3136, "max_pixels": 12845056}


def _config(vision=None):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(text_config={**QWEN25VL_TINY, "rope_parameters": dict(ROPE)},
                            vision_config=vision or _VISION_TINY)


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


def qwen25vl_edit_tiny_file(seed: int = 41) -> Path:
    """``qwen25vl_tiny_file(seed)``'s language model plus a seeded tiny vision tower (``visual.*`` keys, the layout of
    ComfyUI's Qwen2.5-VL files), fp32 safetensors. The tower's norm weights are perturbed away from 1 too."""
    path = common.cached_file(f"qwen25vl-edit-tiny-s{seed}", common.source_key(sys.modules[__name__]))
    if not path.exists():
        from safetensors.torch import load_file
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        tower = Qwen2_5_VisionTransformerPretrainedModel(_config(VISION_TINY).vision_config).eval()
        common.seeded_llm_(tower, seed + 100)
        sd = dict(load_file(str(qwen25vl_tiny_file(seed))))
        sd.update({f"visual.{k}": v.clone() for k, v in tower.state_dict().items()})
        common.atomic_save(sd, path)
    return path


def qwen_tokenizer_dir() -> Path:
    import comfy.text_encoders.qwen_image as q

    return Path(q.__file__).parent / "qwen25_tokenizer"


def _tiny_comfy_tower(te_model):
    """ComfyUI's ``qwen_vl.Qwen2VLVisionTransformer`` with ``VISION_TINY``'s sizes, built with the ops (and dtype,
    device) of the full-width one ComfyUI built, which it replaces."""
    import types

    import comfy.text_encoders.qwen_vl as qwen_vl

    old = te_model.visual
    block = old.blocks[0]
    ops = types.SimpleNamespace(Linear=type(block.attn.qkv), Conv3d=type(old.patch_embed.proj),
                                RMSNorm=type(block.norm1))
    p = next(old.parameters())
    te_model.visual = qwen_vl.Qwen2VLVisionTransformer(
        hidden_size=VISION_TINY["hidden_size"], output_hidden_size=VISION_TINY["out_hidden_size"],
        intermediate_size=VISION_TINY["intermediate_size"], num_heads=VISION_TINY["num_heads"],
        num_layers=VISION_TINY["depth"], window_size=VISION_TINY["window_size"], device=p.device, dtype=p.dtype,
        ops=ops)
    assert te_model.visual.fullatt_block_indexes == VISION_TINY["fullatt_block_indexes"]


def qwen_image_clip(path: Path, embedding_directory=None, vision: bool = False):
    """A ComfyUI ``CLIP`` built from ComfyUI's Qwen-Image classes unchanged (``QwenImageTokenizer`` +
    ``qwen_image.te()``), with the tiny config passed as the ``qwen25_7b_model_config`` model option. ``vision``:
    with the tiny vision tower (``_tiny_comfy_tower``) loaded from ``path``'s ``visual.*`` keys."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.qwen_image as q
    import comfy.utils

    target = comfy.supported_models_base.ClipTarget(q.QwenImageTokenizer, q.te())
    clip = comfy.sd.CLIP(target=target, embedding_directory=embedding_directory,
                         model_options={"dtype": torch.float32, "qwen25_7b_model_config": dict(_COMFY_QWEN25VL)})
    if vision:
        _tiny_comfy_tower(clip.cond_stage_model.qwen25_7b.transformer)
    missing, unexpected = clip.load_sd(comfy.utils.load_torch_file(str(path)))
    assert not unexpected and (not missing if vision else all(k.startswith("visual.") for k in missing)), \
        (missing[:5], unexpected[:5])
    return clip


def qwen25vl_transformers(path: Path):
    """transformers' Qwen2_5_VLForConditionalGeneration (fp32, eval) with the tiny language model's weights and,
    when the file has ``visual.*`` keys, the tiny vision tower's (else the tower as transformers initialises it:
    text-only prompts never run it), and the reference tokenizer."""
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    full = load_file(str(path))
    vision = {k.removeprefix("visual."): v for k, v in full.items() if k.startswith("visual.")}
    model = Qwen2_5_VLForConditionalGeneration(_config(VISION_TINY if vision else None)).eval()
    sd = {k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.")}
    missing, unexpected = model.model.language_model.load_state_dict(sd, strict=True)
    assert not missing and not unexpected, (missing, unexpected)
    if vision:
        missing, unexpected = model.model.visual.load_state_dict(vision, strict=True)
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


def qwen2vl_processor(tokenizer):
    """transformers' Qwen2VLProcessor built offline: the image processor from ``PROCESSOR_PIXELS`` (patch 14,
    temporal patch 2, merge 2, CLIP mean/std and bicubic resize are the class's defaults, as in Qwen2.5-VL's
    preprocessor_config.json), the reference tokenizer, and the class's default video processor (which
    Qwen2VLProcessor requires; images never use it)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=PROCESSOR_PIXELS["min_pixels"],
                                            max_pixels=PROCESSOR_PIXELS["max_pixels"])
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor())


def _with_image_token_types(model, image_token_id: int):
    """``model`` whose forward gets ``mm_token_type_ids`` (1 at image tokens, what Qwen2VLProcessor returns) when it
    is given images without them. QwenImageEditPipeline._get_qwen_prompt_embeds passes input_ids, attention_mask,
    pixel_values and image_grid_thw only; transformers 5.x computes Qwen2.5-VL's 3-D (t, h, w) rotary positions of
    image tokens only from mm_token_type_ids and otherwise numbers every position 0, 1, 2... as for text, while
    transformers 4.x (what Qwen-Image-Edit was released with) derived them from input_ids. With this the reference
    is the model's own encoding; without it, the pipeline as installed (``mrope=False``)."""
    forward = model.forward

    def with_types(*args, **kwargs):
        if kwargs.get("image_grid_thw") is not None and kwargs.get("mm_token_type_ids") is None:
            kwargs["mm_token_type_ids"] = (kwargs["input_ids"] == image_token_id).int()
        return forward(*args, **kwargs)

    model.forward = with_types
    return model


@functools.lru_cache(maxsize=None)  # one per session: encode_prompt only reads it
def qwen_image_edit_pipeline(path: Path, mrope: bool = True):
    """diffusers' QwenImageEditPipeline around the tiny Qwen2.5-VL with its vision tower (no transformer/VAE: only
    encode_prompt and the image processor's resize are used). ``mrope``: image tokens get Qwen2.5-VL's 3-D rotary
    positions (``_with_image_token_types``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline

    model, tok = qwen25vl_transformers(path)
    processor = qwen2vl_processor(tok)
    if mrope:
        _with_image_token_types(model, processor.image_token_id)
    return QwenImageEditPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=model,
                                 tokenizer=tok, processor=processor, transformer=None)
