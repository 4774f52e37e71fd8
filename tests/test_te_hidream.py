"""HiDream-I1 (``hidream`` spec): CLIP-L + CLIP-G pooled at 128 tokens, T5 at 128 with its mask, and every decoder
layer of Llama-3.1 at 128 tokens with its mask, stacked. The aligned CLIP, built from ComfyUI's own HiDream classes
on seeded tiny encoders, against ``HiDreamImagePipeline.encode_prompt`` on the same weights (fp32), and where
ComfyUI's default encoding differs from the spec."""
from __future__ import annotations

import inspect

import pytest
import torch

from support.factories import te_hidream
from support.prompt_syntax import SYNTAX_PROMPTS
from support.te_compare import max_diff as _max, encode as _encode

TOL = 1e-4
PROMPTS = {
    "plain": "ohwx, a red circle on a blue background, flat colors",
    "empty": "",
    "unicode": "héllo wörld!! ~ ✨ café, 'quotes' & semi;colons? 100% — ok",
    "newlines": "line one\nline two\n\n  spaced   out  ",
    "long": "word, " * 150,  # 300 tokens: over 128 for every encoder and over the CLIPs' 248 positions
    "mid": "a photo of " + "a red circle and " * 40,  # ~160 CLIP tokens: under 248, over 128
    **{f"syntax-{k}": v for k, v in SYNTAX_PROMPTS.items()},
}


@pytest.fixture(scope="module")
def hidream(comfy):
    paths = te_hidream.files()
    return {"clip": te_hidream.hidream_clip(paths), "pipe": te_hidream.hidream_pipeline(*paths.values()),
            "official": te_hidream.hidream_pipeline(*paths.values(), official_rope=True)}


def _ref(pipe, prompt):
    """HiDreamImagePipeline.encode_prompt as __call__ runs it (its default max_sequence_length), without CFG:
    (T5 sequence, Llama stack as (batch, layers, tokens, width), pooled CLIP-L + CLIP-G)."""
    n = inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default
    with torch.no_grad():
        t5, _, llama, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False,
                                                        max_sequence_length=n)
    return {"cond": t5, "conditioning_llama3": llama.permute(1, 0, 2, 3), "pooled_output": pooled}


def _diffs(out, ref) -> dict:
    return {k: _max(out[k], ref[k]) for k in ref}


@pytest.mark.parametrize("name", PROMPTS)
def test_hidream_matches_hidream_pipeline(comfy, hidream, name):
    """Reference: HiDreamImagePipeline.encode_prompt(prompt, max_sequence_length=128): T5 (1, 128, d) with its mask
    in the encoder, Llama's hidden_states[1:] stacked (every layer, mask in the encoder, 128 positions), and the
    CLIP-L and CLIP-G projected pooled vectors at 128 tokens, concatenated."""
    prompt = PROMPTS[name]
    ref = _ref(hidream["pipe"], prompt)
    out = _encode(comfy.engine("te.align").align_clip(hidream["clip"], "hidream"), prompt)
    layers = te_hidream.LLAMA_TINY["num_hidden_layers"]
    assert ref["cond"].shape == (1, 128, te_hidream.T5_TINY["d_model"])
    assert ref["conditioning_llama3"].shape == (1, layers, 128, te_hidream.LLAMA_TINY["hidden_size"])
    assert ref["pooled_output"].shape == (1, te_hidream.CLIP_L_TINY["projection_dim"] +
                                          te_hidream.CLIP_G_TINY["projection_dim"])
    diffs = _diffs(out, ref)
    assert max(diffs.values()) <= TOL, diffs
    assert out.get("attention_mask") is None, "HiDream's transformer takes no text mask"


def test_hidream_spec_values_are_the_pipelines(comfy, hidream):
    """The spec's lengths, the CLIP cap and the Llama pad token are the pipeline's own, and ComfyUI's HiDream
    tokenizer pads Llama with the same id."""
    pipe = hidream["pipe"]
    encs = {e.key: e for e in comfy.engine("te.specs").get_spec("hidream").encoders}
    for fn in (type(pipe).__call__, type(pipe).encode_prompt):
        n = inspect.signature(fn).parameters["max_sequence_length"].default
        assert {e["max_length"] for e in encs.values()} == {n} == {128}
    assert "max_length=min(max_sequence_length, 218)" in inspect.getsource(type(pipe)._get_clip_prompt_embeds)
    assert "hidden_states[1:]" in inspect.getsource(type(pipe)._get_llama3_prompt_embeds)
    tok = pipe.tokenizer_4
    assert tok.pad_token == tok.eos_token == te_hidream.LLAMA31_EOS
    assert hidream["clip"].tokenizer.llama.pad_token == tok.pad_token_id == 128009
    assert encs["llama"]["pad_token"] == "tokenizer" and encs["llama"]["hidden_layer"] == "all"


def test_hidream_spec_is_detected(comfy, hidream):
    assert comfy.engine("te.specs").detect_spec(hidream["clip"]).id == "hidream"


def _mutated(comfy, changes: dict):
    """The hidream spec with single encoder fields replaced: {comfy_key: {field: value}}."""
    import copy

    specs = comfy.engine("te.specs")
    spec = specs.get_spec("hidream")
    raw = copy.deepcopy(spec.raw)
    for enc in raw["encoders"]:
        for field, value in changes.get(enc["comfy_key"], {}).items():
            enc[field] = {"value": value, "source": "deliberate error for the test"}
    return specs.parse_spec(raw, spec.path)


# each deliberate spec error and the prompt on which the parity test above catches it
SPEC_ERRORS = {
    "llama every layer -> last": ({"llama": {"hidden_layer": "last"}}, "plain"),
    "llama final norm on every layer": ({"llama": {"final_layer_norm": True}}, "plain"),
    "llama ComfyUI's tokenizer": ({"llama": {"tokenizer_file": "comfy"}}, "plain"),
    "llama pad with id 0": ({"llama": {"pad_token": "zero"}}, "plain"),
    "llama no mask in the encoder": ({"llama": {"encoder_attention_mask": False}}, "plain"),
    "llama 256 tokens": ({"llama": {"max_length": 256}}, "long"),
    "llama zeroed pads": ({"llama": {"zero_padded": True}}, "plain"),
    "t5 no mask in the encoder": ({"t5xxl": {"encoder_attention_mask": False}}, "plain"),
    "t5 77 tokens": ({"t5xxl": {"max_length": 77}}, "plain"),
    "t5 chunked (ComfyUI)": ({"t5xxl": {"truncation": "first_chunk"}}, "long"),
    "clip-l unprojected pooled": ({"l": {"pooled": "pooler_output"}}, "plain"),
    "clip-g 77 tokens": ({"g": {"max_length": 77}}, "mid"),
}


def test_hidream_parity_catches_spec_errors(comfy, hidream, record_property):
    """Each deliberate error in the spec makes the aligned encoding differ from the pipeline's (shape or > 1e-4)."""
    align = comfy.engine("te.align")
    refs = {name: _ref(hidream["pipe"], PROMPTS[name]) for name in {p for _, p in SPEC_ERRORS.values()}}
    caught = {}
    for label, (changes, name) in SPEC_ERRORS.items():
        out = _encode(align.align_clip(hidream["clip"], _mutated(comfy, changes)), PROMPTS[name])
        ref = refs[name]
        shapes = {k: tuple(out[k].shape) != tuple(ref[k].shape) for k in ref}
        caught[label] = "shape" if any(shapes.values()) else max(_diffs(out, ref).values())
    record_property("hidream_spec_errors", caught)
    print("hidream deliberate spec errors", caught)
    assert all(v == "shape" or v > TOL for v in caught.values()), caught
