"""Wan's text encoder (UMT5-XXL), shrunk and seeded: ComfyUI's own Wan classes (``comfy.text_encoders.wan``:
``WanT5Tokenizer`` + ``te()``, the config shrunk through the ``umt5xxl_model_config`` model option) and
diffusers' ``WanPipeline`` (transformers ``UMT5EncoderModel``) on the same weights.

The UMT5 tokenizer is a SentencePiece model that ComfyUI does not ship: Wan text-encoder files carry it as a
``spiece_model`` byte tensor, which ``comfy.sd.load_clip`` hands to the tokenizer. No UMT5 model file exists
offline, so a small SentencePiece unigram model with UMT5's special ids (pad 0, eos 1, unk 2, no bos) is
trained here at test time, stored in the tiny text-encoder file the same way, and given to the reference as a
transformers ``T5Tokenizer`` built from the same pieces and scores. The model uses the identity normalizer:
transformers cannot read a SentencePiece normalizer without protobuf, which is not installed.
``tokenizers_agree`` checks that both tokenizers give the same ids, so a parity test measures the spec, not a
tokenizer difference.
"""
from __future__ import annotations

import functools
import io
import string
import sys
from pathlib import Path

import torch

from . import common
from .loaded import no_random_init

# umt5_config_xxl.json (ComfyUI) / google/umt5-xxl config.json, shrunk: fewer, narrower layers; per-layer
# relative attention bias (model_type umt5), gated gelu, eps kept. vocab_size = the tiny tokenizer's size.
UMT5_SHRINK = {"d_model": 64, "d_kv": 16, "num_heads": 4, "d_ff": 128, "num_layers": 2}
CORPUS = (
    "ohwx, a red circle on a blue background, flat colors",
    "héllo wörld!! ~ ✨ café, 'quotes' & semi;colons? 100% — ok",
    "a video of a cat walking on green grass in the sun, the camera pans slowly to the left",
    "line one line two spaced out word, 1girl, hat (object), solo, a (red:1.3) circle [faded] photo",
    "see https://en.wikipedia.org/wiki/Cat_(animal) meeting at 12:30 smile ^_^ &amp; &lt;b&gt;",
    string.ascii_letters + string.digits + string.punctuation,
)


def _key() -> str:
    return common.source_key(sys.modules[__name__])


@functools.lru_cache(maxsize=None)
def spiece_proto() -> bytes:
    """A deterministic SentencePiece unigram model with UMT5's special token ids."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=buf, vocab_size=256, hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram", character_coverage=1.0, num_threads=1,
        normalization_rule_name="identity", minloglevel=2)
    return buf.getvalue()


def _pieces() -> list[tuple[str, float]]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=spiece_proto())
    return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]


def umt5_config() -> dict:
    """The HF/ComfyUI config of the tiny UMT5 (ComfyUI's umt5_config_xxl.json with UMT5_SHRINK applied)."""
    import json

    import comfy.text_encoders.wan as wan

    cfg = json.loads((Path(wan.__file__).parent / "umt5_config_xxl.json").read_text())
    return {**cfg, **UMT5_SHRINK, "vocab_size": len(_pieces()), "num_decoder_layers": 0}


def umt5_tiny_file(seed: int = 41) -> Path:
    """A seeded tiny UMT5 encoder in the HF key layout, with its tokenizer as ``spiece_model`` (as Wan's
    text-encoder files carry it), fp32 safetensors."""
    path = common.cached_file(f"umt5-tiny-s{seed}", _key())
    if not path.exists():
        from transformers import UMT5Config, UMT5EncoderModel

        cfg = {k: v for k, v in umt5_config().items() if k != "num_decoder_layers"}
        model = UMT5EncoderModel(UMT5Config(**cfg)).eval()
        common.seeded_init_(model, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():  # norms away from 1, so a norm in the wrong place shows
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        sd = {k: v.clone() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
        sd["spiece_model"] = torch.frombuffer(bytearray(spiece_proto()), dtype=torch.uint8)
        common.atomic_save(sd, path)
    return path


def _load(path: Path) -> dict[str, torch.Tensor]:
    import comfy.utils

    return comfy.utils.load_torch_file(str(path), safe_load=True)


def wan_clip(path: Path | None = None, embedding_directory=None):
    """A ComfyUI ``CLIP`` from ComfyUI's Wan classes unchanged, as ``load_clip(..., CLIPType.WAN)`` builds it:
    tokenizer data from the file's ``spiece_model``, the tiny config through ``umt5xxl_model_config``."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.wan as wan

    sd = _load(path or umt5_tiny_file())
    tok = {"spiece_model": sd.pop("spiece_model")}
    cfg = {k: v for k, v in umt5_config().items() if k in UMT5_SHRINK or k == "vocab_size"}
    target = comfy.supported_models_base.ClipTarget(wan.WanT5Tokenizer, wan.te())
    clip = comfy.sd.CLIP(target=target, embedding_directory=embedding_directory, tokenizer_data=tok,
                         model_options={"dtype": torch.float32, "umt5xxl_model_config": cfg})
    missing, unexpected = clip.load_sd(sd)
    assert not missing and not unexpected, f"tiny UMT5: missing {missing}, unexpected {unexpected}"
    return clip


def reference_tokenizer():
    """transformers' T5Tokenizer (the class google/umt5-xxl names) over the same pieces and scores."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=_pieces(), extra_ids=0, unk_id=2)


def tokenizers_agree(texts) -> list[str]:
    """Texts on which ComfyUI's SentencePiece tokenizer and the reference tokenizer give different ids."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=spiece_proto())
    tok = reference_tokenizer()
    return [t for t in texts if sp.encode(t, add_eos=True) != tok(t).input_ids]


@functools.lru_cache(maxsize=None)  # one per session: encode_prompt only reads it
def wan_pipeline(path: Path | None = None):
    """diffusers' WanPipeline around the tiny UMT5 (no transformer/VAE: only encode_prompt is used)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    from safetensors.torch import load_file
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = {k: v for k, v in umt5_config().items() if k != "num_decoder_layers"}
    with no_random_init():
        model = UMT5EncoderModel(UMT5Config(**cfg)).eval()
    sd = {k: v for k, v in load_file(str(path or umt5_tiny_file())).items() if k != "spiece_model"}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}, (missing, unexpected)
    return WanPipeline(tokenizer=reference_tokenizer(), text_encoder=model, vae=None, transformer=None,
                       scheduler=FlowMatchEulerDiscreteScheduler())
