"""T5-only families (PixArt-Sigma, Chroma): aligned CLIPs against diffusers' own prompt encoding on the same
seeded tiny T5 (fp32), and where ComfyUI's default encoder differs from each spec."""
from __future__ import annotations

import pytest
import torch

from support.factories import te_t5
from support.factories import text_encoders as te
from support.te_compare import max_diff as _max

PROMPTS = {
    "plain": "ohwx, a red circle on a blue background, flat colors",
    "empty": "",
    "unicode": "héllo wörld!! ~ ✨ café, 'quotes' & semi;colons? 100% — ok",
    "long": None,  # longer than the spec's max length, built per family
}
TOL = 1e-4


def _prompt(name: str, length: int) -> str:
    return PROMPTS[name] if name != "long" else "word, " * (length + 40)


@pytest.fixture(scope="module")
def t5_te(comfy):
    path = te.t5_tiny_file()
    return {"clip": te_t5.pixart_clip(path), "pixart": te_t5.pixart_sigma_pipeline(path),
            "chroma": te_t5.chroma_pipeline(path)}


@pytest.mark.parametrize("name", PROMPTS)
def test_pixart_sigma_matches_pixart_sigma_pipeline(comfy, t5_te, name):
    """Reference: PixArtSigmaPipeline.encode_prompt(prompt, do_classifier_free_guidance=False,
    max_sequence_length=300, clean_caption=False) on text already cleaned by the spec's cleaner: T5 padded to
    300 and truncated, the attention mask used in T5 and returned for the transformer. diffusers'
    clean_caption=True needs bs4 and ftfy, which are not installed here (diffusers itself then skips
    cleaning), so the cleaning step is not part of this comparison."""
    align, spec = comfy.engine("te.align"), comfy.engine("te.specs").get_spec("pixart-sigma")
    enc = spec.encoders[0]
    prompt = _prompt(name, enc["max_length"])
    with torch.no_grad():
        ref, ref_mask, _, _ = t5_te["pixart"].encode_prompt(
            align.clean_text(prompt, enc["cleaning"]), do_classifier_free_guidance=False, device="cpu",
            max_sequence_length=enc["max_length"], clean_caption=False)
    ac = align.align_clip(t5_te["clip"], "pixart-sigma")
    out = ac.encode_from_tokens(ac.tokenize(prompt), return_dict=True)
    assert out["cond"].shape == (1, 300, te.T5_TINY["d_model"])
    assert _max(out["cond"], ref) <= TOL
    assert torch.equal(out["attention_mask"].long(), ref_mask.long())


@pytest.mark.parametrize("name", PROMPTS)
def test_chroma_matches_chroma_pipeline(comfy, t5_te, name):
    """Reference: ChromaPipeline.encode_prompt(prompt, do_classifier_free_guidance=False,
    max_sequence_length=512): T5 padded to 512 and truncated, tokenizer mask inside T5, and a transformer mask
    that also shows the first pad token."""
    align = comfy.engine("te.align")
    prompt = _prompt(name, 512)
    with torch.no_grad():
        ref, _, ref_mask, *_ = t5_te["chroma"].encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False,
                                                              max_sequence_length=512)
    ac = align.align_clip(t5_te["clip"], "chroma")
    out = ac.encode_from_tokens(ac.tokenize(prompt), return_dict=True)
    assert out["cond"].shape == (1, 512, te.T5_TINY["d_model"])
    assert _max(out["cond"], ref) <= TOL
    assert torch.equal(out["attention_mask"].long(), ref_mask.long())


@pytest.mark.parametrize("spec_id", ["pixart-sigma", "chroma"])
def test_t5_families_comfy_default_vs_spec(comfy, t5_te, spec_id):
    """ComfyUI's default (PixArtTokenizer: no padding, no mask): for a short prompt the content embeddings equal
    the spec's masked ones (nothing to mask), but the spec pads to max length and hands a mask to the
    denoiser; long prompts are never truncated by the default."""
    align, clip = comfy.engine("te.align"), t5_te["clip"]
    spec = comfy.engine("te.specs").get_spec(spec_id)
    length = spec.encoders[0]["max_length"]
    ac = align.align_clip(clip, spec_id)
    prompt = PROMPTS["plain"]
    d = clip.encode_from_tokens(clip.tokenize(prompt), return_dict=True)
    a = ac.encode_from_tokens(ac.tokenize(prompt), return_dict=True)
    n = d["cond"].shape[1]
    assert n < length and a["cond"].shape[1] == length
    assert "attention_mask" not in d and int(a["attention_mask"].sum()) >= n
    assert _max(d["cond"], a["cond"][:, :n]) <= TOL
    long = _prompt("long", length)
    assert clip.encode_from_tokens(clip.tokenize(long)).shape[1] > length
    assert ac.encode_from_tokens(ac.tokenize(long)).shape[1] == length


def test_auto_detection_picks_pixart_for_the_pixart_loader(comfy, t5_te):
    """PixArt and Chroma share ComfyUI's loader classes; auto picks the spec marked default (PixArt-Sigma)."""
    ac = comfy.engine("te.align").align_clip(t5_te["clip"], "auto")
    assert ac.aligned_trainer_spec["id"] == "pixart-sigma"
