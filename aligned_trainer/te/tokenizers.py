"""Which tokenizer object an encoder's tokens come from (the spec's ``tokenizer_file``).

By default the aligned CLIP tokenizes with the tokenizer ComfyUI built for the encoder. ``tokenizer_json`` takes
the ``tokenizer.json`` in that tokenizer's own folder (the files ComfyUI ships) as written, as transformers'
``PreTrainedTokenizerFast`` reads it, which is what ``AutoTokenizer`` gives the official pipeline for a model whose
tokenizer files name that class (Meta-Llama-3.1). ComfyUI's ``LlamaTokenizerFast`` under transformers 5 is rebuilt
from the vocabulary with a sentencepiece-style pre-tokenizer and drops the spaces of Llama-3's byte-level BPE
(``" a red circle"`` -> ``"ared"``, ``"circle"``).
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path

from .specs import EncoderSpec, SpecError

COMFY = "comfy"
TOKENIZER_JSON = "tokenizer_json"


@functools.lru_cache(maxsize=8)
def _from_tokenizer_json(folder: str):
    from transformers import PreTrainedTokenizerFast

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise SpecError(f"the text-encoder spec reads this encoder's tokens from {path}, which does not exist; use the "
                        "family's own ComfyUI text encoder (its tokenizer folder holds tokenizer.json) or set the "
                        f"spec's tokenizer_file to '{COMFY}'.")
    return PreTrainedTokenizerFast(tokenizer_file=str(path))


def spec_tokenizer(sub, enc: EncoderSpec):
    """``sub`` (a ComfyUI sub-tokenizer), or a shallow copy of it tokenizing with the tokenizer the spec names.
    ComfyUI's object is never changed."""
    if (enc["tokenizer_file"] or COMFY) == COMFY:
        return sub
    folder = getattr(sub.tokenizer, "name_or_path", "") or ""
    s = copy.copy(sub)
    s.tokenizer = _from_tokenizer_json(str(folder))
    return s
