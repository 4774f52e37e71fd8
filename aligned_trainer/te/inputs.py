"""What text an encoder reads (the spec's ``input``): the prompt itself, or a text derived from it.

``quoted_text`` is the text a glyph encoder reads (HunyuanVideo 1.5's byT5): the spans in straight double quotes
``"..."`` or curly double quotes ``“...”``, in order of appearance, deduplicated (first occurrence kept) when there
are several, each written as ``Text "<span>". `` and joined; a prompt without such a span gives None (the encoder
has no input: the spec's ``empty_prompt`` says what it outputs then).
"""
from __future__ import annotations

import re

PROMPT = "prompt"
QUOTED_TEXT = "quoted_text"

_QUOTED = re.compile(r"\"(.*?)\"|\u201c(.*?)\u201d")


def quoted_spans(text: str) -> list[str]:
    spans = [a or b for a, b in _QUOTED.findall(text)]
    return list(dict.fromkeys(spans)) if len(spans) > 1 else spans


def derive(text: str, mode: str | None) -> str | None:
    """The text an encoder with input ``mode`` reads from ``text``; None when the prompt holds none."""
    if mode in (None, PROMPT):
        return text
    if mode == QUOTED_TEXT:
        spans = quoted_spans(text)
        return "".join(f'Text "{s}". ' for s in spans) if spans else None
    raise ValueError(f"unknown text-encoder input '{mode}' (known: {PROMPT}, {QUOTED_TEXT}); fix the spec's 'input'.")
