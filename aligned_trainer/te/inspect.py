"""Token inspection (how each encoder splits a text; trigger-word and truncation warnings) and the
alignment report (two CLIPs compared per encoder)."""
from __future__ import annotations

import torch

COMMON_FRACTION = 0.4  # single-token triggers with an id in the first 40% of the vocabulary are common words

from . import inputs
from . import syntax as sx
from .align import AlignedCLIP, clean_text, encoder_text, literal_ids
from .tokenizers import spec_tokenizer


def _subs(clip):
    """(token-dict key, sub-tokenizer) for each encoder of a ComfyUI CLIP."""
    out = {}
    tok = clip.tokenizer
    for name, sub in vars(tok).items():
        if hasattr(sub, "tokenize_with_weights") and hasattr(sub, "tokenizer"):
            out[name] = sub
    return out


def _key_for(attr: str, tokens: dict) -> str | None:
    for cand in (attr, attr.removeprefix("clip_"), "l" if attr == "clip_l" else None):
        if cand in tokens:
            return cand
    return None


def _sentencepiece(tok):
    """The SentencePieceProcessor inside ComfyUI's SPieceTokenizer (Gemma, Pile-T5 files), else None."""
    return None if hasattr(tok, "convert_ids_to_tokens") else getattr(tok, "tokenizer", None)


def token_pieces(sub, text: str) -> list[tuple[int, str]]:
    ids = sub.tokenizer(text)["input_ids"]
    sp = _sentencepiece(sub.tokenizer)
    pieces = [sp.id_to_piece(i) for i in ids] if sp is not None else sub.tokenizer.convert_ids_to_tokens(ids)
    return list(zip(ids, pieces))


def _ids_text(sub, ids: list[int]) -> str:
    """The text of token ids, as the tokenizer decodes it (transformers' ``convert_tokens_to_string`` on
    ComfyUI's CLIP tokenizer only joins the pieces, BPE word-end markers included)."""
    sp = _sentencepiece(sub.tokenizer)
    return sp.decode(ids) if sp is not None else sub.tokenizer.decode(ids)


def prompt_syntax(clip) -> str:
    """The prompt syntax a CLIP reads text with: the aligned CLIP's own; ComfyUI's for any other CLIP."""
    return getattr(clip, "prompt_syntax", sx.COMFYUI) if isinstance(clip, AlignedCLIP) else sx.COMFYUI


def comfy_weights(clip) -> bool:
    """Whether ComfyUI's syntax applies emphasis weights for this CLIP's family (its spec's ``comfy_weights``;
    True for a CLIP without a spec)."""
    if not isinstance(clip, AlignedCLIP):
        return True
    return all(e["comfy_weights"] is not False for e in clip.spec.encoders)


def _truncated_prompt_tokens(sub, enc, text: str, n_content: int) -> int:
    """How many of the prompt's own tokens a 'truncate' spec cuts: the templated text (system prompt, template
    suffix) is cut at max_length (+ the dropped prefix, which does not count), its end first; tokens of the
    template after the prompt are cut before the prompt's."""
    if not enc["template"]:
        room = enc["max_length"] - sum(1 for t in (sub.start_token, sub.end_token) if t is not None)
        return max(0, n_content - room)
    specials = sum(1 for t in (sub.start_token, sub.end_token) if t is not None)
    total = len(literal_ids(sub, encoder_text(text, enc)))
    head = enc["template"].split("{prompt}")[0] + clean_text(text, enc["cleaning"])
    suffix = max(0, total - len(literal_ids(sub, head)))
    cut = max(0, total + specials - enc["max_length"] - (enc["drop_prefix"] or 0))
    return min(n_content, max(0, cut - suffix))


def inspect_text(clip, text: str, trigger: str = "", vocab_words: int = 1) -> dict:
    """Per encoder: pieces and ids, how many positions the encoder sees, truncation, and warnings; the prompt
    syntax in effect and what it changed in the text (or, when literal, what ComfyUI's syntax would)."""
    tokens = clip.tokenize(text)
    report = {"text": text, "encoders": {}, "warnings": [], "syntax": sx.describe(text, prompt_syntax(clip),
                                                                                comfy_weights(clip))}
    limits = {}
    if isinstance(clip, AlignedCLIP):
        limits = {e.attr: e for e in clip.spec.encoders}
    for attr, sub in _subs(clip).items():
        if attr in limits:
            sub = spec_tokenizer(sub, limits[attr])
        key = _key_for(attr, tokens)
        enc = limits.get(attr)
        seen = text if enc is None else inputs.derive(text, enc["input"])  # byT5: the quoted text only
        seen = "" if seen is None else seen
        pieces = token_pieces(sub, seen)
        special = {sub.start_token, sub.end_token}
        content = [p for p in pieces if p[0] not in special]
        positions = sum(len(b) for b in tokens[key]) if key else None
        entry = {"pieces": [p for _, p in content], "ids": [i for i, _ in content], "content_tokens": len(content),
                 "positions": positions, "chunks": len(tokens[key]) if key else None}
        if enc is not None and enc["truncation"] == "truncate":
            dropped = _truncated_prompt_tokens(sub, enc, seen, len(content))
            room = len(content) - dropped
            entry["truncated_tokens"] = dropped
            if dropped:
                kept = _ids_text(sub, [i for i, _ in content[room:room + 12]]).strip()
                report["warnings"].append(f"{attr}: caption truncated, {dropped} token(s) dropped from '{kept}...'")
        elif positions and len(content) + 2 > getattr(sub, "max_length", 10 ** 9) < 10 ** 6:
            report["warnings"].append(f"{attr}: {len(content)} tokens exceed one {sub.max_length}-token window; "
                                      "ComfyUI splits it into chunks")
        if trigger:
            tp_ids = [(i, p) for i, p in token_pieces(sub, trigger) if i not in special]
            tp = [p for _, p in tp_ids]
            entry["trigger_pieces"] = tp
            vocab_size = len(sub.tokenizer.get_vocab())
            if len(tp) > vocab_words:
                report["warnings"].append(f"{attr}: trigger '{trigger}' splits into {len(tp)} pieces {tp}; "
                                          "a rarer single token trains more cleanly")
            elif tp_ids and tp_ids[0][0] < COMMON_FRACTION * vocab_size:
                # BPE / sentencepiece vocabularies are ordered roughly by frequency: a low id is a common word
                report["warnings"].append(f"{attr}: trigger '{trigger}' is an ordinary word (token id {tp_ids[0][0]} "
                                          f"of {vocab_size}); training will shift its existing meaning")
        report["encoders"][attr] = entry
    return report


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))


def _pads_left(clip) -> bool:
    return isinstance(clip, AlignedCLIP) and any(e["padding_side"] == "left" for e in clip.spec.encoders)


def compare_clips(clip_a, clip_b, prompts: list[str]) -> list[dict]:
    """For each prompt: shapes, tokens used/truncated, cosine of the common positions and of pooled
    vectors, norm/std of each, and statistics of the positions only one side has (padding)."""
    rows = []
    for prompt in prompts:
        oa = clip_a.encode_from_tokens(clip_a.tokenize(prompt), return_dict=True)
        ob = clip_b.encode_from_tokens(clip_b.tokenize(prompt), return_dict=True)
        ca, cb = oa["cond"].float(), ob["cond"].float()
        n = min(ca.shape[1], cb.shape[1])
        # a side that pads on the left (FLUX.2) and is the longer one holds its padding first: compare the other side
        # with its last n positions, and report its first ones as the positions only it has
        if _pads_left(clip_a) and ca.shape[1] > n:
            ca = torch.cat([ca[:, -n:], ca[:, :-n]], dim=1)
        elif _pads_left(clip_b) and cb.shape[1] > n:
            cb = torch.cat([cb[:, -n:], cb[:, :-n]], dim=1)
        row = {"prompt": prompt, "positions_a": int(ca.shape[1]), "positions_b": int(cb.shape[1]),
               "seq_cosine": _cos(ca[:, :n], cb[:, :n]),
               "min_token_cosine": float(torch.nn.functional.cosine_similarity(ca[0, :n], cb[0, :n], dim=-1).min()),
               "norm_a": float(ca.norm()), "norm_b": float(cb.norm()), "std_a": float(ca.std()), "std_b": float(cb.std()),
               "mask_a": "attention_mask" in oa, "mask_b": "attention_mask" in ob,
               "syntax_a": prompt_syntax(clip_a), "syntax_b": prompt_syntax(clip_b),
               "comfyui_syntax_changes": sx.comfy_changes(prompt, comfy_weights(clip_a))}
        extra = ca[:, n:] if ca.shape[1] > n else cb[:, n:]
        row["extra_positions_norm"] = float(extra.norm(dim=-1).mean()) if extra.numel() else 0.0
        pa, pb = oa.get("pooled_output"), ob.get("pooled_output")
        row["pooled_cosine"] = _cos(pa, pb) if pa is not None and pb is not None else None
        info = inspect_text(clip_a, prompt)
        row["tokens"] = {k: v["content_tokens"] for k, v in info["encoders"].items()}
        row["truncated_a"] = {k: v.get("truncated_tokens", 0) for k, v in info["encoders"].items()}
        rows.append(row)
    return rows
