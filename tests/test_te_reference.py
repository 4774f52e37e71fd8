"""Aligned CLIPs against the official pipelines (diffusers) on the same seeded weights, fp32."""
from __future__ import annotations

import pytest
import torch

from support.factories import text_encoders as te

PROMPTS = {
    "plain": "ohwx, a red circle on a blue background, flat colors",
    "empty": "",
    "unicode": "héllo wörld!! ~ ✨ café, 'quotes' & semi;colons? 100% — ok",
    "long": "a photo of " + ", ".join(f"detail number {i}" for i in range(60)) + ", the end",
}
TOL = 1e-4


@pytest.fixture(scope="module")
def clip_l_path(comfy):
    return te.clip_l_file()


@pytest.fixture(scope="module")
def t5_path(comfy):
    return te.t5_tiny_file()


@pytest.fixture(scope="module")
def sd_clip(comfy, clip_l_path):
    return te.load_comfy_clip([clip_l_path], "stable_diffusion")


@pytest.fixture(scope="module")
def flux_te(comfy, clip_l_path, t5_path):
    return te.flux_clip(clip_l_path, t5_path)


@pytest.fixture(scope="module")
def sd_pipe(comfy, clip_l_path):
    return te.sd_pipeline(clip_l_path)


@pytest.fixture(scope="module")
def flux_pipe(comfy, clip_l_path, t5_path):
    return te.flux_pipeline(clip_l_path, t5_path)


@pytest.mark.parametrize("name", PROMPTS)
def test_sd15_matches_stable_diffusion_pipeline(comfy, sd_clip, sd_pipe, name):
    """Reference: StableDiffusionPipeline.encode_prompt(prompt, do_classifier_free_guidance=False), whose
    tokenizer call is padding='max_length', max_length=77, truncation=True and whose embeds are
    text_encoder(ids)[0] (last layer after the final LayerNorm)."""
    align = comfy.engine("te.align")
    pipe = sd_pipe
    prompt = PROMPTS[name]
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    ac = align.align_clip(sd_clip, "sd15")
    ours = ac.encode_from_tokens(ac.tokenize(prompt))
    assert ours.shape == ref.shape == (1, 77, 768)
    assert (ours.float() - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("spec_id,length", [("flux1-dev", 512), ("flux1-schnell", 256)])
@pytest.mark.parametrize("name", ["plain", "empty", "unicode", "long"])
def test_flux_matches_flux_pipeline(comfy, flux_te, flux_pipe, spec_id, length, name):
    """Reference: FluxPipeline.encode_prompt(prompt, prompt_2=None, max_sequence_length=<spec T5 length>):
    T5 padded to max_length and truncated, no attention mask; pooled = CLIP-L pooler_output."""
    align = comfy.engine("te.align")
    pipe = flux_pipe
    prompt = PROMPTS[name] if name != "long" else "word " * (length + 40)
    with torch.no_grad():
        ref, ref_pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, device="cpu", max_sequence_length=length)
    ac = align.align_clip(flux_te, spec_id)
    out = ac.encode_from_tokens(ac.tokenize(prompt), return_dict=True)
    assert out["cond"].shape == ref.shape == (1, length, te.T5_TINY["d_model"])
    assert (out["cond"] - ref).abs().max().item() <= TOL
    assert (out["pooled_output"] - ref_pooled).abs().max().item() <= TOL
    assert "attention_mask" not in out


def test_sd15_comfy_default_differs_only_on_long_prompts(comfy, sd_clip):
    """ComfyUI's default chunks prompts over 75 tokens into 77-position chunks; the spec truncates at 77."""
    align = comfy.engine("te.align")
    ac = align.align_clip(sd_clip, "sd15")
    for name, prompt in PROMPTS.items():
        d = sd_clip.encode_from_tokens(sd_clip.tokenize(prompt))
        a = ac.encode_from_tokens(ac.tokenize(prompt))
        if name == "long":
            assert d.shape[1] > 77 and d.shape[1] % 77 == 0 and a.shape[1] == 77
        else:
            assert d.shape == a.shape and torch.allclose(d, a, atol=1e-5)


def test_flux_comfy_default_pads_t5_to_256(comfy, flux_te):
    align = comfy.engine("te.align")
    d = flux_te.encode_from_tokens(flux_te.tokenize(PROMPTS["plain"]), return_dict=True)
    a = align.align_clip(flux_te, "flux1-dev").encode_from_tokens(
        align.align_clip(flux_te, "flux1-dev").tokenize(PROMPTS["plain"]), return_dict=True)
    assert d["cond"].shape[1] == 256 and a["cond"].shape[1] == 512
    # T5 is bidirectional and unmasked: the pad count changes every content token's embedding
    n = 12
    cos = torch.nn.functional.cosine_similarity(d["cond"][0, :n], a["cond"][0, :n], dim=-1)
    assert cos.min() < 1 - 1e-6
    assert torch.allclose(d["pooled_output"], a["pooled_output"], atol=1e-6)


def test_aligned_clip_survives_clone_and_leaves_input_untouched(comfy, sd_clip):
    align = comfy.engine("te.align")
    before = sd_clip.tokenize(PROMPTS["long"])
    ac = align.align_clip(sd_clip, "auto")
    assert ac.clone().aligned_trainer_spec == ac.aligned_trainer_spec
    assert ac.aligned_trainer_spec["id"] == "sd15"
    assert sd_clip.tokenize(PROMPTS["long"]) == before
    assert not hasattr(sd_clip, "aligned_trainer_spec")


def test_stock_clip_text_encode_uses_aligned_clip(comfy, sd_clip):
    align = comfy.engine("te.align")
    ac = align.align_clip(sd_clip, "sd15")
    (cond,) = comfy.nodes.CLIPTextEncode().encode(ac, PROMPTS["long"])
    assert cond[0][0].shape == (1, 77, 768)


def test_flux_schnell_comfy_default_equal_until_256_tokens(comfy, flux_te):
    """schnell's spec is T5 at 256 tokens, which is ComfyUI's minimum: equal for short prompts; above 256
    tokens ComfyUI keeps every token where the spec (and the official pipeline) truncates."""
    align = comfy.engine("te.align")
    ac = align.align_clip(flux_te, "flux1-schnell")
    d = flux_te.encode_from_tokens(flux_te.tokenize(PROMPTS["plain"]), return_dict=True)
    a = ac.encode_from_tokens(ac.tokenize(PROMPTS["plain"]), return_dict=True)
    assert d["cond"].shape[1] == a["cond"].shape[1] == 256
    assert torch.allclose(d["cond"], a["cond"], atol=1e-5)
    long = "word " * 300
    assert flux_te.encode_from_tokens(flux_te.tokenize(long)).shape[1] > 256
    assert ac.encode_from_tokens(ac.tokenize(long)).shape[1] == 256
