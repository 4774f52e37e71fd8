"""Prompt syntax: how caption/prompt text reaches a tokenizer.

``literal``: the text goes to the tokenizer as written, the way every official pipeline reads it (diffusers
``encode_prompt``, Stability's and BFL's reference code, kohya and ai-toolkit by default). ``comfyui``: ComfyUI's
tokenizer syntax is parsed first (``comfy/sd1_clip.py`` ``SDTokenizer.tokenize_with_weights``):

- ``(text)`` multiplies the weight of ``text`` by 1.1 per level and drops the brackets (``parse_parentheses``,
  ``token_weights``); ``(text:1.3)`` sets the weight to the number after the last ``:`` and drops it too, so
  ``(12:30)`` is the empty-looking text ``12`` at weight 30;
- ``\\(`` and ``\\)`` are ordinary brackets with the backslash removed (``escape_important``/``unescape_important``);
- each weighted segment is tokenized on its own (``hat(object)`` becomes ``hat`` + ``object``);
- ``embedding:name`` at the start of a segment or after a space/newline is a textual-inversion file from the
  CLIP's embeddings folder; the stock loaders always set one, so the word is replaced, or dropped with a
  warning when no such file exists.

Square brackets, ``BREAK``, ``{a|b}`` and ``AND`` are not tokenizer syntax in ComfyUI (``{a|b}`` and comments are
handled by the frontend in prompt widgets before the text reaches any node).
"""
from __future__ import annotations

import re

LITERAL = "literal"
COMFYUI = "comfyui"
SYNTAXES = (LITERAL, COMFYUI)
EMBEDDING = "embedding:"


class SyntaxChoiceError(ValueError):
    """An unknown prompt syntax name."""


def check(syntax: str) -> str:
    if syntax not in SYNTAXES:
        raise SyntaxChoiceError(f"unknown prompt syntax '{syntax}'; use one of {', '.join(SYNTAXES)} "
                                "('literal' reads text as the official pipelines do)")
    return syntax


def comfy_segments(text: str, weights: bool = True) -> list[tuple[str, float]]:
    """``text`` as ComfyUI's tokenizer splits it: (segment, weight) with brackets and escapes resolved.
    ``weights=False``: a family whose ComfyUI tokenizer disables emphasis weights (only escapes resolved)."""
    from comfy.sd1_clip import escape_important, token_weights, unescape_important

    if not weights:
        return [(unescape_important(escape_important(text)), 1.0)]
    return [(unescape_important(s), w) for s, w in token_weights(escape_important(text), 1.0)]


def embedding_names(segment: str) -> list[str]:
    """Names ComfyUI looks up as textual-inversion files in one segment (same split as its tokenizer)."""
    parts = re.split(" {0}|\n{0}".format(EMBEDDING), segment)
    words = parts[:1] + [EMBEDDING + p for p in parts[1:]]
    return [w[len(EMBEDDING):].strip("\n").split()[0] for w in words
            if w.startswith(EMBEDDING) and w[len(EMBEDDING):].strip()]


def comfy_changes(text: str, weights: bool = True) -> list[str]:
    """What ComfyUI's syntax does to ``text``, one readable line per effect (empty: nothing)."""
    segs = comfy_segments(text, weights)
    out = []
    weighted = [(s, w) for s, w in segs if abs(w - 1.0) > 1e-9]
    if weighted:
        out.append("weights: " + ", ".join(f"{s!r} x{w:.4g}" for s, w in weighted))
    joined = "".join(s for s, _ in segs)
    if joined != text:
        out.append(f"text seen: {joined!r} (brackets, weight numbers or backslashes removed)")
    if len(segs) > 1:
        out.append(f"tokenized in {len(segs)} separate segments")
    names = [n for s, _ in segs for n in embedding_names(s)]
    if names:
        out.append("textual-inversion names (replaced by the file, or dropped when missing, when the CLIP has an "
                   "embeddings folder): " + ", ".join(names))
    return out


def describe(text: str, syntax: str, weights: bool = True) -> dict:
    """``{'syntax', 'changes', 'comfyui_would'}``: what the syntax in effect changed in ``text``, and (for
    literal) what ComfyUI's syntax would have changed."""
    changes = comfy_changes(text, weights)
    if syntax == COMFYUI:
        return {"syntax": syntax, "changes": changes, "comfyui_would": changes}
    return {"syntax": syntax, "changes": [], "comfyui_would": changes}
