"""The spec's ``tokenizer_file`` (te/tokenizers.py) pinned (issue #26) on ComfyUI's own T5-XXL tokenizer, whose
folder ships tokenizer.json: 'comfy' (and an absent field) keep ComfyUI's object; 'tokenizer_json' gives a copy
tokenizing with transformers' PreTrainedTokenizerFast read from that folder's tokenizer.json (the same ids as
one built here from the file), and leaves ComfyUI's object as it was; a folder without tokenizer.json (ComfyUI's
CLIP BPE folder) is refused naming the file and the fix."""
from __future__ import annotations

from pathlib import Path

import pytest


def test_tokenizer_file_comfy_or_tokenizer_json(comfy):
    from comfy.sd1_clip import SDTokenizer
    from comfy.text_encoders.sd3_clip import T5XXLTokenizer
    from transformers import PreTrainedTokenizerFast

    tok, specs = comfy.engine("te.tokenizers"), comfy.engine("te.specs")
    sub = T5XXLTokenizer(embedding_directory=None, tokenizer_data={})
    own = sub.tokenizer
    for raw in ({}, {"tokenizer_file": "comfy"}, {"tokenizer_file": {"value": "comfy", "source": "x"}}):
        assert tok.spec_tokenizer(sub, specs.EncoderSpec(raw)) is sub
    got = tok.spec_tokenizer(sub, specs.EncoderSpec({"tokenizer_file": {"value": "tokenizer_json", "source": "x"}}))
    assert got is not sub and sub.tokenizer is own  # ComfyUI's object unchanged
    assert isinstance(got.tokenizer, PreTrainedTokenizerFast) and got.tokenizer is not own
    assert got.max_length == sub.max_length and got.pad_token == sub.pad_token  # the rest is ComfyUI's
    ref = PreTrainedTokenizerFast(tokenizer_file=str(Path(own.name_or_path) / "tokenizer.json"))
    text = "a red circle, ohwx at dusk"
    assert got.tokenizer(text)["input_ids"] == ref(text)["input_ids"]
    clip_sub = SDTokenizer(embedding_directory=None, tokenizer_data={})  # vocab.json + merges.txt only
    folder = Path(clip_sub.tokenizer.name_or_path)
    with pytest.raises(specs.SpecError) as e:
        tok.spec_tokenizer(clip_sub, specs.EncoderSpec({"tokenizer_file": "tokenizer_json"}))
    assert str(folder / "tokenizer.json") in str(e.value) and "tokenizer_file to 'comfy'" in str(e.value)
