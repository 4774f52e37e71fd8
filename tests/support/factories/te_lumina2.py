"""Lumina 2's text encoder, shrunk and seeded: Gemma-2 (``comfy.text_encoders.lumina2`` / ``llama.Gemma2_2B``
in ComfyUI, ``Gemma2Model`` in transformers) and a small Gemma-style sentencepiece tokenizer built here.

ComfyUI ships no Gemma tokenizer: it reads the sentencepiece model from the checkpoint's ``spiece_model`` tensor
(``comfy.sd.load_text_encoder_state_dicts`` -> ``tokenizer_data``). No Gemma tokenizer can be downloaded here, so a
BPE sentencepiece model with Gemma's conventions (``<pad>``/``<eos>``/``<bos>``/``<unk>``/``<mask>`` at ids 0-4,
byte fallback, no dummy prefix, identity normalisation, whitespace kept, digits split) is trained at test time on
a fixed text, stored in the tiny checkpoint as ``spiece_model`` the way ComfyUI's Lumina 2 files hold it, and the
same model's pieces are given to transformers' ``GemmaTokenizer`` (vocabulary and merges as transformers'
sentencepiece extraction derives them) for ``Lumina2Pipeline.encode_prompt``.

ComfyUI's Gemma-2 keeps ``head_dim`` 256 as a class constant, so the tiny model keeps it (2 heads, 1 KV head).
"""
from __future__ import annotations

import functools
import io
import sys
from pathlib import Path

import torch

from . import common
from .loaded import no_random_init

SPIECE_VOCAB = 1200
# Gemma-2-2B's architecture (ComfyUI llama.Gemma2_2B_Config / google/gemma-2-2b config.json), shrunk: fewer,
# narrower layers and the tiny vocabulary; head_dim, query scale, rope theta, eps, activation and the attention
# logit soft-cap (which ComfyUI's implementation does not apply) kept.
GEMMA2_TINY = {"vocab_size": SPIECE_VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
               "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 256, "max_position_embeddings": 8192,
               "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
_HF_ONLY = {"query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
            "sliding_window": 4096, "hidden_activation": "gelu_pytorch_tanh", "pad_token_id": 0, "eos_token_id": 1,
            "bos_token_id": 2}
# the config keys ComfyUI's Gemma2_2B_Config dataclass accepts (head_dim is a class constant there)
_COMFY_GEMMA2 = {k: v for k, v in GEMMA2_TINY.items() if k != "head_dim"}

# text the tokenizer is trained on: captions, the Lumina 2 system prompt, ordinary words and symbols
_CORPUS = [
    "You are an assistant designed to generate superior images with the superior degree of image-text alignment "
    "based on textual prompts or user prompts. <Prompt Start> a photo of a cat",
    "ohwx, a red circle on a blue background, flat colors, a small house by the river in the morning light",
    "1girl, hat (object), solo, masterpiece, best quality, a dog sitting on green grass, portrait of a woman",
    "meeting at 12:30, the quick brown fox jumps over the lazy dog; 100% cotton, see https://example.com/a_b",
    "line one\nline two\n\n  spaced   out  ", "[faded] photo, old film, a (cat) on a mat, style: noir, back\\slash",
    "word, word, word, word, embedding: tiny emb, héllo wörld, café, 'quotes' & semi;colons? — ok",
]


def _tokenizer_bytes() -> bytes:
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 20), model_writer=out, model_type="bpe", vocab_size=SPIECE_VOCAB,
        hard_vocab_limit=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", control_symbols=["<mask>"],
        byte_fallback=True, add_dummy_prefix=False, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, character_coverage=1.0, num_threads=1,
        minloglevel=2)
    return out.getvalue()


def gemma2_tiny_file(seed: int = 51) -> Path:
    """A seeded tiny Gemma-2 (``model.*`` keys, fp32 safetensors) with its tokenizer as the ``spiece_model`` uint8
    tensor, as ComfyUI's Lumina 2 text-encoder files hold it. Norm weights are perturbed away from 0 (Gemma's
    norms scale by 1 + weight) so that a norm applied in the wrong place changes the output."""
    path = common.cached_file(f"gemma2-tiny-s{seed}", common.source_key(sys.modules[__name__]))
    if not path.exists():
        from transformers import Gemma2Model

        spiece = _tokenizer_bytes()
        model = Gemma2Model(_config()).eval()
        common.seeded_llm_(model, seed)
        sd = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
        sd["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
        common.atomic_save(sd, path)
    return path


def _config():
    from transformers import Gemma2Config

    return Gemma2Config(**GEMMA2_TINY, **_HF_ONLY)


def _load(path: Path) -> dict:
    import comfy.utils

    return comfy.utils.load_torch_file(str(path))


def lumina2_clip(path: Path, embedding_directory=None):
    """A ComfyUI ``CLIP`` built as ComfyUI's loader builds a Gemma-2 text encoder (``LuminaTokenizer`` +
    ``lumina2.te()``, the tokenizer read from the file's ``spiece_model``), with the tiny config passed as the
    ``gemma2_2b_model_config`` model option."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.lumina2 as lumina2

    sd = _load(path)
    target = comfy.supported_models_base.ClipTarget(lumina2.LuminaTokenizer, lumina2.te())
    clip = comfy.sd.CLIP(target=target, embedding_directory=embedding_directory,
                         tokenizer_data={"spiece_model": sd["spiece_model"]},
                         model_options={"dtype": torch.float32, "gemma2_2b_model_config": dict(_COMFY_GEMMA2)})
    missing, unexpected = clip.load_sd(sd)
    assert not missing and unexpected == ["spiece_model"], (missing, unexpected)
    return clip


def gemma_tokenizer(path: Path):
    """transformers' GemmaTokenizer for the file's sentencepiece model: vocabulary = the model's pieces by id, merges
    from transformers' own ``generate_merges`` (what its sentencepiece extraction does; that path needs protobuf,
    which is not installed)."""
    import sentencepiece as spm
    from transformers import GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_proto=_load(path)["spiece_model"].numpy().tobytes())
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    # google/gemma-2-2b tokenizer_config.json: add_bos_token true, add_eos_token false
    return GemmaTokenizer(vocab=vocab, merges=generate_merges(vocab), add_bos_token=True, add_eos_token=False)


def gemma2_transformers(path: Path, softcap: bool = True):
    """The same weights as transformers' ``Gemma2Model`` (fp32, eval) and the reference tokenizer. ``softcap``
    False turns off the attention-logit soft-cap (Gemma-2's 50), which ComfyUI's Gemma-2 does not apply."""
    from transformers import Gemma2Model

    config = _config()
    if not softcap:
        config.attn_logit_softcapping = None
    with no_random_init():
        model = Gemma2Model(config).eval()
    sd = {k.removeprefix("model."): v for k, v in _load(path).items() if k != "spiece_model"}
    missing, unexpected = model.load_state_dict(sd, strict=True)
    assert not missing and not unexpected, (missing, unexpected)
    return model, gemma_tokenizer(path)


@functools.lru_cache(maxsize=None)  # one per session: encode_prompt only reads it
def lumina2_pipeline(path: Path, softcap: bool = True):
    """diffusers' Lumina2Pipeline around the tiny Gemma-2 (no transformer/VAE: only encode_prompt is used);
    ``softcap`` as in ``gemma2_transformers``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline

    model, tok = gemma2_transformers(path, softcap)
    return Lumina2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=model, tokenizer=tok,
                           transformer=None)
