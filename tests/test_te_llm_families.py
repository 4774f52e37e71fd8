"""LLM-encoder families (Z-Image: Qwen3 under a chat template): the aligned CLIP, built from ComfyUI's own
text-encoder classes on a seeded tiny Qwen3, against the official diffusers pipeline's ``encode_prompt`` on the
same weights (fp32), and where ComfyUI's default encoding differs from the spec."""
from __future__ import annotations

import pytest
import torch

from support.factories import te_llm
from support.prompt_syntax import SYNTAX_PROMPTS

TOL = 1e-4
PROMPTS = {
    "plain": "ohwx, a red circle on a blue background, flat colors",
    "empty": "",
    "unicode": "héllo wörld!! ~ ✨ café, 'quotes' & semi;colons? 100% — ok",
    "newlines": "line one\nline two\n\n  spaced   out  ",
    "long": "word, " * 600,  # over 512 tokens once templated
    **{f"syntax-{k}": v for k, v in SYNTAX_PROMPTS.items()},
}


def _max(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def z_image(comfy):
    path = te_llm.qwen3_tiny_file()
    return {"clip": te_llm.z_image_clip(path), "pipe": te_llm.z_image_pipeline(path)}


def _encode(clip, prompt):
    with torch.no_grad():
        return clip.encode_from_tokens(clip.tokenize(prompt), return_dict=True)


@pytest.mark.parametrize("name", PROMPTS)
def test_z_image_matches_z_image_pipeline(comfy, z_image, name):
    """Reference: ZImagePipeline.encode_prompt(prompt, do_classifier_free_guidance=False): Qwen3 chat template,
    padded to 512 and truncated, mask inside the encoder, hidden_states[-2], padding removed."""
    align = comfy.engine("te.align")
    prompt = PROMPTS[name]
    with torch.no_grad():
        ref, _ = z_image["pipe"].encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    ref = ref[0].unsqueeze(0)
    out = _encode(align.align_clip(z_image["clip"], "z-image"), prompt)
    assert out["cond"].shape == ref.shape == (1, ref.shape[1], te_llm.QWEN3_TINY["hidden_size"])
    assert _max(out["cond"], ref) <= TOL
    mask = out.get("attention_mask")
    assert mask is None or bool(mask.bool().all()), "every position the transformer sees is a prompt token"
    if name == "long":
        assert ref.shape[1] == 512


def test_z_image_spec_is_detected(comfy, z_image):
    assert comfy.engine("te.specs").detect_spec(z_image["clip"]).id == "z-image"


def test_z_image_comfy_default_vs_spec(comfy, z_image):
    """ComfyUI's default equals the official encoding for a plain prompt (same template, layer and norm), but
    never truncates at 512 tokens and parses part of its prompt syntax (escapes)."""
    align = comfy.engine("te.align")
    aligned = align.align_clip(z_image["clip"], "z-image")
    default = z_image["clip"]
    plain = PROMPTS["plain"]
    assert _max(_encode(default, plain)["cond"], _encode(aligned, plain)["cond"]) <= TOL
    long_default, long_aligned = _encode(default, PROMPTS["long"])["cond"], _encode(aligned, PROMPTS["long"])["cond"]
    assert long_aligned.shape[1] == 512 < long_default.shape[1]
    esc = r"a \(literal\) bracket"
    d, a = _encode(default, esc)["cond"], _encode(aligned, esc)["cond"]
    assert d.shape != a.shape or _max(d, a) > TOL


def test_z_image_comfyui_syntax_equals_stock_comfyui(comfy, z_image):
    """The 'comfyui' prompt syntax reproduces ComfyUI's own Z-Image encoding: escapes resolved, emphasis weights
    ignored as ZImageTokenizer does (the spec's comfy_weights false), for prompts under the 512-token cap."""
    align = comfy.engine("te.align")
    ac = align.align_clip(z_image["clip"], "z-image", prompt_syntax="comfyui")
    for prompt in (r"a (red:1.3) circle, \(cat\) on ((grass))", PROMPTS["plain"], ""):
        assert _max(_encode(ac, prompt)["cond"], _encode(z_image["clip"], prompt)["cond"]) <= 1e-6, prompt
