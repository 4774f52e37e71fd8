"""FLUX.2 [dev] (Mistral-Small-3.1 hidden states 10/20/30 under a system message, diffusers ``Flux2Pipeline``): why
there is no ``flux2`` spec and parity test yet, pinned so that these tests fail once it becomes possible.

ComfyUI gets FLUX.2's tokenizer from the text-encoder file itself: ``comfy.sd.load_clip`` passes the file's
``tekken_model`` tensor (Mistral's tekken.json, as bytes) as ``tokenizer_data``, and ``Mistral3Tokenizer`` converts it
with transformers' ``MistralConverter``. A tiny tekken.json can be built at test time, and transformers 5 converts it
without ``mistral_common`` (first test). ComfyUI 0.3.75 calls the transformers 4 form of that converter
(``MistralConverter(vocab=..., additional_special_tokens=...)``); transformers 5 takes a file path, so ComfyUI's
FLUX.2 tokenizer, and with it any FLUX.2 ``CLIP``, cannot be built with this environment's transformers (second
test). See docs/text_encoders.md, "FLUX.2 [dev]".
"""
from __future__ import annotations

import base64
import json

import pytest

# a few of Mistral's control tokens (tekken keeps them in the first ranks; ids here are this file's own)
CONTROL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "<pad>"]


def tiny_tekken() -> dict:
    """A tekken.json in Mistral's layout: control tokens first, then byte-level BPE ranks (the 256 bytes and a few
    merges), ids = rank + number of control tokens."""
    pieces = [bytes([i]) for i in range(256)] + [b"he", b"ll", b"hell", b"hello", b" c", b"at", b" cat"]
    vocab = [{"rank": r, "token_bytes": base64.b64encode(p).decode(), "token_str": None} for r, p in enumerate(pieces)]
    specials = [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(CONTROL)]
    pattern = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    return {"config": {"pattern": pattern, "num_vocab_tokens": len(pieces) + len(CONTROL),
                       "default_vocab_size": len(pieces) + len(CONTROL), "default_num_special_tokens": len(CONTROL),
                       "version": "v7"},
            "vocab": vocab, "special_tokens": specials}


def test_tiny_tekken_tokenizer_builds_with_transformers(tmp_path):
    """transformers 5 converts a tekken.json built here (no mistral_common): control tokens keep their ids, byte BPE
    ranks follow them, merges apply; what the reference side of a FLUX.2 parity test would tokenize with."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.mistral.tokenizer import MistralConverter

    path = tmp_path / "tekken.json"
    path.write_text(json.dumps(tiny_tekken()), encoding="utf-8")
    tok = PreTrainedTokenizerFast(tokenizer_object=MistralConverter(vocab_file=str(path)).converted())
    n = len(CONTROL)
    ids = tok("[SYSTEM_PROMPT]hello[/SYSTEM_PROMPT][INST]a cat[/INST]", add_special_tokens=False).input_ids
    hello, cat = 256 + 3, 256 + 6  # ranks of b"hello" and b" cat"
    assert ids == [5, hello + n, 6, 3, ord("a") + n, cat + n, 4]


def test_comfyui_flux2_tokenizer_needs_transformers_4(comfy):
    """ComfyUI 0.3.75's Flux2Tokenizer (given the tekken data as its loader passes it) fails with transformers 5's
    MistralConverter: no FLUX.2 CLIP can be built here, so there is nothing to align or compare yet."""
    import comfy.text_encoders.flux as flux

    data = json.dumps(tiny_tekken()).encode()
    with pytest.raises(TypeError, match="vocab_file"):
        flux.Flux2Tokenizer(tokenizer_data={"tekken_model": data})
