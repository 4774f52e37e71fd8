"""SD2.x and AuraFlow aligned CLIPs against diffusers' own prompt encoding on the same seeded weights (fp32),
and where ComfyUI's default encoder differs from each spec."""
from __future__ import annotations

import pytest
import torch

from support.factories import te_more
from support.te_compare import max_diff as _max

PROMPTS = {
    "plain": "ohwx, a red circle on a blue background, flat colors",
    "empty": "",
    # no "!" for SD2: diffusers' SD2 tokenizer has pad_token "!" and splits "!!" into pad ids, where OpenCLIP and
    # ComfyUI keep it as text (the same quirk as SDXL's tokenizer_2, see test_te_families.py)
    "unicode": "héllo wörld?? ~ ✨ café, 'quotes' & semi;colons? 100% — ok",
    "long": None,  # longer than the encoder's max length, built per family
}
TOL = 1e-4


def _prompt(name: str, length: int) -> str:
    return PROMPTS[name] if name != "long" else "a photo of " + ", ".join(f"detail {i}" for i in range(length)) + ", end"


def _encode(clip, prompt):
    return clip.encode_from_tokens(clip.tokenize(prompt), return_dict=True)


@pytest.fixture(scope="module")
def sd2(comfy):
    path = te_more.clip_h_file()
    return te_more.sd2_clip(path), te_more.sd2_pipeline(path)


@pytest.fixture(scope="module")
def aura(comfy):
    path = te_more.pile_t5_file()
    return te_more.auraflow_clip(path), te_more.auraflow_pipeline(path)


@pytest.mark.parametrize("name", PROMPTS)
def test_sd2x_matches_stable_diffusion_pipeline(comfy, sd2, name):
    """Reference: StableDiffusionPipeline.encode_prompt(prompt, 'cpu', 1, False) with SD 2.1's text encoder
    (OpenCLIP-H minus its last layer, so last_hidden_state = penultimate layer + final LayerNorm), tokenizer
    padding='max_length', max_length=77, truncation=True, pad '!' (id 0)."""
    clip, pipe = sd2
    prompt = _prompt(name, 77)
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    ac = comfy.engine("te.align").align_clip(clip, "auto")
    assert ac.aligned_trainer_spec["id"] == "sd2x"
    out = _encode(ac, prompt)
    assert out["cond"].shape == ref.shape == (1, 77, te_more.CLIP_H_TINY["hidden_size"])
    assert _max(out["cond"], ref) <= TOL
    assert "attention_mask" not in out


@pytest.mark.parametrize("name", PROMPTS)
def test_auraflow_matches_auraflow_pipeline(comfy, aura, name):
    """Reference: AuraFlowPipeline.encode_prompt(prompt, do_classifier_free_guidance=False,
    max_sequence_length=256): Pile-T5 padded to 256 and truncated, the tokenizer mask used inside the encoder,
    padded positions multiplied by zero; the mask is returned but AuraFlow's transformer takes none."""
    clip, pipe = aura
    prompt = _prompt(name, 256)
    with torch.no_grad():
        ref, ref_mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, device="cpu",
                                                 max_sequence_length=256)
    ac = comfy.engine("te.align").align_clip(clip, "auto")
    assert ac.aligned_trainer_spec["id"] == "auraflow"
    out = _encode(ac, prompt)
    assert out["cond"].shape == ref.shape == (1, 256, te_more.PILE_T5_TINY["d_model"])
    assert _max(out["cond"], ref) <= TOL
    pad = ref_mask.view(1, 256, -1)[0, :, 0] == 0  # diffusers returns the mask expanded to the embedding shape
    assert bool(pad.any()) == (name != "long") and out["cond"][0, pad].abs().sum().item() == 0
    assert "attention_mask" not in out


def test_sd2x_comfy_default_vs_spec(comfy, sd2):
    """Same for ordinary prompts; ComfyUI chunks long prompts into 77-token pieces, the spec truncates at 77."""
    clip, _ = sd2
    ac = comfy.engine("te.align").align_clip(clip, "sd2x")
    for name in ("plain", "empty", "unicode"):
        assert _max(_encode(clip, PROMPTS[name])["cond"], _encode(ac, PROMPTS[name])["cond"]) <= 1e-5
    long = _prompt("long", 77)
    d, a = _encode(clip, long), _encode(ac, long)
    assert d["cond"].shape[1] > 77 and d["cond"].shape[1] % 77 == 0 and a["cond"].shape[1] == 77
    assert _max(d["cond"][:, :77], a["cond"]) <= 1e-5  # the first chunk is the truncated prompt


def test_auraflow_comfy_default_vs_spec(comfy, aura):
    """ComfyUI pads to at least 256 with the same mask and zeroing, so short prompts agree; above 256 tokens
    ComfyUI keeps the whole prompt where the spec truncates."""
    clip, _ = aura
    ac = comfy.engine("te.align").align_clip(clip, "auraflow")
    for name in ("plain", "empty", "unicode"):
        d, a = _encode(clip, PROMPTS[name]), _encode(ac, PROMPTS[name])
        assert d["cond"].shape[1] == a["cond"].shape[1] == 256
        assert _max(d["cond"], a["cond"]) <= 1e-5
    long = _prompt("long", 256)
    d, a = _encode(clip, long), _encode(ac, long)
    assert d["cond"].shape[1] > 256 and a["cond"].shape[1] == 256
