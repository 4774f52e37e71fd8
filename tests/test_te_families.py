"""SDXL and SD3/SD3.5 aligned CLIPs against diffusers' own prompt encoding on the same seeded weights (fp32),
and where ComfyUI's default encoder differs from each spec."""
from __future__ import annotations

import pytest
import torch

from support.factories import text_encoders as te
from support.te_compare import max_diff as _max

PROMPTS = {
    "plain": "ohwx, a red circle on a blue background, flat colors",
    "empty": "",
    # no "!": diffusers' SDXL tokenizer_2 has pad_token "!" and splits every "!" out as the pad id 0, where the
    # official open_clip tokenizer (and ComfyUI) keep "!!" as ordinary text; see test_diffusers_tokenizer_2_quirk
    "unicode": "héllo wörld?? ~ ✨ café, 'quotes' & semi;colons? 100% — ok",
    "long": "a photo of " + ", ".join(f"detail number {i}" for i in range(60)) + ", the end",
}
TOL = 1e-4


@pytest.fixture(scope="module")
def files(comfy):
    return {"l": te.clip_lp_file(), "g": te.clip_g_file(), "t5": te.t5_sd3_file()}


@pytest.fixture(scope="module")
def sdxl(comfy, files):
    return te.sdxl_clip(files["l"], files["g"]), te.sdxl_pipeline(files["l"], files["g"])


@pytest.fixture(scope="module")
def sd3(comfy, files):
    return (te.sd3_clip(files["l"], files["g"], files["t5"]),
            te.sd3_pipeline(files["l"], files["g"], files["t5"]),
            te.sd3_pipeline(files["l"], files["g"], files["t5"], identity_l_projection=True))


@pytest.mark.parametrize("name", PROMPTS)
def test_sdxl_matches_sdxl_pipeline(comfy, sdxl, name):
    """Reference: StableDiffusionXLPipeline.encode_prompt(prompt, device='cpu', do_classifier_free_guidance=True)
    (both tokenizers padding='max_length', max_length=77, truncation=True; hidden_states[-2] of both encoders
    concatenated; pooled = text_encoder_2 text_embeds). The empty prompt is compared with the negative embeds
    of that call: with negative_prompt=None and force_zeros_for_empty_prompt=True diffusers returns zeros,
    which is what the spec's empty_prompt='zeros' says (the official SDXL code zeroes empty conditioning)."""
    clip, pipe = sdxl
    align = comfy.engine("te.align")
    prompt = PROMPTS[name]
    with torch.no_grad():
        pe, npe, pooled, npooled = pipe.encode_prompt(prompt or "x", device="cpu", do_classifier_free_guidance=True)
    if name == "empty":
        pe, pooled = npe, npooled
        assert pe.abs().max() == 0
    ac = align.align_clip(clip, "sdxl")
    out = ac.encode_from_tokens(ac.tokenize(prompt), return_dict=True)
    assert out["cond"].shape == (1, 77, 768 + te.CLIP_G_TINY["hidden_size"])
    assert _max(out["cond"], pe) <= TOL
    assert _max(out["pooled_output"], pooled) <= TOL
    assert "attention_mask" not in out


def _cut_to_first_chunk(tok, prompt: str) -> str:
    """The words Stability's reference tokenizer puts in the first 77-token CLIP chunk (BOS + up to 75 + EOS;
    a word of fewer than 8 pieces that does not fit moves to the next chunk)."""
    words, used = [], 0
    for w in prompt.replace("\n", " ").split(" "):
        if not w:
            continue
        n = len(tok(w)["input_ids"]) - 2
        if used + n > 75:
            break
        words.append(w)
        used += n
    return " ".join(words)


@pytest.mark.parametrize("spec_id,name", [(s, n) for s in ("sd3:reference", "sd3:diffusers", "sd35:large",
                                                            "sd35:medium", "sd35:diffusers") for n in PROMPTS])
def test_sd3_matches_sd3_pipeline(comfy, sd3, spec_id, name):
    """diffusers variant: StableDiffusion3Pipeline.encode_prompt(prompt, prompt_2=None, prompt_3=None,
    device='cpu', do_classifier_free_guidance=False, max_sequence_length=256).

    reference variant (Stability-AI/sd3.5 sd3_infer.py get_cond) reproduced with the same diffusers call by:
    prompt/prompt_2 = the words of the reference's first CLIP chunk; prompt_3 = prompt[:226] with
    max_sequence_length = max(77, its T5 token count) (pad to >= 77, never cut); and a pipeline whose CLIP-L
    copy has an identity text_projection (the reference pools CLIP-L unprojected)."""
    clip, pipe_d, pipe_r = sd3
    align = comfy.engine("te.align")
    prompt = PROMPTS[name]
    spec = comfy.engine("te.specs").get_spec(spec_id)
    if spec.variant == "diffusers":
        kw = dict(prompt=prompt, prompt_2=None, prompt_3=None, max_sequence_length=256)
        pipe = pipe_d
    else:
        t5_text = prompt[:226]
        n_t5 = len(pipe_r.tokenizer_3(t5_text)["input_ids"])
        first = _cut_to_first_chunk(pipe_r.tokenizer, prompt)
        kw = dict(prompt=first, prompt_2=first, prompt_3=t5_text, max_sequence_length=max(77, n_t5))
        pipe = pipe_r
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(device="cpu", do_classifier_free_guidance=False, **kw)
    ac = align.align_clip(clip, spec)
    out = ac.encode_from_tokens(ac.tokenize(prompt), return_dict=True)
    assert _max(out["cond"], pe) <= TOL
    assert _max(out["pooled_output"], pooled) <= TOL
    assert "attention_mask" not in out


# --- ComfyUI's default vs the spec ------------------------------------------------------------------------
def _encode(clip, prompt):
    return clip.encode_from_tokens(clip.tokenize(prompt), return_dict=True)


def test_sdxl_comfy_default_vs_spec(comfy, sdxl):
    """Same for ordinary prompts; long prompts chunked by ComfyUI (spec: truncated); empty prompt encoded
    by ComfyUI (spec: zeros)."""
    clip, _ = sdxl
    ac = comfy.engine("te.align").align_clip(clip, "sdxl")
    for name in ("plain", "unicode"):
        d, a = _encode(clip, PROMPTS[name]), _encode(ac, PROMPTS[name])
        assert _max(d["cond"], a["cond"]) <= 1e-5 and _max(d["pooled_output"], a["pooled_output"]) <= 1e-5
    d, a = _encode(clip, PROMPTS["long"]), _encode(ac, PROMPTS["long"])
    assert d["cond"].shape[1] > 77 and d["cond"].shape[1] % 77 == 0 and a["cond"].shape[1] == 77
    d, a = _encode(clip, ""), _encode(ac, "")
    assert d["cond"].abs().max() > 0 and a["cond"].abs().max() == 0


@pytest.mark.parametrize("ref_id,dif_id", [("sd3:reference", "sd3:diffusers"), ("sd35:large", "sd35:diffusers"),
                                            ("sd35:medium", "sd35:diffusers")])
def test_sd3_comfy_default_vs_spec(comfy, sd3, ref_id, dif_id):
    """reference: ComfyUI equal on short prompts; differs on the 226-char T5 cap and extra CLIP chunks.
    diffusers: T5 length 77 (ComfyUI) vs 256, and CLIP-L pooled projected."""
    clip, _, _ = sd3
    align = comfy.engine("te.align")
    ref, dif = align.align_clip(clip, ref_id), align.align_clip(clip, dif_id)
    d, r = _encode(clip, PROMPTS["plain"]), _encode(ref, PROMPTS["plain"])
    assert _max(d["cond"], r["cond"]) <= 1e-5 and _max(d["pooled_output"], r["pooled_output"]) <= 1e-5
    d, r = _encode(clip, PROMPTS["long"]), _encode(ref, PROMPTS["long"])
    assert d["cond"].shape[1] > r["cond"].shape[1] == 77 + 77  # one CLIP chunk + T5 (capped text, min 77)
    x, d = _encode(dif, PROMPTS["plain"]), _encode(clip, PROMPTS["plain"])
    assert x["cond"].shape[1] == 77 + 256 and d["cond"].shape[1] == 77 + 77
    assert _max(x["pooled_output"][:, 768:], d["pooled_output"][:, 768:]) <= 1e-5  # CLIP-G pooled: same
    assert _max(x["pooled_output"][:, :768], d["pooled_output"][:, :768]) > 1e-3  # CLIP-L: projected vs not


def test_diffusers_tokenizer_2_quirk(comfy, sdxl):
    """Documents a diffusers-only divergence the specs do not follow: tokenizer_2 (pad_token '!') turns '!!'
    into two pad ids 0; ComfyUI's CLIP-G tokenizer, like open_clip, keeps '!!' as one ordinary piece."""
    clip, pipe = sdxl
    ids = pipe.tokenizer_2("wow!!")["input_ids"]
    comfy_ids = [t for t, _ in clip.tokenize("wow!!")["g"][0]][: len(ids)]
    assert ids.count(0) == 2 and 0 not in comfy_ids[:-1]
