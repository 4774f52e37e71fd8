"""Which tokenizer object an encoder's tokens come from (the spec's ``tokenizer_file``).

By default the aligned CLIP tokenizes with the tokenizer ComfyUI built for the encoder. ``tokenizer_json`` takes
the ``tokenizer.json`` in that tokenizer's own folder (the files ComfyUI ships) as written, as transformers'
``PreTrainedTokenizerFast`` reads it, which is what ``AutoTokenizer`` gives the official pipeline for a model whose
tokenizer files name that class (Meta-Llama-3.1). ComfyUI's ``LlamaTokenizerFast`` under transformers 5 is rebuilt
from the vocabulary with a sentencepiece-style pre-tokenizer and drops the spaces of Llama-3's byte-level BPE
(``" a red circle"`` -> ``"ared"``, ``"circle"``). ``tekken`` keeps ComfyUI's tekken tokenizer (FLUX.2's Mistral, built
from the file's ``tekken_model``) but splits text with the tekken.json's own pre-tokenizer pattern, as Mistral's
conversion to tokenizer.json does; ComfyUI's conversion uses transformers 4's default pattern.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path

from .specs import EncoderSpec, SpecError

COMFY = "comfy"
TOKENIZER_JSON = "tokenizer_json"
TEKKEN = "tekken"


@functools.lru_cache(maxsize=8)
def _from_tokenizer_json(folder: str):
    from transformers import PreTrainedTokenizerFast

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise SpecError(f"the text-encoder spec reads this encoder's tokens from {path}, which does not exist; use the "
                        "family's own ComfyUI text encoder (its tokenizer folder holds tokenizer.json) or set the "
                        f"spec's tokenizer_file to '{COMFY}'.")
    return PreTrainedTokenizerFast(tokenizer_file=str(path))


_TEKKEN_CACHE: dict = {}


def _tekken_bytes(data) -> bytes:
    if hasattr(data, "numpy"):  # the tekken_model tensor of a FLUX.2 text-encoder file
        return data.numpy().tobytes()
    return bytes(data)


def _with_tekken_pattern(sub):
    """ComfyUI's tekken tokenizer (``sub.tokenizer``, same vocabulary, merges and ids) splitting text with the
    pre-tokenizer pattern of the tekken.json it was built from (``config.pattern``), as Mistral's own conversion
    does; ComfyUI's conversion does not pass the pattern on."""
    import hashlib
    import json

    data = getattr(sub, "tekken_data", None)
    if data is None:
        raise SpecError("the text-encoder spec reads this encoder's tokens with its tekken.json pattern, but ComfyUI's "
                        f"{type(sub).__name__} holds no tekken data; load the family's own text-encoder file (FLUX.2: "
                        "its Mistral file carries tekken_model) or set the spec's tokenizer_file to 'comfy'.")
    raw = _tekken_bytes(data)
    key = (hashlib.sha256(raw).hexdigest(), id(sub.tokenizer))
    if key not in _TEKKEN_CACHE:
        from tokenizers import Regex, pre_tokenizers

        pattern = json.loads(raw)["config"]["pattern"]
        tok = copy.deepcopy(sub.tokenizer)
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        if len(_TEKKEN_CACHE) > 4:
            _TEKKEN_CACHE.clear()
        _TEKKEN_CACHE[key] = tok
    return _TEKKEN_CACHE[key]


def spec_tokenizer(sub, enc: EncoderSpec):
    """``sub`` (a ComfyUI sub-tokenizer), or a shallow copy of it tokenizing with the tokenizer the spec names.
    ComfyUI's object is never changed."""
    mode = enc["tokenizer_file"] or COMFY
    if mode == COMFY:
        return sub
    s = copy.copy(sub)
    if mode == TEKKEN:
        s.tokenizer = _with_tekken_pattern(sub)
        return s
    folder = getattr(sub.tokenizer, "name_or_path", "") or ""
    s.tokenizer = _from_tokenizer_json(str(folder))
    return s
