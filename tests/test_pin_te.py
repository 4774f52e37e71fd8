"""Text-encoder spec fields pinned to independent computations (issue #26): caption cleaning, template and
character cap against hand-written strings; word-aligned chunking against ComfyUI's own ``SDTokenizer``; truncation,
padding and pad tokens against the transformers tokenizer's ``truncation=True, padding="max_length"``; encoder
options set for one call and restored; output scale, empty-prompt zeros and visible pad tokens against the plain
encoder's output; the Token Inspector's counts against the tokenizer. In-process, tiny tensors."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

LATIN = "a red circle, flat colors"
LONG_WORD = "supercalifragilisticexpialidocious"  # many CLIP pieces (>= ComfyUI's max_word_length of 8)


@pytest.fixture(scope="module")
def E(comfy):
    class NS:
        align = comfy.engine("te.align")
        specs = comfy.engine("te.specs")
        inspect = comfy.engine("te.inspect")
        sx = comfy.engine("te.syntax")
    return NS


def _enc(**fields) -> dict:
    base = {"comfy_key": "l", "comfy_attr": "clip_l", "tokenizer": "clip", "max_length": 77, "truncation": "truncate",
            "padding": "max_length", "min_length": None, "pad_token": "end", "encoder_attention_mask": False,
            "denoiser_attention_mask": False, "hidden_layer": "last", "final_layer_norm": True, "pooled": "none",
            "zero_padded": False, "visible_pad_tokens": None, "char_cap": None, "template": None, "cleaning": "none",
            "empty_prompt": "encode", "output_scale": 1.0}
    base.update(fields)
    return base


def _spec(E, name="pin", **fields):
    """A one-encoder (clip_l) spec with plain values (EncoderSpec reads plain values and {value, source} alike)."""
    raw = {"id": name, "name": name, "encoders": [_enc(**fields)]}
    return E.specs.TESpec(id=name, name=name, raw=raw, path=Path(f"{name}.json"), hash=name)


@pytest.fixture(scope="module")
def sub(sd15):
    """ComfyUI's SD1 sub-tokenizer (``SDTokenizer``: start/end tokens, pads with end)."""
    return sd15[1].tokenizer.clip_l


# -- cleaning, template, char cap, pad token -------------------------------------------------------------------
def test_clean_text_modes(E):
    text = "  Hello%20World &amp;  see https://x.org/a?b=1 and www.y.com/c  \n A+B "
    assert E.align.clean_text(text, "none") == text
    assert E.align.clean_text(text, "whitespace") == "Hello%20World &amp; see https://x.org/a?b=1 and www.y.com/c A+B"
    # html.unescape, unquote_plus (%20 and + are spaces), URLs dropped, lower case, whitespace collapsed
    assert E.align.clean_text(text, "pixart") == "hello world & see and a b"


def test_template_then_char_cap(E):
    enc = E.specs.EncoderSpec(_enc(template="<a> {prompt} </a>", char_cap=12, cleaning="whitespace"))
    assert E.align.encoder_text("  x   y ", enc) == "<a> x y </a>"[:12]
    assert E.align.encoder_text("abcdefghij", enc) == "<a> abcdefgh"
    plain = E.specs.EncoderSpec(_enc())
    assert E.align.encoder_text("  x   y ", plain) == "  x   y "


def test_pad_id_follows_the_spec(E, sub):
    assert E.align.pad_id(sub, E.specs.EncoderSpec(_enc(pad_token="end"))) == sub.end_token
    assert E.align.pad_id(sub, E.specs.EncoderSpec(_enc(pad_token="zero"))) == 0
    s = copy.copy(sub)
    s.pad_token = 12345
    assert E.align.pad_id(s, E.specs.EncoderSpec(_enc(pad_token="tokenizer"))) == 12345


# -- chunking against ComfyUI's tokenizer ---------------------------------------------------------------------
@pytest.mark.parametrize("max_length,pad,min_length", [(12, True, None), (12, False, None), (10, False, 15),
                                                       (77, True, None)])
def test_chunk_groups_equal_comfyui_tokenizer(E, sub, max_length, pad, min_length):
    """chunk_groups lays word groups into windows exactly as ComfyUI's SDTokenizer.tokenize_with_weights lays
    out its groups (one per weighted segment: ``(word:1)`` per word makes one group per word), including a
    word of >= 8 pieces split across windows."""
    pieces = {n: next(LONG_WORD[:k] for k in range(1, len(LONG_WORD) + 1)
                      if len(E.align.literal_ids(sub, LONG_WORD[:k])) == n) for n in (3, 8)}
    # a word of exactly max_word_length (8) pieces, and 3-piece words that overflow a window with room left
    words = (f"a photo of {LONG_WORD} {LONG_WORD} with many small words in a row for {pieces[8]} windows to "
             f"fill {pieces[3]} up a b c d e f g {pieces[3]} h i j k l m n o p {pieces[8]} q").split()
    s = copy.copy(sub)
    s.max_length, s.pad_to_max_length, s.min_length = max_length, pad, min_length
    ours = E.align.chunk_groups(s, [E.align.literal_ids(sub, w) for w in words])
    ref = s.tokenize_with_weights("".join(f"({w}:1)" for w in words), return_word_ids=True)
    assert ours == ref
    tight = ["a"] * (max_length - 3) + [pieces[3]]  # one short of a full window, then a 3-piece word
    assert E.align.chunk_groups(s, [E.align.literal_ids(sub, w) for w in tight]) == \
        s.tokenize_with_weights("".join(f"({w}:1)" for w in tight), return_word_ids=True)
    if max_length < 77:
        assert len(ours) > 2


def test_literal_ids_drop_start_and_end(E, sub):
    ids = sub.tokenizer("red circle")["input_ids"]
    assert E.align.literal_ids(sub, "red circle") == ids[1:-1]


# -- truncation and padding against transformers ---------------------------------------------------------------
@pytest.mark.parametrize("length", [9, 77])
def test_truncate_and_pad_equal_transformers(E, sub, length):
    """truncation 'truncate' + padding 'max_length' = tokenizer(text, truncation=True, max_length=L,
    padding='max_length') with the end token as pad (SD1.x's pipeline)."""
    text = "a photo of a red circle on a blue background, flat colors, simple shapes"
    enc = E.specs.EncoderSpec(_enc(max_length=length))
    out = E.align.tokenize_encoder(sub, enc, text, False, {})
    tok = copy.deepcopy(sub.tokenizer)
    tok.pad_token = tok.eos_token
    ref = tok(text, truncation=True, max_length=length, padding="max_length")["input_ids"]
    assert len(out) == 1 and [t for t, _ in out[0]] == ref
    assert all(w == 1.0 for _, w in out[0])


def test_padding_longest_min_length_none_and_zero_pad(E, sub):
    text = "a red circle on a blue background"
    ids = sub.tokenizer(text)["input_ids"]
    longest = E.align.tokenize_encoder(sub, E.specs.EncoderSpec(_enc(padding="longest")), text, False, {})
    assert [t for t, _ in longest[0]] == ids
    padded = E.align.tokenize_encoder(sub, E.specs.EncoderSpec(_enc(padding="longest", min_length=12, pad_token="zero")),
                                      text, True, {})
    assert [t for t, _, _ in padded[0]] == ids + [0] * (12 - len(ids))
    assert [w for _, _, w in padded[0]] == [0] + [1] * (len(ids) - 2) + [0] * (12 - len(ids) + 1)
    whole = E.align.tokenize_encoder(sub, E.specs.EncoderSpec(_enc(truncation="none", max_length=5)), text, False, {})
    assert [t for t, _ in whole[0]] == ids  # never cut, already longer than max_length: no padding
    cut = E.align.tokenize_encoder(sub, E.specs.EncoderSpec(_enc(truncation="truncate", max_length=5, padding="longest")),
                                   text, False, {})
    assert [t for t, _ in cut[0]] == ids[:4] + [sub.end_token]


def test_tokens_are_of_the_cleaned_templated_text(E, sub):
    """tokenize_encoder tokenizes the text the spec makes of the caption (cleaning, template, character cap),
    on both the truncating and the chunking paths."""
    enc = _enc(template="a photo of {prompt}", cleaning="pixart", padding="longest")
    want = sub.tokenizer("a photo of red & blue")["input_ids"]
    for truncation in ("truncate", "chunk"):
        out = E.align.tokenize_encoder(sub, E.specs.EncoderSpec({**enc, "truncation": truncation}),
                                       "RED &amp; Blue https://x.org", False, {})
        assert [t for t, _ in out[0]] == want, truncation


def test_first_chunk_keeps_only_the_first_window(E, sub):
    text = " ".join(["circle"] * 30)
    chunk = E.specs.EncoderSpec(_enc(truncation="chunk", max_length=12))
    first = E.specs.EncoderSpec(_enc(truncation="first_chunk", max_length=12))
    all_chunks = E.align.tokenize_encoder(sub, chunk, text, False, {})
    assert len(all_chunks) == 3 and all(len(c) == 12 for c in all_chunks)
    assert all(len(t) == 2 for c in all_chunks for t in c)  # (token, weight) without word ids
    assert E.align.tokenize_encoder(sub, first, text, False, {}) == all_chunks[:1]
    with_ids = E.align.tokenize_encoder(sub, chunk, text, True, {})
    assert [[(t, w) for t, w, _ in c] for c in with_ids] == all_chunks
    assert [i for _, _, i in with_ids[0]][:3] == [0, 1, 2]


def test_chunk_padding_follows_the_spec_and_ignores_min_options(E, sub):
    """Chunks are padded to max_length only with padding 'max_length'; ComfyUI's per-call min_length/min_padding
    options (its own minimums) do not change the spec's layout, other options pass through."""
    ids = sub.tokenizer("red circle")["input_ids"]
    for syntax in ("literal", "comfyui"):
        padded = E.align.tokenize_encoder(sub, E.specs.EncoderSpec(_enc(truncation="chunk", max_length=12)),
                                          "red circle", False, {}, syntax=syntax)
        assert [t for t, _ in padded[0]] == ids + [sub.end_token] * (12 - len(ids)), syntax
        longest = E.align.tokenize_encoder(sub, E.specs.EncoderSpec(_enc(truncation="chunk", max_length=12,
                                                                          padding="longest")), "red circle", False, {},
                                           syntax=syntax)
        assert [t for t, _ in longest[0]] == ids, syntax
    opts = {"tokenizer_options": {"clip_l_min_length": 30, "clip_l_min_padding": 5}}
    enc = E.specs.EncoderSpec(_enc(truncation="chunk", max_length=12))
    out = E.align.tokenize_encoder(sub, enc, "red circle", False, opts, syntax="comfyui")
    assert [len(c) for c in out] == [12]
    assert opts == {"tokenizer_options": {"clip_l_min_length": 30, "clip_l_min_padding": 5}}  # caller's dict kept


def test_comfyui_syntax_truncates_the_parsed_text(E, sub):
    """With ComfyUI's syntax the weights survive truncation and the brackets are gone."""
    enc = E.specs.EncoderSpec(_enc(max_length=8, padding="longest"))
    text = "(red:1.5) circle on a blue background with a green square"
    out = E.align.tokenize_encoder(sub, enc, text, False, {}, syntax="comfyui")
    ids = sub.tokenizer("red circle on a blue background with a green square")["input_ids"]
    assert [t for t, _ in out[0]] == ids[:7] + [sub.end_token]
    assert [w for _, w in out[0]][:3] == [1.0, 1.5, 1.0]
    whole = E.align.tokenize_encoder(sub, E.specs.EncoderSpec(_enc(truncation="none", padding="longest")), text, False,
                                     {}, syntax="comfyui")
    assert [t for t, _ in whole[0]] == ids


def test_empty_prompt_test_counts_content_tokens_only(E, sd15):
    """An empty caption is only start/end/pad tokens (pad 0 with the 'zero' pad token); any word is content."""
    clip = sd15[1]
    for pad in ("end", "zero"):
        ac = E.align.align_clip(clip, _spec(E, pad_token=pad, empty_prompt="zeros"))
        assert ac._zero_empty(ac.tokenize("")) is True, pad
        assert ac._zero_empty(ac.tokenize("a")) is False, pad
    assert E.align.align_clip(clip, _spec(E))._zero_empty(clip.tokenize("")) is False  # spec says encode


# -- denoiser mask, options, scale, empty prompt --------------------------------------------------------------
def test_show_pad_tokens_opens_n_positions_after_the_content(E):
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(E.align.show_pad_tokens(mask, 1),
                               torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.float32))
    torch.testing.assert_close(E.align.show_pad_tokens(mask, 2),
                               torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.float32))
    assert mask[0, 3] == 0  # the input is not changed


@pytest.mark.parametrize("hidden,pooled,flags", [("last", "eos_projected", (True, False, True, None)),
                                                 ("penultimate", "none", (False, True, False, False))])
def test_encoder_options_set_for_the_call_and_restored(E, sd15, hidden, pooled, flags):
    m = sd15[1].cond_stage_model.clip_l
    eam, ram, zero, fln = flags
    spec = _spec(E, hidden_layer=hidden, pooled=pooled, encoder_attention_mask=eam, denoiser_attention_mask=ram,
                 zero_padded=zero, final_layer_norm=fln)
    before = (m.options_default, m.enable_attention_masks, m.return_attention_masks, m.zero_out_masked,
              m.layer_norm_hidden_state, m.layer, m.layer_idx)
    with E.align.encoder_options(sd15[1].cond_stage_model, spec):
        want = ("last", None, pooled == "eos_projected") if hidden == "last" else ("hidden", -2, False)
        assert m.options_default == want
        assert (m.layer, m.layer_idx) == want[:2]
        assert (m.enable_attention_masks, m.return_attention_masks, m.zero_out_masked) == (eam, ram, zero)
        if hidden == "penultimate":
            assert m.layer_norm_hidden_state is False
        else:
            assert m.layer_norm_hidden_state == before[4]
    assert (m.options_default, m.enable_attention_masks, m.return_attention_masks, m.zero_out_masked,
            m.layer_norm_hidden_state, m.layer, m.layer_idx) == before


@pytest.fixture(scope="module")
def t5clip(comfy):
    """The tiny T5 (2 layers, width 128) as ComfyUI's PixArt loader builds it: cheap to encode."""
    from support.factories import te_t5
    from support.factories import text_encoders as te

    return te_t5.pixart_clip(te.t5_tiny_file())


def _t5(E, **fields):
    return _spec(E, **{"comfy_key": "t5xxl", "comfy_attr": "clip_t5xxl", "pad_token": "zero", "max_length": 16,
                       **fields})


def test_output_scale_and_empty_prompt_zeros(E, t5clip):
    plain = E.align.align_clip(t5clip, _t5(E))
    scaled = E.align.align_clip(t5clip, _t5(E, output_scale=2.5))
    zeros = E.align.align_clip(t5clip, _t5(E, empty_prompt="zeros"))
    ref = plain.encode_from_tokens(plain.tokenize("a red circle"))
    assert ref.shape[1] == 16 and ref.abs().sum() > 0
    torch.testing.assert_close(scaled.encode_from_tokens(scaled.tokenize("a red circle")), 2.5 * ref)
    c, p = scaled.encode_from_tokens(scaled.tokenize("a red circle"), return_pooled=True)
    torch.testing.assert_close(c, 2.5 * ref)
    d = scaled.encode_from_tokens(scaled.tokenize("a red circle"), return_dict=True)
    torch.testing.assert_close(d["cond"], 2.5 * ref)
    empty = plain.encode_from_tokens(plain.tokenize(""))
    assert empty.abs().sum() > 0  # the empty prompt's encoding is not zero unless the spec says so
    z = zeros.encode_from_tokens(zeros.tokenize(""), return_dict=True)
    assert z["cond"].shape == empty.shape and not z["cond"].any()
    torch.testing.assert_close(zeros.encode_from_tokens(zeros.tokenize("a red circle")), ref)


def test_output_scale_scales_pooled(E, sd15):
    """Pooled vectors are scaled with the sequence (one CLIP-L encode each way)."""
    clip = sd15[1]
    ref, ref_pooled = E.align.align_clip(clip, _spec(E)).encode_from_tokens(clip.tokenize("a"), return_pooled=True)
    scaled = E.align.align_clip(clip, _spec(E, output_scale=2.5))
    d = scaled.encode_from_tokens(scaled.tokenize("a"), return_dict=True)
    torch.testing.assert_close(d["cond"], 2.5 * ref)
    torch.testing.assert_close(d["pooled_output"], 2.5 * ref_pooled)
    c, p = scaled.encode_from_tokens(scaled.tokenize("a"), return_pooled=True)
    torch.testing.assert_close(p, 2.5 * ref_pooled)


def test_visible_pad_tokens_widen_the_denoiser_mask(E, t5clip):
    masked = E.align.align_clip(t5clip, _t5(E, denoiser_attention_mask=True, encoder_attention_mask=True))
    shown = E.align.align_clip(t5clip, _t5(E, denoiser_attention_mask=True, encoder_attention_mask=True,
                                           visible_pad_tokens=1))
    text = "a red circle"
    a = masked.encode_from_tokens(masked.tokenize(text), return_dict=True)["attention_mask"]
    b = shown.encode_from_tokens(shown.tokenize(text), return_dict=True)["attention_mask"]
    n = len(t5clip.tokenizer.clip_t5xxl.tokenizer(text)["input_ids"])
    assert a.shape[-1] == 16 and int(a.sum()) == n and int(b.sum()) == n + 1 and b[0, n] == 1


# -- syntax choice, spec resolution ---------------------------------------------------------------------------
def test_training_clip_reads_literally_and_syntax_survives_clone(E, sd15):
    clip = sd15[1]
    lit = E.align.align_clip(clip, "sd15")
    com = E.align.align_clip(clip, "sd15", "comfyui")
    assert lit.prompt_syntax == "literal" and com.prompt_syntax == "comfyui"
    assert com.clone().prompt_syntax == "comfyui" and com.aligned_trainer_spec["prompt_syntax"] == "comfyui"
    assert lit.training_clip() is lit
    t = com.training_clip()
    assert t is not com and t.prompt_syntax == "literal" and com.prompt_syntax == "comfyui"
    text = "(red:1.5) circle"
    assert t.tokenize(text) == lit.tokenize(text) != com.tokenize(text)
    assert E.align.resolve_spec(clip, "auto").id == E.align.resolve_spec(clip, None).id == "sd15"
    re_aligned = E.align.align_clip(com, "sd15")
    assert type(re_aligned) is E.align.AlignedCLIP and re_aligned.prompt_syntax == "literal"
    un = E.align.unaligned(com)
    assert type(un) is not E.align.AlignedCLIP and un.tokenize("a") == clip.tokenize("a")
    with pytest.raises(E.sx.SyntaxChoiceError, match="'bogus'"):
        E.align.align_clip(clip, "sd15", "bogus")


# -- Token Inspector ------------------------------------------------------------------------------------------
def test_inspector_counts_equal_the_tokenizer(E, sd15):
    clip = sd15[1]
    ac = E.align.align_clip(clip, "sd15")
    tok = clip.tokenizer.clip_l.tokenizer
    text = "a photo of " + " ".join(f"thing{i}" for i in range(40))
    ids = tok(text)["input_ids"][1:-1]
    rep = E.inspect.inspect_text(ac, text)
    e = rep["encoders"]["clip_l"]
    assert e["content_tokens"] == len(ids) and e["ids"] == ids
    assert e["truncated_tokens"] == len(ids) - 75 > 0
    assert e["positions"] == 77 and e["chunks"] == 1
    assert any(f"{len(ids) - 75} token(s) dropped" in w for w in rep["warnings"])
    short = E.inspect.inspect_text(ac, "a red circle")
    assert short["encoders"]["clip_l"]["truncated_tokens"] == 0 and short["warnings"] == []
    exact = "x " * 75  # exactly 75 content tokens: nothing dropped
    assert E.inspect.inspect_text(ac, exact)["encoders"]["clip_l"]["truncated_tokens"] == 0
    stock = E.inspect.inspect_text(clip, text)  # ComfyUI's CLIP chunks instead
    assert stock["encoders"]["clip_l"]["chunks"] == 2 and stock["encoders"]["clip_l"]["positions"] == 154
    assert any("exceed one 77-token window" in w for w in stock["warnings"])
    assert E.inspect.inspect_text(clip, "a red circle")["warnings"] == []
    assert E.inspect.prompt_syntax(clip) == "comfyui" and E.inspect.prompt_syntax(ac) == "literal"


def test_inspector_trigger_rules(E, sd15):
    ac = E.align.align_clip(sd15[1], "sd15")
    tok = sd15[1].tokenizer.clip_l.tokenizer
    vocab = len(tok.get_vocab())
    common = tok("dog")["input_ids"][1]
    assert common < 0.4 * vocab
    rep = E.inspect.inspect_text(ac, "a dog", trigger="dog")
    assert rep["warnings"] == [f"clip_l: trigger 'dog' is an ordinary word (token id {common} of {vocab}); "
                               "training will shift its existing meaning"]
    two = E.inspect.inspect_text(ac, "a dog", trigger="ohwx dog", vocab_words=2)
    assert two["encoders"]["clip_l"]["trigger_pieces"] == ["ohwx</w>", "dog</w>"]
    assert not any("splits into" in w for w in two["warnings"])
    assert any("splits into 2 pieces" in w for w in E.inspect.inspect_text(ac, "a", trigger="ohwx dog")["warnings"])
    # a rare single token just above the common fraction is not an ordinary word
    rare_id = next(i for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
                   if i >= 0.4 * vocab and t.endswith("</w>") and t[:-4].isalpha() and len(tok(t[:-4])["input_ids"]) == 3)
    word = tok.convert_ids_to_tokens(rare_id)[:-4]
    assert E.inspect.inspect_text(ac, "a", trigger=word)["warnings"] == []


def test_alignment_report_statistics_equal_direct_computation(E, t5clip):
    """compare_clips on two tiny-T5 alignments of different lengths (16 and 24 positions): every statistic
    equals the one computed here from the two encodings."""
    ca_clip, cb_clip = E.align.align_clip(t5clip, _t5(E)), E.align.align_clip(t5clip, _t5(E, max_length=24))
    text = "a photo of " + " ".join(f"thing{i}" for i in range(20))
    (row,) = E.inspect.compare_clips(ca_clip, cb_clip, [text])
    ca = ca_clip.encode_from_tokens(ca_clip.tokenize(text), return_dict=True)["cond"][0]
    cb = cb_clip.encode_from_tokens(cb_clip.tokenize(text), return_dict=True)["cond"][0]
    assert (row["positions_a"], row["positions_b"]) == (16, 24)
    cos = torch.nn.functional.cosine_similarity(ca.flatten(), cb[:16].flatten(), dim=0)
    assert row["seq_cosine"] == pytest.approx(float(cos), abs=1e-6) and row["seq_cosine"] < 0.9999
    per = torch.nn.functional.cosine_similarity(ca, cb[:16], dim=-1)
    assert row["min_token_cosine"] == pytest.approx(float(per.min()), abs=1e-6)
    assert row["norm_a"] == pytest.approx(float(ca.norm()), rel=1e-5)
    assert row["norm_b"] == pytest.approx(float(cb.norm()), rel=1e-5)
    assert row["std_a"] == pytest.approx(float(ca.std()), rel=1e-5)
    assert row["std_b"] == pytest.approx(float(cb.std()), rel=1e-5)
    assert row["extra_positions_norm"] == pytest.approx(float(cb[16:].norm(dim=-1).mean()), rel=1e-5)
    assert row["pooled_cosine"] is None  # T5 has no pooled vector
    n = len(t5clip.tokenizer.clip_t5xxl.tokenizer(text)["input_ids"]) - 1
    assert row["tokens"]["clip_t5xxl"] == n and row["truncated_a"]["clip_t5xxl"] == n - 15 > 0
    (same,) = E.inspect.compare_clips(ca_clip, ca_clip, ["a red circle"])
    assert same["extra_positions_norm"] == 0.0 and same["seq_cosine"] == pytest.approx(1.0, abs=1e-6)


def test_encoder_model_lookup(E, sd15):
    """The spec's attribute, else without the ``clip_`` prefix; only objects that are ComfyUI encoders count."""
    from types import SimpleNamespace

    real = sd15[1].cond_stage_model.clip_l
    enc = E.specs.EncoderSpec(_enc(comfy_attr="clip_t5xxl"))
    assert E.align.encoder_model(SimpleNamespace(clip_t5xxl=object(), t5xxl=real), enc) is real
    assert E.align.encoder_model(SimpleNamespace(clip_t5xxl=real), enc) is real
    assert E.align.encoder_model(SimpleNamespace(clip_t5xxl=None, t5xxl=None), enc) is None


def test_literal_tokenize_never_parses_comfyui_syntax(E, sd15, caplog):
    """Literal: ComfyUI's parser never sees the text (no embedding look-up, so no warning for a missing one);
    keys the spec does not cover keep ComfyUI's own tokens of the text (an sd2x spec names clip_h, which an
    SD1.5 CLIP does not have)."""
    import logging

    clip = sd15[1]
    text = "embedding:no_such_embedding a cat"
    with caplog.at_level(logging.WARNING):
        E.align.align_clip(clip, "sd15").tokenize(text)
    assert "no_such_embedding" not in caplog.text
    with caplog.at_level(logging.WARNING):
        E.align.align_clip(clip, "sd15", "comfyui").tokenize(text)
    assert "no_such_embedding" in caplog.text  # the same CLIP with ComfyUI's syntax does look it up
    weighted = E.align.align_clip(clip, "sd15", "comfyui")
    assert {w for _, w in weighted.tokenize("(red:1.5) circle")["l"][0]} == {1.0, 1.5}
    assert {w for _, w in weighted.tokenize("(red:1.5) circle", disable_weights=True)["l"][0]} == {1.0}  # passed on
    other = E.align.align_clip(clip, "sd2x")
    assert other.tokenize("a red circle")["l"] == clip.tokenize("a red circle")["l"]


# -- left padding (FLUX.2's Mistral), pinned without an encoder ------------------------------------------------
def test_left_padding_tokens_mask_and_layers(E, sub):
    """padding_side left puts the pads before the start token (the transformers tokenizer's padding_side='left');
    leading_pads masks exactly those; drop_img_token removes '[IMG]'; a hidden_layer list goes to ComfyUI as its
    layer list."""
    from transformers import CLIPTokenizer

    enc = E.specs.EncoderSpec(_enc(max_length=12, padding_side="left"))
    (seq,) = E.align.tokenize_encoder(sub, enc, LATIN, False, {})
    tok = CLIPTokenizer.from_pretrained(sub.tokenizer.name_or_path)
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    ref = tok(LATIN, padding="max_length", truncation=True, max_length=12)
    assert [t for t, _ in seq] == ref.input_ids
    ids = [t for t, _ in seq]
    assert E.align.leading_pads([ids], sub.end_token)[0].tolist() == [0] * (12 - 8) + [1] * 8 == ref.attention_mask
    assert E.align.leading_pads([[5, 7, 5], [7, 7, 5]], 7).tolist() == [[1, 1, 1], [0, 0, 1]]
    assert E.align.clean_text("a [IMG] cat[IMG]", "drop_img_token") == "a  cat"
    assert E.align.comfy_layer([10, 20, 30]) == ([10, 20, 30], None)
    assert E.align.comfy_layer("penultimate") == ("hidden", -2)


def test_unattended_positions_get_zero_attention(E):
    """ComfyUI's own attention on a mask whose first query row masks every key gives NaN there; the left_padding
    wrapper gives 0 for that row (transformers' result) and leaves every other row bit-equal."""
    from comfy.ldm.modules.attention import optimized_attention_for_device

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g) for _ in range(3))
    mask = torch.zeros(1, 1, 4, 4)
    mask[:, :, 0, :] = float("-inf")  # query 0 sees nothing (a leading pad under causal attention)
    mask[:, :, 1:, 0] = float("-inf")  # the others do not see key 0
    plain = optimized_attention_for_device(q.device, mask=True, small_input=True)(q, k, v, 2, mask=mask,
                                                                                   skip_reshape=True)
    fixed = E.align._zero_unattended(optimized_attention_for_device)(q.device, mask=True, small_input=True)(
        q, k, v, 2, mask=mask, skip_reshape=True)
    assert torch.isnan(plain[0, 0]).all()
    assert torch.equal(fixed[0, 0], torch.zeros(16)) and torch.equal(fixed[0, 1:], plain[0, 1:])
