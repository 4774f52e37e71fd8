"""Token Inspector (te/inspect.py) details pinned against ComfyUI's own tokenizer and the transformers tokenizer
(issue #26): the chunk warning on a stock CLIP appears exactly when ComfyUI splits the prompt into two windows;
the truncation warning quotes the first dropped tokens; emphasis weights are reported as ComfyUI applies them, and
not for a spec whose family ignores them (``comfy_weights: false``)."""
from __future__ import annotations

import re

import pytest

from test_pin_te import _spec, _t5, t5clip  # noqa: F401  (t5clip: the module's fixture)


@pytest.fixture(scope="module")
def E(comfy):
    class NS:
        align = comfy.engine("te.align")
        specs = comfy.engine("te.specs")
        inspect = comfy.engine("te.inspect")
    return NS


def test_chunk_warning_exactly_when_comfyui_splits(E, sd15):
    clip = sd15[1]
    tok = clip.tokenizer.clip_l.tokenizer
    for n in (75, 76):
        text = " ".join(["x"] * n)
        assert len(tok(text)["input_ids"]) == n + 2  # n content tokens
        chunks = len(clip.tokenize(text)["l"])  # ComfyUI's own windows of 75 + start/end
        warned = any("exceed one 77-token window" in w for w in E.inspect.inspect_text(clip, text)["warnings"])
        assert chunks == (1 if n == 75 else 2) and warned == (chunks > 1), (n, chunks, warned)
    (row,) = E.inspect.compare_clips(clip, clip, [text])  # a stock CLIP chunks: nothing counted as truncated
    assert row["truncated_a"] == {"clip_l": 0} and row["tokens"] == {"clip_l": 76}


def test_truncation_warning_quotes_the_first_dropped_tokens(E, sd15):
    ac = E.align.align_clip(sd15[1], "sd15")
    tok = sd15[1].tokenizer.clip_l.tokenizer
    text = "a photo of " + " ".join(f"thing{i}" for i in range(40))
    ids = tok(text)["input_ids"][1:-1]
    assert len(ids) - 75 > 12
    (w,) = [w for w in E.inspect.inspect_text(ac, text)["warnings"] if "dropped from" in w]
    quoted = re.search(r"dropped from '(.*)\.\.\.'$", w).group(1)
    assert quoted == tok.decode(ids[75:87]).strip() and "</w>" not in quoted  # text, not BPE pieces


def test_emphasis_weights_reported_as_comfyui_applies_them(E, sd15):
    clip = sd15[1]
    text = "(red:1.5) circle"
    weights = {w for chunk in clip.tokenize(text)["l"] for _, w, *_ in chunk}
    assert 1.5 in weights  # ComfyUI weights the bracketed word
    stock = E.inspect.inspect_text(clip, text)["syntax"]
    assert any(c.startswith("weights: 'red' x1.5") for c in stock["changes"]), stock
    parsed = E.align.align_clip(clip, _spec(E), "comfyui")  # a spec that keeps ComfyUI's weights
    assert E.inspect.comfy_weights(parsed) is True
    assert any(c.startswith("weights: ") for c in E.inspect.inspect_text(parsed, text)["syntax"]["changes"])
    no_weights = E.align.align_clip(clip, _spec(E, comfy_weights=False), "comfyui")
    assert E.inspect.comfy_weights(no_weights) is False
    changes = E.inspect.inspect_text(no_weights, text)["syntax"]["changes"]
    assert changes == []  # ComfyUI reads the text as it is when its tokenizer ignores weights


def test_alignment_report_either_way_round_and_masks(E, t5clip):
    """compare_clips with the longer encoding first gives the statistics of the shorter-first comparison (the
    common positions, the extra positions' norm); mask_a / mask_b say which side's encoding has an attention
    mask (here: the spec with ``denoiser_attention_mask``)."""
    short = E.align.align_clip(t5clip, _t5(E))
    long_masked = E.align.align_clip(t5clip, _t5(E, max_length=24, denoiser_attention_mask=True,
                                                        encoder_attention_mask=True))
    text = "a photo of a red circle"
    assert "attention_mask" in long_masked.encode_from_tokens(long_masked.tokenize(text), return_dict=True)
    assert "attention_mask" not in short.encode_from_tokens(short.tokenize(text), return_dict=True)
    (ab,) = E.inspect.compare_clips(short, long_masked, [text])
    (ba,) = E.inspect.compare_clips(long_masked, short, [text])
    assert (ab["positions_a"], ab["positions_b"], ba["positions_a"], ba["positions_b"]) == (16, 24, 24, 16)
    assert (ab["mask_a"], ab["mask_b"], ba["mask_a"], ba["mask_b"]) == (False, True, True, False)
    for k in ("seq_cosine", "min_token_cosine", "extra_positions_norm"):
        assert ba[k] == pytest.approx(ab[k], rel=1e-6), k
    assert ab["extra_positions_norm"] > 0


@pytest.mark.parametrize("drop_prefix", [0, 2])
def test_templated_truncation_counts_the_prompt_tokens_the_tokenizer_cuts(E, sd15, drop_prefix):
    """A templated spec ('sys words {prompt} tail words'), cut at max_length (+ the dropped prefix): the Token
    Inspector's count of dropped prompt tokens equals the prompt tokens missing from the aligned tokenization
    (the template's tail is cut first)."""
    clip = sd15[1]
    tok = clip.tokenizer.clip_l.tokenizer
    head = "sys words "
    ids = lambda t: tok(t)["input_ids"][1:-1]  # noqa: E731
    cases = [(" and a tail of five", n, m) for n, m in ((6, 14), (9, 14), (12, 14), (3, 8))] + \
            [("", n, m) for n, m in ((3, 14), (12, 14))]  # the prompt last: nothing after it to cut first
    for tail, n_words, max_length in cases:
        prompt = " ".join(f"w{i}" for i in range(n_words))
        p_ids = ids(prompt)
        assert ids(head + prompt + tail) == ids(head) + p_ids + ids(tail)  # the pieces tokenize apart
        ac = E.align.align_clip(clip, _spec(E, template=head + "{prompt}" + tail, max_length=max_length,
                                            drop_prefix=drop_prefix or None, padding="longest"))
        kept = [t for chunk in ac.tokenize(prompt)["l"] for t, *_ in chunk][1:-1]  # without start and end
        kept_prompt = kept[len(ids(head)):len(ids(head)) + len(p_ids)]
        assert kept_prompt == p_ids[:len(kept_prompt)]
        expected = len(p_ids) - len(kept_prompt)
        got = E.inspect.inspect_text(ac, prompt)["encoders"]["clip_l"]["truncated_tokens"]
        assert got == expected, (n_words, max_length, drop_prefix, got, expected)


def test_pooled_cosine_of_two_encoders_with_pooled_outputs(E, sd15):
    """compare_clips reports the cosine of the two pooled vectors when both encoders give one: a CLIP against itself
    is 1; against a clone with one weight patched (ComfyUI's add_patches) it is the cosine of their pooled outputs."""
    import torch

    clip = sd15[1]
    (row,) = E.inspect.compare_clips(clip, clip, ["a red circle"])
    assert row["pooled_cosine"] == pytest.approx(1.0, abs=1e-6)
    patches = clip.get_key_patches()
    key = next(k for k in patches if k.endswith("mlp.fc1.weight"))
    w = patches[key][0]
    w = w[0] if isinstance(w, tuple) else w
    patched = clip.clone()
    patched.add_patches({key: (torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.5,)}, 1.0)
    (row,) = E.inspect.compare_clips(clip, patched, ["a red circle"])
    pa = clip.encode_from_tokens(clip.tokenize("a red circle"), return_dict=True)["pooled_output"]
    pb = patched.encode_from_tokens(patched.tokenize("a red circle"), return_dict=True)["pooled_output"]
    want = float(torch.nn.functional.cosine_similarity(pa.flatten().float(), pb.flatten().float(), dim=0))
    assert want < 0.9999 and row["pooled_cosine"] == pytest.approx(want, abs=1e-6)
