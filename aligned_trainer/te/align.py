"""Apply a text-encoder spec to a ComfyUI ``CLIP``.

The aligned CLIP is a ``comfy.sd.CLIP`` (so ``CLIPTextEncode`` and every sampler use it unchanged) whose
``tokenize`` builds each encoder's tokens the way the spec says (truncate vs chunk, length, padding,
pad token, character cap, template, cleaning, prompt syntax) and whose ``encode_from_tokens`` sets each encoder's
options for the call (hidden layer, final layer norm, attention masks in the encoder and to the denoiser,
zeroed pads, projected pooled) and restores them afterwards, because ComfyUI shares one encoder model
between clones. ComfyUI's files are not touched.

Text is read literally, as the official pipelines read it (the spec's ``prompt_syntax``), unless ComfyUI's
prompt syntax (emphasis weights, escapes, ``embedding:`` names) is chosen explicitly; see ``syntax.py``.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import html
import inspect
import re
import urllib.parse

import comfy.sd
import torch

from . import inputs
from . import syntax as sx
from .specs import EncoderSpec, SpecError, TESpec, detect_spec, get_spec
from .tokenizers import spec_tokenizer

NO_LIMIT = 10 ** 9


def clean_text(text: str, mode: str) -> str:
    """Caption cleaning named by the spec: ``whitespace`` collapses runs of spaces; ``pixart`` also
    unescapes HTML entities/URL quoting and drops URLs (the gist of diffusers' ``_clean_caption``);
    ``html_whitespace`` unescapes HTML entities twice, then collapses whitespace (Wan's ``prompt_clean``)."""
    if mode == "none":
        return text
    if mode == "drop_img_token":  # diffusers FLUX.2 format_input: prompt.replace("[IMG]", "")
        return text.replace("[IMG]", "")
    if mode == "html_whitespace":
        text = html.unescape(html.unescape(text)).strip()
    if mode == "pixart":
        text = urllib.parse.unquote_plus(html.unescape(text))
        text = re.sub(r"\b(?:https?:|www\.)\S+", "", text)
        text = text.lower()
    return re.sub(r"\s+", " ", text).strip()


def encoder_text(text: str, enc: EncoderSpec) -> str:
    text = clean_text(text, enc["cleaning"])
    if text == "" and enc["empty_prompt"] == "space":  # HunyuanVideo 1.5: format_text_input's `p if p else " "`
        text = " "
    if enc["template"]:
        text = enc["template"].replace("{prompt}", text)
    if enc["char_cap"]:
        text = text[: enc["char_cap"]]
    return text


def pad_id(sub, enc: EncoderSpec) -> int:
    mode = enc["pad_token"]
    if mode == "end":
        return sub.end_token
    if mode == "zero":
        return 0
    return sub.pad_token


def literal_ids(sub, text: str) -> list[int]:
    """Content token ids of ``text`` read literally: the encoder's own tokenizer on the text as written, without
    the start/end tokens (added back by the caller, as ComfyUI's tokenizer does)."""
    ids = sub.tokenizer(text)["input_ids"]
    return ids[sub.tokens_start:-1 if sub.tokenizer_adds_end_token else None]


def chunk_groups(s, groups: list[list[int]]) -> list[list[tuple]]:
    """Word groups laid into ``s.max_length`` windows the way ComfyUI's and Stability's reference tokenizers do:
    a group that does not fit starts the next window, unless it has ``max_word_length`` pieces or more (then it
    is split); every window gets start/end tokens, windows are padded as ``s`` says."""
    start = [(s.start_token, 1.0, 0)] if s.start_token is not None else []
    end = [(s.end_token, 1.0, 0)] if s.end_token is not None else []
    batch = list(start)
    batches = [batch]
    for i, ids in enumerate(groups):
        group = [(t, 1.0, i + 1) for t in ids]
        large = len(group) >= s.max_word_length
        while group:
            room = s.max_length - len(batch) - len(end)
            if len(group) <= room:
                batch.extend(group)
                break
            if large:
                batch.extend(group[:room])
                group = group[room:]
                batch.extend(end)
            else:
                batch.extend(end)
                if s.pad_to_max_length:
                    s.pad_tokens(batch, room)
            batch = list(start)
            batches.append(batch)
    batch.extend(end)
    if s.pad_to_max_length and len(batch) < s.max_length:
        s.pad_tokens(batch, s.max_length - len(batch))
    if s.min_length is not None and len(batch) < s.min_length:
        s.pad_tokens(batch, s.min_length - len(batch))
    return batches


def _words(text: str) -> list[str]:
    return [w for w in text.replace("\n", " ").split(" ") if w]


def tokenize_encoder(sub, enc: EncoderSpec, text: str, return_word_ids: bool, kwargs: dict,
                     syntax: str = sx.LITERAL) -> list:
    """Tokens for one encoder, as ComfyUI's tokenizer returns them (list of batches of tuples). ``literal``
    tokenizes the text as written; ``comfyui`` lets ComfyUI's tokenizer parse its prompt syntax first. An encoder
    whose ``input`` the prompt does not hold (no quoted text) gets pad tokens only (its output is zeroed)."""
    derived = inputs.derive(text, enc["input"])
    sub = spec_tokenizer(sub, enc)
    if derived is None:
        seq = [(pad_id(sub, enc), 1.0, 0)] * (enc["max_length"] if enc["padding"] == "max_length" else 1)
        return [seq if return_word_ids else [(t, w) for t, w, _ in seq]]
    text = encoder_text(derived, enc)
    kwargs = dict(kwargs)
    opts = {k: v for k, v in kwargs.get("tokenizer_options", {}).items()
            if not k.startswith(f"{sub.embedding_key}_min_")}
    kwargs["tokenizer_options"] = opts
    if enc["comfy_weights"] is False:  # the family's ComfyUI tokenizer ignores emphasis weights (Z-Image)
        kwargs["disable_weights"] = True
    literal = sx.check(syntax) == sx.LITERAL
    if enc["truncation"] in ("chunk", "first_chunk"):
        # word-aligned chunking at the spec's length; first_chunk keeps only the first one
        s = copy.copy(sub)
        s.max_length = enc["max_length"]
        s.pad_to_max_length = enc["padding"] == "max_length"
        s.min_length = enc["min_length"]
        s.pad_with_end = enc["pad_token"] == "end"
        s.pad_token = pad_id(sub, enc)
        if literal:
            chunks = chunk_groups(s, [literal_ids(sub, w) for w in _words(text)])
            if not return_word_ids:
                chunks = [[(t, w) for t, w, _ in c] for c in chunks]
        else:
            chunks = s.tokenize_with_weights(text, return_word_ids, **kwargs)
        return chunks[:1] if enc["truncation"] == "first_chunk" else chunks
    # One sequence with every token, then truncate ("truncate" = tokenizer(..., truncation=True)) or keep it
    # whole ("none"), and pad it ourselves.
    if literal:
        start = (sub.start_token, 1.0, 0) if sub.start_token is not None else None
        end = (sub.end_token, 1.0, 0) if sub.end_token is not None else None
        body = [(t, 1.0, 1) for t in literal_ids(sub, text)]
    else:
        s = copy.copy(sub)
        s.max_length, s.pad_to_max_length, s.min_length, s.min_padding = NO_LIMIT, False, None, None
        flat = [t for batch in s.tokenize_with_weights(text, True, **kwargs) for t in batch]
        start = flat[0] if sub.start_token is not None and flat and flat[0][0] == sub.start_token else None
        body = flat[1:] if start is not None else flat
        end = body[-1] if sub.end_token is not None and body and body[-1][0] == sub.end_token else None
        if end is not None:
            body = body[:-1]
    n_special = (start is not None) + (end is not None)
    dropped = enc["drop_prefix"] or 0  # removed after encoding: max_length counts what is kept
    if enc["truncation"] == "truncate":
        body = body[: enc["max_length"] + dropped - n_special]
    seq = ([start] if start is not None else []) + body + ([end] if end is not None else [])
    target = len(seq)
    if enc["padding"] == "max_length":
        target = max(target, enc["max_length"] + dropped)
    if enc["min_length"]:
        target = max(target, enc["min_length"])
    pad = [(pad_id(sub, enc), 1.0, 0)] * (target - len(seq))
    seq = pad + seq if enc["padding_side"] == "left" else seq + pad
    if not return_word_ids:
        seq = [(t, w) for t, w, _ in seq]
    return [seq]


def comfy_window(sub) -> int | None:
    """The one sequence length ComfyUI's encoder for ``sub`` accepts, or None: ComfyUI's CLIP adds its whole
    position table to the tokens, so a tokenizer that pads to its window (``pad_to_max_length``) must give
    exactly ``max_length`` tokens (77, or 248 for HiDream's long CLIPs, read from the file by ComfyUI's loader)."""
    return sub.max_length if getattr(sub, "pad_to_max_length", False) and sub.max_length < NO_LIMIT else None


def fit_window(sub, enc: EncoderSpec, batches: list) -> list:
    """``batches`` padded (with the spec's pad id) to the one length ComfyUI's encoder for ``sub`` accepts, when it
    has one. Padding after the end token changes neither the pooled vector nor the positions before it (causal
    attention), so a spec that pads to fewer or more positions (HiDream: 128 in a 248-position CLIP) is met by
    padding to (or cutting the padding at) the window; content that does not fit cannot be encoded by this CLIP."""
    window = comfy_window(sub)
    if window is None or all(len(b) == window for b in batches):
        return batches
    out = []
    for b in batches:
        used = _used(sub, b)
        if used > window:
            raise SpecError(f"the text-encoder spec keeps up to {enc['max_length']} tokens for encoder '{enc.key}' "
                            f"({enc.attr}), but this CLIP's {enc.attr} has only {window} positions and the prompt has "
                            f"{used}. Load the family's own text-encoder files (HiDream's CLIP-L/CLIP-G have 248 "
                            "positions) or shorten the prompt.")
        pad = (pad_id(sub, enc), 1.0, 0)[:len(b[0])] if b else (pad_id(sub, enc), 1.0)
        out.append((list(b) + [pad] * (window - len(b)))[:window])  # only padding after the end token is cut
    return out


def _used(sub, batch: list) -> int:
    """Positions up to and including the first end token (all of them when there is none)."""
    for i, t in enumerate(batch):
        if isinstance(t[0], int) and t[0] == sub.end_token:
            return i + 1
    return len(batch)


def _content_count(tokens: list, sub) -> int:
    special = {sub.start_token, sub.end_token, sub.pad_token, 0 if sub.pad_token is not None else None}
    return sum(1 for batch in tokens for t in batch if not isinstance(t[0], int) or t[0] not in special)


def encoder_model(cond_stage_model, enc: EncoderSpec):
    """The encoder module for ``enc``: ComfyUI names it like the tokenizer (``clip_l``) or, for single-encoder
    models built with ``SD1ClipModel(name=...)``, without the ``clip_`` prefix (PixArt/Chroma ``t5xxl``)."""
    for name in (enc["comfy_model_attr"] or enc.attr, enc.attr.removeprefix("clip_")):
        m = getattr(cond_stage_model, name, None)
        if m is not None and hasattr(m, "enable_attention_masks"):
            return m
    return None


def show_pad_tokens(mask: torch.Tensor, n: int) -> torch.Tensor:
    """The denoiser mask with the first ``n`` padded positions after the content visible (Chroma: 1)."""
    mask = mask.clone()
    idx = torch.arange(mask.shape[-1], device=mask.device).unsqueeze(0)
    used = mask.sum(dim=-1, keepdim=True)
    return torch.where((idx >= used) & (idx < used + n), torch.ones_like(mask), mask)


# the spec's hidden_layer as ComfyUI's SDClipModel (layer, layer_idx); "all" stacks every layer's output (ComfyUI's
# Llama returns the embedding output first, which the family's own text-encoder class drops, as HiDream's does)
COMFY_LAYERS = {"last": ("last", None), "penultimate": ("hidden", -2), "third_last": ("hidden", -3), "all": ("all", None)}


def comfy_layer(hidden_layer) -> tuple:
    """The spec's ``hidden_layer`` as ComfyUI's SDClipModel (layer, layer_idx): a name of ``COMFY_LAYERS``, or a list of
    hidden-state indices, which ComfyUI's SDClipModel takes as its ``layer`` (FLUX.2's Mistral3_24BModel: [10, 20, 30];
    the family's text-encoder class stacks them)."""
    if isinstance(hidden_layer, list):
        return list(hidden_layer), None
    return COMFY_LAYERS[hidden_layer]


def leading_pads(tokens: list, pad: int) -> torch.Tensor:
    """(batch, positions) mask: 0 for the pad tokens before each sequence's first other token, 1 elsewhere."""
    rows = []
    for seq in tokens:
        n = 0
        for t in seq:
            if not (isinstance(t, int) and t == pad):
                break
            n += 1
        rows.append([0] * n + [1] * (len(seq) - n))
    return torch.tensor(rows, dtype=torch.long)


def _attention_module(m):
    """The module of ``m``'s ComfyUI transformer that picks its attention function (``comfy.text_encoders.llama``)."""
    import sys

    module = sys.modules.get(type(getattr(m, "transformer", None)).__module__)
    return module if module is not None and hasattr(module, "optimized_attention_for_device") else None


def _zero_unattended(pick):
    """ComfyUI's attention chooser ``pick`` whose functions give a zero output for a query whose every key is masked
    out (transformers' attention does; ComfyUI's -inf masks give NaN there)."""

    def chooser(*args, **kwargs):
        attention = pick(*args, **kwargs)

        def run(q, k, v, heads, mask=None, **kw):
            out = attention(q, k, v, heads, mask=mask, **kw)
            if mask is None or kw.get("skip_output_reshape"):
                return out
            dead = torch.isneginf(mask).all(dim=-1)  # (batch, 1 | heads, queries)
            dead = dead.reshape(dead.shape[0], -1, dead.shape[-1]).all(dim=1)
            return out.masked_fill(dead.unsqueeze(-1).to(out.device), 0.0) if dead.any() else out

        return run

    return chooser


@contextlib.contextmanager
def left_padding(cond_stage_model, spec: TESpec, pads: dict):
    """For one encode call, each encoder whose spec pads on the left with a mask in the encoder gets that mask (its
    leading pads masked out as keys; ComfyUI masks only what follows the first pad) and a zero attention output for a
    position that can attend to nothing (a leading pad under causal attention), as transformers computes them.
    ``pads``: the pad id by encoder key. Nothing changes for other specs."""
    saved = []
    try:
        for enc in spec.encoders:
            if enc["padding_side"] != "left" or not enc["encoder_attention_mask"] or enc.key not in pads:
                continue
            m = encoder_model(cond_stage_model, enc)
            module = _attention_module(m) if m is not None else None
            if module is None:
                raise SpecError(f"text-encoder spec '{spec.key}' pads encoder '{enc.key}' on the left with an attention "
                                f"mask, which this engine applies to ComfyUI's LLM text encoders only (not "
                                f"{type(m).__name__}); use the spec with the family's own ComfyUI text encoder.")
            pad, original = pads[enc.key], m.process_tokens

            def process_tokens(tokens, device, _original=original, _pad=pad):
                embeds, mask, num_tokens, info = _original(tokens, device)
                mask = mask * leading_pads(tokens, _pad).to(mask.device)
                return embeds, mask, [int(n) for n in mask.sum(dim=1)], info

            saved.append((m, "process_tokens", m.__dict__.get("process_tokens")))
            m.process_tokens = process_tokens
            saved.append((module, "optimized_attention_for_device", module.optimized_attention_for_device))
            module.optimized_attention_for_device = _zero_unattended(module.optimized_attention_for_device)
        yield
    finally:
        for obj, name, value in reversed(saved):
            if value is None and isinstance(obj, torch.nn.Module):
                obj.__dict__.pop(name, None)
            else:
                setattr(obj, name, value)


@contextlib.contextmanager
def encoder_options(cond_stage_model, spec: TESpec):
    """Set each encoder's options from the spec for one encode call; restore them afterwards."""
    saved = []
    try:
        for enc in spec.encoders:
            m = encoder_model(cond_stage_model, enc)
            if m is None:
                continue
            saved.append((m, m.options_default, m.enable_attention_masks, m.return_attention_masks,
                          m.zero_out_masked, m.layer_norm_hidden_state))
            layer = comfy_layer(enc["hidden_layer"])
            projected = enc["pooled"] == "eos_projected"
            m.options_default = (layer[0], layer[1], projected)
            m.enable_attention_masks = bool(enc["encoder_attention_mask"])
            # a module whose ComfyUI class returns masks keeps returning them (FLUX.2's Flux2TEModel unpacks them);
            # encode_from_tokens drops the mask when no encoder sends one to the denoiser
            m.return_attention_masks = bool(enc["denoiser_attention_mask"]) or (
                bool(m.return_attention_masks) and not any(e["denoiser_attention_mask"] for e in spec.encoders))
            m.zero_out_masked = bool(enc["zero_padded"])
            if enc["final_layer_norm"] is not None and layer[0] != "last":
                m.layer_norm_hidden_state = bool(enc["final_layer_norm"])
            m.reset_clip_options()
        yield
    finally:
        for m, default, eam, ram, zom, lnh in saved:
            m.options_default = default
            m.enable_attention_masks, m.return_attention_masks, m.zero_out_masked = eam, ram, zom
            m.layer_norm_hidden_state = lnh
            m.reset_clip_options()


def _template_end_method(cls):
    """The ``encode_token_weights`` nearest to ``cls`` in its class hierarchy that takes ComfyUI's ``template_end``
    (Qwen-Image's own; for HunyuanVideo 1.5's ``HunyuanImageTEModel``, whose override finds the end heuristically
    and adds byT5, the Qwen-Image one it calls), or None."""
    for c in cls.__mro__:
        method = c.__dict__.get("encode_token_weights")
        if method is not None and "template_end" in inspect.signature(method).parameters:
            return method
    return None


def extra_output_encoders(spec: TESpec) -> list[EncoderSpec]:
    """Encoders whose output goes under its own conditioning key (``output_key``, HunyuanVideo 1.5's byT5)."""
    return [e for e in spec.encoders if e["output_key"]]


def _extra_output(cond_stage_model, enc: EncoderSpec, batches: list, absent: bool) -> dict:
    """One extra-output encoder run on its own tokens by its own ComfyUI encoder module: ``{output_key: states}``
    and, with ``denoiser_attention_mask``, ``{output_key}_attention_mask``. Without its input in the prompt
    (``absent``) and ``empty_prompt`` zeros, both are zeros (the reference's zeros and zero mask)."""
    m = encoder_model(cond_stage_model, enc)
    if m is None:
        raise SpecError(f"the text-encoder spec has an encoder '{enc.key}' ({enc['comfy_model_attr'] or enc.attr}) "
                        f"that ComfyUI's {type(cond_stage_model).__name__} does not hold; load the family's own text "
                        "encoder files (both of them) with the family's CLIP type.")
    o = m.encode_token_weights(batches)
    states = o[0]
    mask = o[2].get("attention_mask") if len(o) > 2 else None
    if absent and enc["empty_prompt"] == "zeros":
        states = torch.zeros_like(states)
        mask = torch.zeros_like(mask) if mask is not None else None
    out = {enc["output_key"]: states}
    if enc["denoiser_attention_mask"] and mask is not None:
        out[f"{enc['output_key']}_attention_mask"] = mask
    return out


@contextlib.contextmanager
def spec_encoding(cond_stage_model, spec: TESpec, absent: frozenset = frozenset()):
    """For one encode call, have ComfyUI's text-encoder model (1) cut exactly the spec's ``drop_prefix`` leading
    positions (output and mask) through its own ``template_end`` argument, instead of finding the template's end by
    its heuristic, and (2) add each extra-output encoder's states under its ``output_key``, encoded from that
    encoder's own tokens (``absent``: keys whose input the prompt does not hold). Nothing changes for specs
    without either."""
    extra = extra_output_encoders(spec)
    main = [e for e in spec.encoders if not e["output_key"]]
    drops = [(enc.key, enc["drop_prefix"]) for enc in main if enc["drop_prefix"]]
    if not drops and not extra:
        yield
        return
    method, kwargs = type(cond_stage_model).encode_token_weights, {}
    if drops:
        method = _template_end_method(type(cond_stage_model))
        if len(main) != 1 or method is None:
            raise SpecError(f"text-encoder spec '{spec.key}' drops a template prefix ({drops[0][0]}: drop_prefix "
                            f"{drops[0][1]}), but ComfyUI's {type(cond_stage_model).__name__} takes no template_end "
                            "to cut it; use this spec with the family's own ComfyUI text encoder.")
        kwargs = {"template_end": drops[0][1]}
    extra_keys = {e.key for e in extra}

    def encode_token_weights(token_weight_pairs):
        pairs = {k: v for k, v in token_weight_pairs.items() if k not in extra_keys}
        o = method(cond_stage_model, pairs, **kwargs)
        more = dict(o[2]) if len(o) > 2 else {}
        for enc in extra:
            if enc.key in token_weight_pairs:
                more.update(_extra_output(cond_stage_model, enc, token_weight_pairs[enc.key], enc.key in absent))
        return o[0], o[1], more

    missing = object()
    saved = cond_stage_model.__dict__.get("encode_token_weights", missing)
    cond_stage_model.encode_token_weights = encode_token_weights
    try:
        yield
    finally:
        if saved is missing:
            del cond_stage_model.encode_token_weights
        else:
            cond_stage_model.encode_token_weights = saved


def strip_padding(out: dict, spec: TESpec) -> dict:
    """``out`` (a conditioning dict) with, for each encoder whose spec says ``strip_padding``, the positions its mask
    leaves out removed and the mask dropped (an extra-output encoder with no position left loses its key)."""
    out = dict(out)
    for enc in spec.encoders:
        if not enc["strip_padding"]:
            continue
        key = enc["output_key"] or "cond"
        mask = out.pop(f"{key}_attention_mask" if enc["output_key"] else "attention_mask", None)
        if mask is None or key not in out:
            continue  # ComfyUI gives no mask when every position is kept
        if mask.shape[0] != 1:
            raise SpecError(f"text-encoder spec '{spec.key}' removes the padding of '{enc.key}', which needs one prompt "
                            f"per encode (got a batch of {mask.shape[0]}); encode the prompts one at a time.")
        keep = mask[0].bool()
        if keep.any():
            out[key] = out[key][:, keep.to(out[key].device)]
        elif enc["output_key"]:
            del out[key]
    return out


class AlignedCLIP(comfy.sd.CLIP):
    """A ComfyUI CLIP that tokenizes and encodes the way ``spec`` says, reading prompts with ``prompt_syntax``
    (the spec's own, literal, unless ComfyUI's syntax was chosen). Survives ``clone()``."""

    spec: TESpec
    prompt_syntax: str = sx.LITERAL

    @property
    def aligned_trainer_spec(self) -> dict:
        return {**self.spec.identity(), "prompt_syntax": self.prompt_syntax}

    def clone(self):
        n = super().clone()
        n.__class__ = AlignedCLIP
        n.spec = self.spec
        n.prompt_syntax = self.prompt_syntax
        return n

    def with_syntax(self, syntax: str) -> "AlignedCLIP":
        """A clone reading prompts with ``syntax`` (this CLIP is unchanged)."""
        n = self.clone()
        n.prompt_syntax = sx.check(syntax)
        return n

    def training_clip(self) -> "AlignedCLIP":
        """The CLIP to encode training captions with: captions are always read literally, as the official
        trainers read them, whatever syntax this CLIP uses for inference prompts."""
        return self if self.prompt_syntax == sx.LITERAL else self.with_syntax(sx.LITERAL)

    def _sub(self, enc: EncoderSpec):
        return getattr(self.tokenizer, enc.attr, None)

    def tokenize(self, text, return_word_ids=False, **kwargs):
        keyed = [(enc, self._sub(enc)) for enc in self.spec.encoders]
        # literal: ComfyUI's tokenizer only gives the dict's layout (on "", so no syntax parsing and no
        # embedding look-ups happen); its own tokens are kept for keys the spec does not cover
        out = super().tokenize("" if self.prompt_syntax == sx.LITERAL else text, return_word_ids, **kwargs)
        covered = {enc.key for enc, sub in keyed if sub is not None and enc.key in out}
        if self.prompt_syntax == sx.LITERAL and set(out) - covered:
            out = super().tokenize(text, return_word_ids, **kwargs)
        opts = {**self.tokenizer_options, **kwargs.get("tokenizer_options", {})}
        kw = {k: v for k, v in kwargs.items() if k != "tokenizer_options"}
        kw["tokenizer_options"] = opts
        for enc, sub in keyed:
            # an encoder reading a derived input (quoted text) always has its key: ComfyUI's tokenizer adds it only
            # when the prompt holds that input
            if sub is not None and (enc.key in out or enc["input"] not in (None, inputs.PROMPT)):
                out[enc.key] = tokenize_encoder(sub, enc, text, return_word_ids, kw, self.prompt_syntax)
        return out

    def _zero_empty(self, tokens) -> bool:
        """True when the spec says an empty prompt is zeros and these tokens hold no content."""
        zero_encs = [e for e in self.spec.encoders if e["empty_prompt"] == "zeros"]
        if not zero_encs or not isinstance(tokens, dict):
            return False
        for enc in self.spec.encoders:
            sub = self._sub(enc)
            if sub is not None and enc.key in tokens and _content_count(tokens[enc.key], sub) > 0:
                return False
        return True

    def _fit_windows(self, tokens):
        """The tokens with each CLIP encoder's sequences padded to the window ComfyUI's CLIP takes (``fit_window``)."""
        if not isinstance(tokens, dict):
            return tokens
        out = dict(tokens)
        for enc in self.spec.encoders:
            sub = self._sub(enc)
            if sub is not None and enc.key in out:
                out[enc.key] = fit_window(sub, enc, out[enc.key])
        return out

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        tokens = self._fit_windows(tokens)
        absent = frozenset(e.key for e in extra_output_encoders(self.spec)
                           if isinstance(tokens, dict) and e.key in tokens and self._sub(e) is not None
                           and all(t[0] == pad_id(self._sub(e), e) for b in tokens[e.key] for t in b))
        pads = {e.key: pad_id(self._sub(e), e) for e in self.spec.encoders if self._sub(e) is not None}
        with encoder_options(self.cond_stage_model, self.spec), \
                spec_encoding(self.cond_stage_model, self.spec, absent), \
                left_padding(self.cond_stage_model, self.spec, pads):
            out = super().encode_from_tokens(tokens, return_pooled=return_pooled, return_dict=return_dict)
        if return_dict:
            out = strip_padding(out, self.spec)
            if "attention_mask" in out and not any(e["denoiser_attention_mask"] for e in self.spec.encoders):
                out = {k: v for k, v in out.items() if k != "attention_mask"}
        visible = [e["visible_pad_tokens"] for e in self.spec.encoders if e["visible_pad_tokens"]]
        if return_dict and visible and out.get("attention_mask") is not None:
            out = dict(out)
            out["attention_mask"] = show_pad_tokens(out["attention_mask"], int(visible[0]))
        scale = {e["output_scale"] for e in self.spec.encoders}
        zero = self._zero_empty(tokens)
        if not zero and scale == {1.0}:
            return out
        factor = 0.0 if zero else float(next(iter(scale)))

        def fix(t):
            return t * factor if isinstance(t, torch.Tensor) else t

        if return_dict:
            out = dict(out)
            out["cond"] = fix(out["cond"])
            if out.get("pooled_output") is not None:
                out["pooled_output"] = fix(out["pooled_output"])
            return out
        if return_pooled:
            return fix(out[0]), fix(out[1])
        return fix(out)


def resolve_spec(clip, spec: str | TESpec | None) -> TESpec:
    if isinstance(spec, TESpec):
        return spec
    if spec in (None, "", "auto"):
        return detect_spec(clip)
    return get_spec(spec)


def align_clip(clip, spec: str | TESpec | None = "auto", prompt_syntax: str | None = None) -> AlignedCLIP:
    """A new CLIP following ``spec`` (``auto`` detects it from the CLIP); ``clip`` is left unchanged.
    ``prompt_syntax`` None follows the spec (literal, as the official pipelines); ``comfyui`` parses ComfyUI's
    prompt syntax."""
    if isinstance(clip, AlignedCLIP):
        clip = unaligned(clip)
    s = resolve_spec(clip, spec)
    n = clip.clone()
    n.__class__ = AlignedCLIP
    n.spec = s
    n.prompt_syntax = sx.check(prompt_syntax or spec_syntax(s))
    n.layer_idx = None  # the spec decides each encoder's layer
    return n


def spec_syntax(spec: TESpec) -> str:
    """The prompt syntax the spec's official pipeline uses (``literal`` for every shipped spec)."""
    entry = spec.raw.get("prompt_syntax")
    return entry["value"] if isinstance(entry, dict) else (entry or sx.LITERAL)


def unaligned(clip) -> comfy.sd.CLIP:
    """A plain ComfyUI CLIP sharing the same weights (ComfyUI's default behaviour)."""
    n = comfy.sd.CLIP.clone(clip)
    n.__class__ = comfy.sd.CLIP
    return n
