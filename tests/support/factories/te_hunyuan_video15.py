"""HunyuanVideo 1.5's text encoders, shrunk and seeded: the Qwen-Image factory's tiny Qwen2.5-VL language model (with 4
layers) and a
tiny byT5 (ComfyUI's ``byt5_config_small_glyph.json`` shrunk: 2 layers of 4 heads of 16, feed-forward 128; its width
1472, which ComfyUI's HunyuanVideo 1.5 ``ByT5Mapper`` takes, its 1510-id vocabulary, gated GELU and pad/eos ids kept), loaded into ComfyUI's own HunyuanVideo 1.5 text-encoder classes
(``hunyuan_video.HunyuanVideo15Tokenizer`` + ``hunyuan_image.HunyuanImageTEModel``, as
``supported_models.HunyuanVideo15.clip_target`` builds them), and diffusers' ``HunyuanVideo15Pipeline`` around the
same weights in transformers' ``Qwen2_5_VLTextModel`` and ``T5EncoderModel`` (only ``encode_prompt`` is used).

``HunyuanImageTEModel.__init__`` builds ``ByT5SmallModel`` from the fixed config file (12 layers, width 1472); the
tiny class here runs the same two lines of that ``__init__`` with a ``ByT5SmallModel`` whose config is the shrunk one
(the pattern of the T5 factories); every other method is ComfyUI's.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

from . import common
from .te_qwen_image import _COMFY_QWEN25VL, QWEN25VL_TINY, ROPE, _VISION_TINY, qwen_tokenizer_dir

# the Qwen-Image factory's tiny Qwen2.5-VL with 4 layers: ComfyUI's SDClipModel takes layer_idx -3 only from a model
# with more than 3 layers, and hidden_states[-3] is then layer 1's output (neither the first nor the last)
QWEN_LAYERS = 4
_COMFY_QWEN = {**_COMFY_QWEN25VL, "num_hidden_layers": QWEN_LAYERS}

BYT5_TINY = {"d_ff": 128, "d_kv": 16, "d_model": 1472, "num_heads": 4, "num_layers": 2, "dense_act_fn": "gelu_pytorch_tanh",
             "is_gated_act": True, "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-06, "model_type": "t5",
             "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "vocab_size": 1510,
             "eos_token_id": 1, "pad_token_id": 0, "decoder_start_token_id": 0, "is_encoder_decoder": True,
             "tie_word_embeddings": False}


def _qwen_text_config():
    from transformers import Qwen2_5_VLConfig

    text = {**QWEN25VL_TINY, "num_hidden_layers": QWEN_LAYERS, "rope_parameters": dict(ROPE)}
    return Qwen2_5_VLConfig(text_config=text, vision_config=_VISION_TINY).text_config


def qwen25vl_tiny_file(seed: int = 43) -> Path:
    """A seeded tiny 4-layer Qwen2.5-VL language model (``model.*`` keys, fp32), norms perturbed away from 1."""
    path = common.cached_file(f"qwen25vl-tiny4-s{seed}", common.source_key(sys.modules[__name__]))
    if not path.exists():
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

        model = Qwen2_5_VLTextModel(_qwen_text_config()).eval()
        common.seeded_llm_(model, seed)
        common.atomic_save({f"model.{k}": v.clone() for k, v in model.state_dict().items()}, path)
    return path


def byt5_tiny_file(seed: int = 23) -> Path:
    """A seeded tiny byT5 encoder in the HF key layout ComfyUI's T5 loads (fp32 safetensors)."""
    path = common.cached_file(f"byt5-tiny-s{seed}", common.source_key(sys.modules[__name__]))
    if not path.exists():
        from transformers import T5Config, T5EncoderModel

        torch.manual_seed(seed)
        model = T5EncoderModel(T5Config(**BYT5_TINY)).eval()
        common.atomic_save({k: v.clone() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}, path)
    return path


def byt5_tokenizer_dir() -> Path:
    import comfy.text_encoders.hunyuan_image as h

    return Path(h.__file__).parent / "byt5_tokenizer"


def shared_hv15_clip(qwen: Path, byt5: Path):
    """``hv15_clip`` without an embeddings folder, built once per session (ComfyUI's Qwen2.5-VL class allocates its
    full-size vision tower, ~1 s): callers align clones of it and never change it."""
    return _shared_clip(qwen, byt5)


def hv15_clip(qwen: Path, byt5: Path, embedding_directory=None):
    """A ComfyUI ``CLIP`` of HunyuanVideo 1.5 from ComfyUI's classes (tokenizer unchanged), the tiny Qwen2.5-VL given
    as the ``qwen25_7b_model_config`` model option and the tiny byT5 config in place of the glyph config file."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.hunyuan_image as hi
    import comfy.text_encoders.hunyuan_video as hv
    import comfy.text_encoders.t5
    import comfy.utils

    class TinyByT5SmallModel(hi.ByT5SmallModel):
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, model_options={}):
            comfy.sd1_clip.SDClipModel.__init__(
                self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=dict(BYT5_TINY),
                dtype=dtype, model_options=model_options, special_tokens={"end": 1, "pad": 0},
                model_class=comfy.text_encoders.t5.T5, enable_attention_masks=True, zero_out_masked=True)

    class TinyHunyuanVideo15TE(hi.HunyuanImageTEModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super(hi.QwenImageTEModel, self).__init__(device=device, dtype=dtype, name="qwen25_7b",
                                                      clip_model=hi.Qwen25_7BVLIModel, model_options=model_options)
            self.byt5_small = TinyByT5SmallModel(device=device, dtype=dtype, model_options=model_options)

    target = comfy.supported_models_base.ClipTarget(hv.HunyuanVideo15Tokenizer, TinyHunyuanVideo15TE)
    clip = comfy.sd.CLIP(target=target, embedding_directory=embedding_directory,
                         model_options={"dtype": torch.float32, "qwen25_7b_model_config": dict(_COMFY_QWEN)})
    missing, unexpected = clip.load_sd(comfy.utils.load_torch_file(str(qwen)))
    assert not unexpected and all(k.startswith("visual.") for k in missing), (missing[:5], unexpected[:5])
    missing, unexpected = clip.load_sd(comfy.utils.load_torch_file(str(byt5)))
    assert not unexpected and not missing, (missing[:5], unexpected[:5])
    return clip


@functools.lru_cache(maxsize=None)
def _shared_clip(qwen: Path, byt5: Path):
    return hv15_clip(qwen, byt5)


@functools.lru_cache(maxsize=None)  # one per session: encode_prompt only reads it
def hv15_pipeline(qwen: Path, byt5: Path):
    """diffusers' HunyuanVideo15Pipeline around the tiny encoders (no transformer or guider: only encode_prompt is
    used; its __init__ reads the VAE's config, so a real HunyuanVideo 1.5 VAE of width 8 is built and never run)."""
    from diffusers import AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline
    from safetensors.torch import load_file
    from transformers import ByT5Tokenizer, Qwen2Tokenizer, T5Config, T5EncoderModel
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

    from .loaded import no_random_init

    with no_random_init():
        te = Qwen2_5_VLTextModel(_qwen_text_config()).eval()
        t5 = T5EncoderModel(T5Config(**BYT5_TINY)).eval()
        vae = AutoencoderKLHunyuanVideo15(block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1).eval()
    te.load_state_dict({k.removeprefix("model."): v for k, v in load_file(str(qwen)).items()}, strict=True)
    missing, unexpected = t5.load_state_dict(load_file(str(byt5)), strict=False)
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}, (missing, unexpected)
    return HunyuanVideo15Pipeline(text_encoder=te, tokenizer=Qwen2Tokenizer.from_pretrained(str(qwen_tokenizer_dir())),
                                  transformer=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                                  text_encoder_2=t5, tokenizer_2=ByT5Tokenizer.from_pretrained(str(byt5_tokenizer_dir())),
                                  guider=None)
