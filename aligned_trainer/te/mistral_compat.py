"""Let ComfyUI's own FLUX.2 (Mistral-Small-3.1 "tekken") tokenizer build under transformers 5.

ComfyUI 0.3.75's ``comfy.text_encoders.flux.load_mistral_tokenizer`` turns the ``tekken_model`` bytes a FLUX.2
text-encoder file carries into a tokenizer: it builds a ``{token: rank}`` dict (control tokens at their ranks,
byte-level BPE pieces after them, ranks at or above ``default_vocab_size - len(special_tokens)`` dropped) and hands
it to transformers 4's ``MistralConverter(vocab=..., additional_special_tokens=...)``. transformers 5's
``MistralConverter`` only reads a tekken.json *file* (``vocab_file``), so the call raises a ``TypeError`` and no
FLUX.2 CLIP (stock ``CLIPLoader`` type flux2 included) can be built.

:func:`apply` (run when the pack loads) wraps that one function, only when the installed ``MistralConverter``
lacks transformers 4's ``vocab`` argument: for the duration of the call, ComfyUI's own function runs unchanged
with a converter that takes transformers 4's arguments and builds, in memory (no file is written), the tokenizer
transformers 4 built from them:

- ids are the dict's insertion order (control tokens first, as ComfyUI inserts them, then the BPE pieces), so a
  control token keeps its rank and BPE rank ``r`` gets ``r + number of control tokens``;
- BPE merges: every split of a piece into two pieces of the vocabulary, ordered by the piece's rank, ties by the
  ranks of the two halves; pieces stored as GPT-2 byte-level strings, merges not ignored at lookup
  (``ignore_merges``);
- ``<s>`` added before every sequence, as transformers 4's ``LlamaTokenizerFast`` (ComfyUI's tokenizer class) did
  with the converted tokenizer (transformers 5's keeps the converter's post-processor, so ComfyUI would find no start
  token);
- pre-tokenizer: transformers 4's default ``MistralConverter`` pattern (ComfyUI passes none; the tekken file's
  own ``config.pattern`` is not read, as under transformers 4), then byte-level without a prefix space;
  byte-level decoder and post-processor; the control tokens added as special tokens.

With transformers 4 (ComfyUI's function works), nothing is changed.
"""
from __future__ import annotations

import functools
import inspect
import logging
import sys
import threading

# transformers 4.x MistralConverter's default ``pattern`` argument (ComfyUI's call does not pass one)
TRANSFORMERS4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
MARK = "_aligned_trainer_transformers4_converter"
_LOCK = threading.Lock()


def _byte_strings():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return lambda piece: "".join(table[b] for b in piece)


class Transformers4MistralConverter:
    """transformers 4's ``MistralConverter`` call form (``vocab``: ``{token: rank}`` with the control tokens as
    ``str`` and the BPE pieces as ``bytes``, in id order), built with the ``tokenizers`` library directly."""

    def __init__(self, vocab=None, pattern=TRANSFORMERS4_PATTERN, add_prefix_space=False,
                 additional_special_tokens=None, **_):
        self.vocab = dict(vocab or {})
        self.pattern = pattern
        self.add_prefix_space = add_prefix_space
        self.special = list(additional_special_tokens or [])

    def vocab_and_merges(self) -> tuple[dict[str, int], list[tuple[str, str]]]:
        as_str = _byte_strings()
        special = set(self.special)
        ranks = self.vocab
        ids: dict[str, int] = {}
        found = []  # (rank of the piece, rank of left, rank of right, left, right)
        for idx, (token, rank) in enumerate(ranks.items()):
            if token in special or not isinstance(token, bytes):
                ids[token if isinstance(token, str) else as_str(token)] = idx
                continue
            ids[as_str(token)] = idx
            for cut in range(1, len(token)):
                left, right = token[:cut], token[cut:]
                if left in ranks and right in ranks:
                    found.append((rank, ranks[left], ranks[right], left, right))
        found.sort(key=lambda m: (m[0], m[1], m[2]))
        return ids, [(as_str(m[3]), as_str(m[4])) for m in found]

    def converted(self):
        from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
        from tokenizers.models import BPE

        ids, merges = self.vocab_and_merges()
        tok = Tokenizer(BPE(ids, merges, fuse_unk=False))
        if hasattr(tok.model, "ignore_merges"):
            tok.model.ignore_merges = True
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(self.pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=self.add_prefix_space, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([s if isinstance(s, str) else _byte_strings()(s) for s in self.special])
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        return tok


def add_start_token(tok, bos: str = "<s>") -> None:
    """Give ``tok`` the post-processor transformers 4's ``LlamaTokenizerFast`` (``add_bos_token`` True, ComfyUI's
    ``MistralTokenizerClass``) put on the converted tokenizer: ``<s>`` before every sequence. transformers 5's
    ``LlamaTokenizerFast`` keeps the given post-processor, and ComfyUI's ``SDTokenizer`` reads its start token from
    ``tokenizer('')``."""
    from tokenizers import processors

    bos_id = tok.token_to_id(bos)
    if bos_id is None:
        return
    tok.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                       special_tokens=[(bos, bos_id)])


def converter_takes_vocab() -> bool:
    """True when the installed transformers' ``MistralConverter`` takes transformers 4's ``vocab`` argument (ComfyUI's
    call works as written)."""
    try:
        from transformers.integrations.mistral import MistralConverter
    except ImportError:  # ComfyUI falls back to transformers' Pixtral conversion script there
        return True
    return "vocab" in inspect.signature(MistralConverter.__init__).parameters


def wrap(original):
    """``original`` (ComfyUI's ``load_mistral_tokenizer``) run with :class:`Transformers4MistralConverter` in place
    of ``transformers.integrations.mistral.MistralConverter`` for the call."""

    @functools.wraps(original)
    def load_mistral_tokenizer(data):
        module = sys.modules.get("transformers.integrations.mistral")
        if module is None:
            import transformers.integrations.mistral as module
        with _LOCK:
            saved = module.MistralConverter
            module.MistralConverter = Transformers4MistralConverter
            try:
                out = original(data)
            finally:
                module.MistralConverter = saved
        add_start_token(out["tokenizer_object"])
        return out

    setattr(load_mistral_tokenizer, MARK, True)
    return load_mistral_tokenizer


def apply() -> bool:
    """Wrap ``comfy.text_encoders.flux.load_mistral_tokenizer`` when transformers' converter no longer takes
    ComfyUI's arguments; True when the wrapper is in place (applied now or before)."""
    try:
        import comfy.text_encoders.flux as flux
    except ImportError:
        return False
    current = getattr(flux, "load_mistral_tokenizer", None)
    if current is None:
        return False
    if getattr(current, MARK, False):
        return True
    if converter_takes_vocab():
        return False
    flux.load_mistral_tokenizer = wrap(current)
    import transformers

    logging.info("aligned_trainer: ComfyUI's FLUX.2 tokenizer (comfy.text_encoders.flux.load_mistral_tokenizer) "
                 "adapted to transformers %s, whose MistralConverter takes a file instead of a vocabulary; "
                 "same tokens as under transformers 4", transformers.__version__)
    return True
