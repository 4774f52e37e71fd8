"""HiDream-I1 (``hidream`` spec): CLIP-L + CLIP-G pooled at 128 tokens, T5 at 128 with its mask, and every decoder
layer of Llama-3.1 at 128 tokens with its mask, stacked. The aligned CLIP, built from ComfyUI's own HiDream classes
on seeded tiny encoders, against ``HiDreamImagePipeline.encode_prompt`` on the same weights (fp32), and where
ComfyUI's default encoding differs from the spec."""
from __future__ import annotations

import inspect

import pytest
import torch

from support.factories import te_hidream
from support.prompt_syntax import BASE_PROMPTS, SYNTAX_PROMPTS
from support.te_compare import max_diff as _max, encode as _encode

TOL = 1e-4
PROMPTS = {
    **BASE_PROMPTS,
    "long": "word, " * 150,  # 300 tokens: over 128 for every encoder and over the CLIPs' 248 positions
    "mid": "a photo of " + "a red circle and " * 40,  # ~160 CLIP tokens: under 248, over 128
    # every prompt-syntax case is compared with the same reference in test_te_syntax.py (with an embeddings folder)
    "syntax-escaped": SYNTAX_PROMPTS["escaped"],
}


@pytest.fixture(scope="module")
def hidream(comfy):
    paths = te_hidream.files()
    return {"clip": te_hidream.hidream_clip(paths), "pipe": te_hidream.hidream_pipeline(*paths.values())}


@pytest.fixture(scope="module")
def refs(hidream):
    """The reference encoding of every prompt of the set, by name (one batched encode_prompt call)."""
    by_prompt = te_hidream.reference(hidream["pipe"], PROMPTS.values())
    return {name: by_prompt[p] for name, p in PROMPTS.items()}


def _diffs(out, ref) -> dict:
    return {k: _max(out[k], ref[k]) for k in ref}


def test_hidream_matches_hidream_pipeline(comfy, hidream, refs):
    """Reference: HiDreamImagePipeline.encode_prompt(prompt, max_sequence_length=128): T5 (1, 128, d) with its mask
    in the encoder, Llama's hidden_states[1:] stacked (every layer, mask in the encoder, 128 positions), and the
    CLIP-L and CLIP-G projected pooled vectors at 128 tokens, concatenated; for every prompt of the set (the
    prompt-syntax cases: test_te_syntax.py)."""
    aligned = comfy.engine("te.align").align_clip(hidream["clip"], "hidream")
    layers = te_hidream.LLAMA_TINY["num_hidden_layers"]
    pooled = te_hidream.CLIP_L_TINY["projection_dim"] + te_hidream.CLIP_G_TINY["projection_dim"]
    worst = {}
    for name, prompt in PROMPTS.items():
        ref = refs[name]
        assert ref["cond"].shape == (1, 128, te_hidream.T5_TINY["d_model"])
        assert ref["conditioning_llama3"].shape == (1, layers, 128, te_hidream.LLAMA_TINY["hidden_size"])
        assert ref["pooled_output"].shape == (1, pooled)
        out = _encode(aligned, prompt)
        assert out.get("attention_mask") is None, "HiDream's transformer takes no text mask"
        worst[name] = max(_diffs(out, ref).values())
    print("hidream aligned vs HiDreamImagePipeline, max abs", worst)
    assert max(worst.values()) <= TOL, worst


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
    "llama final norm on every layer": ({"llama": {"final_layer_norm": True}}, "plain"),
    "llama ComfyUI's tokenizer": ({"llama": {"tokenizer_file": "comfy"}}, "plain"),
    "llama pad with id 0": ({"llama": {"pad_token": "zero"}}, "plain"),
    "llama no mask in the encoder": ({"llama": {"encoder_attention_mask": False}}, "plain"),
    "t5 no mask in the encoder": ({"t5xxl": {"encoder_attention_mask": False}}, "plain"),
    "clip-l unprojected pooled": ({"l": {"pooled": "pooler_output"}}, "plain"),
    "clip-g 77 tokens": ({"g": {"max_length": 77}}, "mid"),
}


def test_hidream_parity_catches_spec_errors(comfy, hidream, refs, record_property):
    """Each deliberate error in the spec makes the aligned encoding differ from the pipeline's (shape or > 1e-4)."""
    align = comfy.engine("te.align")
    caught = {}
    for label, (changes, name) in SPEC_ERRORS.items():
        out = _encode(align.align_clip(hidream["clip"], _mutated(comfy, changes)), PROMPTS[name])
        ref = refs[name]
        shapes = {k: tuple(out[k].shape) != tuple(ref[k].shape) for k in ref}
        caught[label] = "shape" if any(shapes.values()) else max(_diffs(out, ref).values())
    record_property("hidream_spec_errors", caught)
    print("hidream deliberate spec errors", caught)
    assert all(v == "shape" or v > TOL for v in caught.values()), caught


def test_hidream_comfy_default_vs_spec(comfy, hidream, refs, record_property):
    """Where ComfyUI's default HiDream encoding differs from the official one: its Llama tokenizer (under
    transformers 5, spaces dropped), no 128-token cap for Llama, the CLIPs pooled from a 248-token window, parsed
    prompt syntax; and ComfyUI's Llama lacks Llama-3.1's RoPE scaling. T5 (first 128-token window) is the same.
    Compared with the reference encodings, which the aligned CLIP equals (test above)."""
    default = hidream["clip"]
    tok = hidream["pipe"].tokenizer_4
    rows = {}
    for name in ("plain", "empty", "long", "mid", "syntax-escaped"):
        prompt, a = PROMPTS[name], refs[name]
        d = _encode(default, prompt)
        comfy_ids = [t for t, *_ in default.tokenize(prompt)["llama"][0] if t != 128009]
        rows[name] = {"llama_positions": (d["conditioning_llama3"].shape[2], a["conditioning_llama3"].shape[2]),
                      "llama_tokens_as_official": comfy_ids == tok(prompt).input_ids,
                      **{k: _max(d[k], a[k]) if d[k].shape == a[k].shape else "shape" for k in ("cond", "pooled_output",
                                                                                                 "conditioning_llama3")}}
    with te_hidream.llama31_rope(hidream["pipe"]):
        official = te_hidream.reference(hidream["pipe"], [PROMPTS["plain"]])[PROMPTS["plain"]]
    rows["llama31_rope_scaling"] = _max(official["conditioning_llama3"], refs["plain"]["conditioning_llama3"])
    record_property("comfy_default_vs_spec", rows)
    print("hidream comfy default vs spec", rows)
    for name in ("plain", "empty"):
        assert rows[name]["cond"] <= TOL and rows[name]["pooled_output"] <= TOL
        same_tokens = rows[name]["llama_tokens_as_official"]
        assert (rows[name]["conditioning_llama3"] <= TOL) == same_tokens, rows[name]
    assert not rows["plain"]["llama_tokens_as_official"], "ComfyUI's Llama tokenizer agrees now: update the docs"
    assert rows["long"]["llama_positions"][1] == 128 < rows["long"]["llama_positions"][0]
    # ComfyUI 0.3.75 tokenizes an unweighted prompt as one group, split at the window: its first 128-token T5 window
    # is the official cut
    assert rows["long"]["cond"] <= TOL and rows["long"]["pooled_output"] > TOL
    assert rows["mid"]["pooled_output"] > TOL and rows["syntax-escaped"]["cond"] > TOL
    assert rows["llama31_rope_scaling"] > TOL


def test_hidream_clip_window_is_met_or_refused(comfy, hidream):
    """ComfyUI's CLIP takes exactly its position count: the spec's 128 tokens are padded to HiDream's 248 at encode
    time; on a 77-position CLIP (a stock CLIP-L) a prompt over 77 tokens is refused naming the encoder and the fix,
    and a shorter one is padded to 77 (the pooled vector at the end token is the same)."""
    import copy

    align = comfy.engine("te.align")
    ac = align.align_clip(hidream["clip"], "hidream")
    enc = {e.key: e for e in ac.spec.encoders}["l"]
    sub = copy.copy(hidream["clip"].tokenizer.clip_l)
    tokens = ac.tokenize(PROMPTS["mid"])["l"]
    assert [len(b) for b in tokens] == [128] and [len(b) for b in align.fit_window(sub, enc, tokens)] == [248]
    sub.max_length = 77
    with pytest.raises(comfy.engine("te.specs").SpecError, match=r"128 tokens for encoder 'l' \(clip_l\).*only 77 "
                                                                  r"positions.*248"):
        align.fit_window(sub, enc, tokens)
    short = align.fit_window(sub, enc, ac.tokenize("a red circle")["l"])
    assert [len(b) for b in short] == [77] and {t for t, *_ in short[0][5:]} == {49407}


def test_hidream_token_inspector_reads_the_official_llama_tokens(comfy, hidream):
    """The Token Inspector shows Llama's pieces from the spec's tokenizer (tokenizer.json as written, spaces kept) and
    counts what the official 128-token cut drops, per encoder."""
    ac = comfy.engine("te.align").align_clip(hidream["clip"], "hidream")
    tok = hidream["pipe"].tokenizer_4
    info = comfy.engine("te.inspect").inspect_text(ac, PROMPTS["long"])["encoders"]
    assert info["llama"]["ids"] == tok(PROMPTS["long"], add_special_tokens=False).input_ids
    assert info["llama"]["truncated_tokens"] == len(tok(PROMPTS["long"]).input_ids) - 128
    t5 = hidream["pipe"].tokenizer_3
    assert info["t5xxl"]["truncated_tokens"] == len(t5(PROMPTS["long"]).input_ids) - 128
    clip_tok = hidream["pipe"].tokenizer
    assert info["clip_l"]["truncated_tokens"] == len(clip_tok(PROMPTS["long"]).input_ids) - 128


def test_tokenizer_file_without_tokenizer_json_is_refused(comfy, hidream):
    """A spec that reads an encoder's tokens from tokenizer.json, on a tokenizer folder without one (ComfyUI's CLIP
    BPE ships vocab.json + merges.txt), fails naming the file and the fix."""
    ac = comfy.engine("te.align").align_clip(hidream["clip"], _mutated(comfy, {"l": {"tokenizer_file": "tokenizer_json"}}))
    with pytest.raises(comfy.engine("te.specs").SpecError, match=r"sd1_tokenizer.tokenizer\.json, which does not exist.*"
                                                                  r"tokenizer_file to 'comfy'"):
        ac.tokenize("a red circle")
