"""Wan 2.1 / 2.2 (UMT5-XXL): the aligned CLIP, built from ComfyUI's own Wan text-encoder classes on a seeded tiny
UMT5, against diffusers' ``WanPipeline.encode_prompt`` on the same weights (fp32), and where ComfyUI's default
encoding differs from the spec."""
from __future__ import annotations

import pytest
import torch

from support.factories import te_wan
from support.prompt_syntax import BASE_PROMPTS, SYNTAX_PROMPTS
from support.te_compare import max_diff as _max, encode as _encode

TOL = 1e-4
PROMPTS = {
    **BASE_PROMPTS,
    "html": "a cat &amp;amp; a dog, &lt;b&gt;bold&lt;/b&gt;",
    "long": "word, " * 600,  # over 512 tokens
    **{f"syntax-{k}": v for k, v in SYNTAX_PROMPTS.items()},
}


@pytest.fixture(scope="module")
def wan(comfy):
    path = te_wan.umt5_tiny_file()
    return {"clip": te_wan.wan_clip(path), "pipe": te_wan.wan_pipeline(path)}


def test_tokenizers_agree_on_the_prompt_set(comfy):
    """The comparison below measures the spec, not a tokenizer difference: ComfyUI's SentencePiece tokenizer and
    the reference tokenizer give the same ids on every prompt (after Wan's cleaning)."""
    align = comfy.engine("te.align")
    assert te_wan.tokenizers_agree([align.clean_text(p, "html_whitespace") for p in PROMPTS.values()]) == []


@pytest.mark.parametrize("name", PROMPTS)
def test_wan_matches_wan_pipeline(comfy, wan, name):
    """Reference: WanPipeline.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=512)
    (what WanPipeline.__call__ passes): prompt_clean, padded to 512 and truncated, mask inside UMT5, embeddings
    past the prompt (content + eos) zeroed; no mask goes to the transformer."""
    align = comfy.engine("te.align")
    prompt = PROMPTS[name]
    with torch.no_grad():
        ref, _ = wan["pipe"].encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=512,
                                           device="cpu")
    out = _encode(align.align_clip(wan["clip"], "wan"), prompt)
    assert out["cond"].shape == ref.shape == (1, 512, te_wan.UMT5_SHRINK["d_model"])
    assert _max(out["cond"], ref) <= TOL
    assert out.get("attention_mask") is None, "the Wan transformer takes no text mask"
    used = int((ref[0].abs().sum(-1) > 0).sum())
    assert used >= 1 and bool((out["cond"][0, used:] == 0).all())
    if name == "long":
        assert used == 512


def test_wan_spec_is_detected(comfy, wan):
    assert comfy.engine("te.specs").detect_spec(wan["clip"]).id == "wan"


def test_wan_comfy_default_vs_spec(comfy, wan):
    """ComfyUI's default (UMT5XXlTokenizer: at least 512 tokens, mask and zeroed pads) equals the official
    encoding for a clean short prompt, but never truncates a long one and does not clean HTML entities."""
    align = comfy.engine("te.align")
    aligned, default = align.align_clip(wan["clip"], "wan"), wan["clip"]
    plain = PROMPTS["plain"]
    assert _max(_encode(default, plain)["cond"], _encode(aligned, plain)["cond"]) <= TOL
    long = "word, " * 260  # a little over 512 tokens: the default encodes every token, which is slow on CPU
    long_default, long_aligned = _encode(default, long)["cond"], _encode(aligned, long)["cond"]
    assert long_aligned.shape[1] == 512 < long_default.shape[1]
    d, a = _encode(default, PROMPTS["html"])["cond"], _encode(aligned, PROMPTS["html"])["cond"]
    assert d.shape != a.shape or _max(d, a) > TOL
