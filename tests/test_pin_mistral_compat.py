"""The FLUX.2 tokenizer adaptation (te/mistral_compat.py) pinned piece by piece, each built inside the test (the
pack's own wrapper is made when ComfyUI registers the pack, so tests that only use it cannot see a change to how a
wrapper or converter is built). Expected values are written out by hand from transformers 4's MistralConverter
rules that the module's docstring states: ids in the dict's order, merges ordered by the merged piece's rank then
the ranks of its halves, whole pieces looked up before merging, transformers 4's pre-tokenizer pattern then
byte-level without its own regex, offsets not trimmed, <s> before each sequence of a pair too."""
from __future__ import annotations

import pytest

from support.factories import te_flux2

CONTROL = ["<unk>", "<s>", "</s>"]


@pytest.fixture(scope="module")
def compat(comfy):
    return comfy.engine("te.mistral_compat")


def _vocab(pieces: list[bytes]) -> dict:
    """ComfyUI's dict: the control tokens (str) at their ranks, then the BPE pieces (bytes) after them."""
    return {**{s: i for i, s in enumerate(CONTROL)}, **{p: len(CONTROL) + r for r, p in enumerate(pieces)}}


def _converter(compat, pieces, order=None):
    vocab = _vocab(pieces)
    if order is not None:  # the same ranks inserted in another order
        vocab = {k: vocab[k] for k in order}
    return compat.Transformers4MistralConverter(vocab=vocab, additional_special_tokens=CONTROL)


def test_merges_follow_the_pieces_rank_then_the_halves_ranks(compat):
    """b"abc" splits two ways into pieces of the vocabulary: (a, bc) and (ab, c). Both merges are kept, after
    those of lower-ranked pieces; between the two, the one whose left half ranks lower (a: 0 < ab: 3) first,
    although its right half ranks higher (bc: 4 > c: 2). Inserted in another order, the merges are the same."""
    pieces = [b"a", b"b", b"c", b"ab", b"bc", b"abc"]
    ids, merges = _converter(compat, pieces).vocab_and_merges()
    assert ids == {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4, "c": 5, "ab": 6, "bc": 7, "abc": 8}
    assert merges == [("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c")]
    shuffled = [b"abc", b"c", "<s>", b"bc", b"a", "<unk>", b"ab", "</s>", b"b"]
    _, merges2 = _converter(compat, pieces, order=shuffled).vocab_and_merges()
    assert merges2 == merges


def test_byte_pieces_become_gpt2_byte_strings(compat):
    """A space byte is stored as GPT-2's byte-level 'Ġ', as transformers 4's converter stored it."""
    ids, merges = _converter(compat, [b" ", b"a", b" a"]).vocab_and_merges()
    assert ids["\u0120a"] == 5 and merges == [("\u0120", "a")]


def test_whole_pieces_are_looked_up_before_merging(compat):
    """b"xyz" has no split into two pieces of the vocabulary, so no merge makes it; transformers 4's tokenizer
    looked whole words up first (ignore_merges), giving its id, not x, y, z."""
    tok = _converter(compat, [b"x", b"y", b"z", b"xyz"]).converted()
    assert tok.encode("xyz", add_special_tokens=False).ids == [6]
    assert tok.encode("zyx", add_special_tokens=False).ids == [5, 4, 3]


def test_pre_tokenizer_is_transformers_4s_pattern_then_byte_level_alone(compat):
    """transformers 4's default pattern (ComfyUI passes none): numbers in runs of up to three, punctuation keeps its
    trailing newlines, a leading space joins the word; the byte-level step adds no split of its own (GPT-2's regex
    would cut '!' from '\\n' and '1234' differently) and no prefix space."""
    tok = _converter(compat, [b"a"]).converted()
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("hi!\n 12345 you're")]
    assert pieces == ["hi", "!Ċ", "Ġ", "123", "45", "Ġyou", "'re"]


def test_offsets_are_not_trimmed_and_pairs_start_each_sequence_with_s(compat):
    """transformers 4's converted tokenizer: a token's offsets keep its leading space (trim_offsets False), and <s>
    comes before each sequence, also the second of a pair (its LlamaTokenizerFast template)."""
    pieces = [bytes([i]) for i in range(97, 123)] + [b" ", b" b"]
    tok = _converter(compat, pieces).converted()
    compat.add_start_token(tok)
    enc = tok.encode("a b")
    assert enc.ids == [1, 3, 30] and enc.offsets[-1] == (1, 3)  # ' b': id 30 (26 letters, then ' ', ' b')
    assert tok.encode("a", "b").ids == [1, 3, 1, 4]
    assert tok.encode("").ids == [1]


def test_a_wrapper_built_now_adds_the_start_token_and_restores_the_converter(comfy, compat):
    """wrap() around ComfyUI's own function: the tokenizer starts every sequence with <s>, and transformers'
    MistralConverter is back in place after the call (also when ComfyUI's function raises)."""
    import comfy.text_encoders.flux as flux
    import transformers.integrations.mistral as tm

    installed = tm.MistralConverter
    fresh = compat.wrap(flux.load_mistral_tokenizer.__wrapped__)
    assert getattr(fresh, compat.MARK)
    tok = fresh(te_flux2.tekken_bytes())["tokenizer_object"]
    assert tok.encode("").ids == [1] and tm.MistralConverter is installed

    def broken(data):
        assert tm.MistralConverter is compat.Transformers4MistralConverter
        raise ValueError("damaged tekken data")

    with pytest.raises(ValueError, match="damaged"):
        compat.wrap(broken)(b"{}")
    assert tm.MistralConverter is installed


def test_apply_without_comfyuis_function_changes_nothing(comfy, compat, monkeypatch):
    """A ComfyUI without load_mistral_tokenizer (older or newer) is left alone: apply() says False."""
    import comfy.text_encoders.flux as flux

    monkeypatch.delattr(flux, "load_mistral_tokenizer")
    assert compat.apply() is False
    assert not hasattr(flux, "load_mistral_tokenizer")


def test_the_tiny_tekken_merges_in_rank_order(compat):
    """On the tests' tiny tekken vocabulary as ComfyUI builds the dict: every merge's piece ranks no lower than the
    one before it."""
    pieces = te_flux2._bpe_pieces()
    conv = compat.Transformers4MistralConverter(vocab=_vocab(pieces), additional_special_tokens=CONTROL)
    ids, merges = conv.vocab_and_merges()
    ranks = [ids[a + b] for a, b in merges]
    assert ranks == sorted(ranks) and len(ids) == len(pieces) + len(CONTROL)


def test_without_the_modules_involved_nothing_is_wrapped(comfy, compat, monkeypatch):
    """A transformers without ``integrations.mistral`` (ComfyUI then converts with transformers' Pixtral script):
    ComfyUI's call is taken to work, nothing to adapt. A ComfyUI without ``comfy.text_encoders.flux``: apply()
    says False."""
    import sys

    with monkeypatch.context() as m:
        m.setitem(sys.modules, "transformers.integrations.mistral", None)  # import raises ImportError
        assert compat.converter_takes_vocab() is True
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "comfy.text_encoders.flux", None)
        assert compat.apply() is False
