"""FLUX.2 [dev]'s tokenizer under transformers 5, and the pack's compatibility fix for it.

ComfyUI gets FLUX.2's tokenizer from the text-encoder file itself: ``comfy.sd.load_clip`` passes the file's
``tekken_model`` tensor (Mistral's tekken.json, as bytes) as ``tokenizer_data``, and ``Mistral3Tokenizer`` converts it
in ``comfy.text_encoders.flux.load_mistral_tokenizer`` with transformers 4's ``MistralConverter(vocab=...,
additional_special_tokens=...)``. transformers 5's converter takes a file path, so ComfyUI 0.3.75's own function
raises (pinned below, so that we notice when ComfyUI fixes it). The pack wraps that one function when it loads
(``aligned_trainer.te.mistral_compat``) so that ComfyUI's ``Flux2Tokenizer`` builds the tokenizer transformers 4
built. See docs/text_encoders.md, "FLUX.2 [dev]".
"""
from __future__ import annotations

import inspect
import json

import pytest
import torch

from support.factories import te_flux2
from support.prompt_syntax import BASE_PROMPTS, SYNTAX_PROMPTS
from support.te_compare import encode as _encode, max_diff as _max

# ComfyUI 0.3.75 Flux2Tokenizer.llama_template (diffusers' SYSTEM_MESSAGE inside Mistral's system/instruction tokens)
COMFY_TEMPLATE = ("[SYSTEM_PROMPT]You are an AI that reasons about image descriptions. You give structured responses "
                  "focusing on object relationships, object\nattribution and actions without speculation."
                  "[/SYSTEM_PROMPT][INST]{}[/INST]")
N = len(te_flux2.CONTROL)


def _rank(piece: bytes) -> int:
    return te_flux2._bpe_pieces().index(piece)


def test_tiny_tekken_tokenizer_builds_with_transformers(tmp_path):
    """transformers 5 converts the tiny tekken.json (no mistral_common): control tokens keep their ranks as ids, BPE
    rank r becomes id r + 20, merges apply; the reference side of the FLUX.2 parity tests tokenizes with it."""
    tok = te_flux2.tekken_tokenizer(tmp_path)
    ids = tok("[SYSTEM_PROMPT]You[/SYSTEM_PROMPT][INST]a red circle[/INST]", add_special_tokens=False).input_ids
    assert ids[0] == 17 and ids[-1] == 4 and 18 in ids and 3 in ids
    assert tok.convert_tokens_to_ids(["<s>", "<pad>", "[IMG]"]) == [1, 11, 10]
    assert ids[1] == _rank(b"You") + N  # a merged piece, shifted by the control tokens
    assert len(tok) == te_flux2.vocab_size()  # the ranks past default_vocab_size are dropped


def test_comfyui_own_mistral_loader_needs_transformers_4(comfy):
    """ComfyUI 0.3.75's load_mistral_tokenizer as written (the function the pack wraps) still fails with transformers
    5's MistralConverter. When this fails, ComfyUI (or transformers) fixed it and the pack's wrapper can go."""
    import comfy.text_encoders.flux as flux

    compat = comfy.engine("te.mistral_compat")
    assert getattr(flux.load_mistral_tokenizer, compat.MARK, False), "the pack wraps ComfyUI's loader when it loads"
    original = flux.load_mistral_tokenizer.__wrapped__
    with pytest.raises(TypeError, match="vocab"):
        original(te_flux2.tekken_bytes())
    assert not compat.converter_takes_vocab()


def test_compat_applies_once_logs_one_line_and_leaves_a_working_loader_alone(comfy, caplog):
    """apply() wraps ComfyUI's function once and logs one line; where the installed MistralConverter takes
    transformers 4's arguments (stood in for by the pack's own converter class, which has that signature) it leaves
    ComfyUI's function as it is, and ComfyUI's own function then gives the same tokenizer as the wrapped one."""
    import logging

    import comfy.text_encoders.flux as flux
    import transformers.integrations.mistral as tm

    compat = comfy.engine("te.mistral_compat")
    wrapped = flux.load_mistral_tokenizer
    original, installed = wrapped.__wrapped__, tm.MistralConverter
    data = te_flux2.tekken_bytes()
    try:
        flux.load_mistral_tokenizer = original
        with caplog.at_level(logging.INFO):
            assert compat.apply() and compat.apply()
        assert len([r for r in caplog.records if "load_mistral_tokenizer" in r.getMessage()]) == 1
        assert flux.load_mistral_tokenizer.__wrapped__ is original
        flux.load_mistral_tokenizer = original
        tm.MistralConverter = compat.Transformers4MistralConverter  # a transformers-4 style converter installed
        assert compat.converter_takes_vocab() and not compat.apply()
        assert flux.load_mistral_tokenizer is original
        plain = original(data)["tokenizer_object"]
    finally:
        flux.load_mistral_tokenizer, tm.MistralConverter = wrapped, installed
    ours = wrapped(data)["tokenizer_object"]
    text = COMFY_TEMPLATE.format("unrelated words: quietly restructuring 100 relational speculations")
    assert plain.get_vocab() == ours.get_vocab()
    assert plain.encode(text, add_special_tokens=False).ids == ours.encode(text, add_special_tokens=False).ids


def test_flux2_tokenizer_builds_with_the_pack_loaded(comfy, tmp_path):
    """With the pack loaded, ComfyUI's own Flux2Tokenizer builds from the tekken data as the loader passes it and
    tokenizes ComfyUI's own template: <s> (Mistral3Tokenizer's start token), then the same ids as transformers'
    own converter of the same tekken.json gives the templated text."""
    import comfy.text_encoders.flux as flux

    tok = flux.Flux2Tokenizer(tokenizer_data=te_flux2.tokenizer_data())
    assert tok.llama_template == COMFY_TEMPLATE.replace("{}", "{}")
    ref = te_flux2.tekken_tokenizer(tmp_path)
    for prompt in ("a red circle on a blue background", "", "héllo wörld ✨ 5%", "line one\nline two",
                   "unrelated words: quietly restructuring relational speculations, recolored backgrounds"):
        pairs = tok.tokenize_with_weights(prompt)["mistral3_24b"]
        ids = [t for batch in pairs for t, _ in batch]
        want = ref(COMFY_TEMPLATE.format(prompt), add_special_tokens=False).input_ids
        assert ids == [1] + want, prompt
    sub = tok.mistral3_24b
    assert (sub.start_token, sub.end_token, sub.pad_token) == (1, None, 11)


def test_compat_tokenizer_is_transformers_4s(comfy):
    """The wrapper's converter gives what transformers 4's gave ComfyUI's dict: control tokens at their ranks, BPE
    rank r at id r + (number of control tokens), ranks >= default_vocab_size - len(special_tokens) dropped, merges in
    rank order, transformers 4's default pre-tokenizer pattern (ComfyUI passes none)."""
    import comfy.text_encoders.flux as flux

    compat = comfy.engine("te.mistral_compat")
    args = flux.load_mistral_tokenizer(te_flux2.tekken_bytes())
    t = args["tokenizer_object"]
    assert args["legacy"] is False
    vocab = t.get_vocab()
    assert all(vocab[s] == i for i, s in enumerate(te_flux2.CONTROL))
    pieces = te_flux2._bpe_pieces()
    assert len(vocab) == len(te_flux2.CONTROL) + len(pieces)  # the 4 ranks past the vocabulary are gone
    assert t.encode("").ids == [1]  # <s> first, as transformers 4's LlamaTokenizerFast added it
    assert t.encode("You", add_special_tokens=False).ids == [_rank(b"You") + N]
    assert t.encode("[INST]zz[/INST]", add_special_tokens=False).ids == [3, ord("z") + N, ord("z") + N, 4]
    split = json.loads(t.pre_tokenizer.__getstate__())["pretokenizers"][0]
    assert split["pattern"]["Regex"] == compat.TRANSFORMERS4_PATTERN


def test_tiny_flux2_clip_encodes_through_comfyui_classes(comfy):
    """The tiny FLUX.2 text encoder loads into ComfyUI's Flux2TEModel with no missing or unexpected keys (asserted by
    the factory) and ComfyUI's default encoding stacks layers 10/20/30: width 3 x 64, one position per token. The
    test-only TinyTextEncoderLoader gives it as family 'flux2'."""
    from support.comfy_nodes.aligned_trainer_tiny_loaders import TinyTextEncoderLoader

    assert "flux2" in TinyTextEncoderLoader.INPUT_TYPES()["required"]["family"][0]
    (clip,) = TinyTextEncoderLoader().load("flux2")
    tokens = clip.tokenize("a red circle")
    n = sum(len(b) for b in tokens["mistral3_24b"])
    with torch.no_grad():
        out = clip.encode_from_tokens(tokens, return_dict=True)
    assert out["cond"].shape == (1, n, 3 * te_flux2.MISTRAL_TINY["hidden_size"])
    assert torch.isfinite(out["cond"]).all()


# -- the flux2-dev spec against diffusers' Flux2Pipeline.encode_prompt on the same tiny weights -------------------
TOL = 1e-4
PROMPTS = {
    **BASE_PROMPTS,
    "long": "word, " * 600,  # over 512 tokens once templated
    "image-token": "a [IMG] cat [IMG]",
    "digits": "100 cats, 1000 dogs and 10 birds",
    **{f"syntax-{k}": v for k, v in SYNTAX_PROMPTS.items()},
}


@pytest.fixture(scope="module")
def flux2(comfy, tmp_path_factory):
    path = te_flux2.mistral_tiny_file()
    return {"clip": te_flux2.flux2_clip(path),
            "pipe": te_flux2.flux2_pipeline(path, tmp_path_factory.mktemp("flux2-tokenizer"))}


def _reference(pipe, prompt):
    """Flux2Pipeline.encode_prompt as __call__ runs it (its default max_sequence_length and layers), and the ids and
    mask the pipeline's processor gives the encoder."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    call = inspect.signature(type(pipe).__call__).parameters
    n, layers = call["max_sequence_length"].default, call["text_encoder_out_layers"].default
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompt, device="cpu", max_sequence_length=n, text_encoder_out_layers=layers)
    inputs = pipe.tokenizer.apply_chat_template(format_input([prompt], system_message=pipe.system_message),
                                                add_generation_prompt=False, tokenize=True, return_dict=True,
                                                return_tensors="pt", padding="max_length", truncation=True,
                                                max_length=n)
    return embeds, inputs["input_ids"][0].tolist(), inputs["attention_mask"][0].tolist()


def test_flux2_spec_values_are_the_pipelines(comfy, flux2):
    """The spec's length, layers and template are the pipeline's own values: max_sequence_length and
    text_encoder_out_layers defaults, the SYSTEM_MESSAGE the pipeline holds, ComfyUI's template text."""
    pipe = flux2["pipe"]
    (enc,) = comfy.engine("te.specs").get_spec("flux2-dev").encoders
    call = inspect.signature(type(pipe).__call__).parameters
    assert enc["max_length"] == call["max_sequence_length"].default == pipe.tokenizer_max_length
    assert enc["hidden_layer"] == list(call["text_encoder_out_layers"].default)
    assert enc["template"] == f"[SYSTEM_PROMPT]{pipe.system_message}[/SYSTEM_PROMPT][INST]{{prompt}}[/INST]"
    assert enc["template"] == COMFY_TEMPLATE.replace("{}", "{prompt}")


@pytest.mark.parametrize("name", PROMPTS)
def test_flux2_matches_flux2_pipeline(comfy, flux2, name):
    """Reference: Flux2Pipeline.encode_prompt(prompt): system message + Mistral chat template, padded on the left to
    512 and truncated, mask in the encoder, hidden states 10/20/30 side by side (3 x 64 wide), no mask to the
    transformer. The aligned CLIP gives the same 512 x 192 embeddings (within 1e-4) and no denoiser mask; its tokens
    and encoder mask are the processor's."""
    align = comfy.engine("te.align")
    prompt = PROMPTS[name]
    ref, ref_ids, ref_mask = _reference(flux2["pipe"], prompt)
    aligned = align.align_clip(flux2["clip"], "flux2-dev")
    tokens = aligned.tokenize(prompt)
    ids = [t for batch in tokens["mistral3_24b"] for t, _ in batch]
    assert ids == ref_ids
    assert align.leading_pads([ids], 11)[0].tolist() == ref_mask
    out = _encode(aligned, prompt)
    assert out["cond"].shape == ref.shape == (1, 512, 3 * te_flux2.MISTRAL_TINY["hidden_size"])
    assert _max(out["cond"], ref) <= TOL
    assert out.get("attention_mask") is None, "the official transformer gets no text mask"


def test_flux2_spec_is_detected(comfy, flux2):
    assert comfy.engine("te.specs").detect_spec(flux2["clip"]).id == "flux2-dev"


def _ids(clip, prompt) -> list[int]:
    return [t for batch in clip.tokenize(prompt)["mistral3_24b"] for t, _ in batch]


def _unpadded(ids: list[int]) -> list[int]:
    return ids[ids.index(1):]  # from <s> on (the aligned tokens are padded on the left)


def _content_rows(default, aligned):
    n = default.shape[1]
    return _max(default[0], aligned[0, -n:]) if n <= aligned.shape[1] else None


def test_flux2_comfy_default_vs_spec(comfy, flux2):
    """Each of the spec's comfy_default_differences, on the tiny model: ComfyUI encodes the prompt's tokens only (no
    512 padding), never truncates, pre-splits digit runs with transformers 4's pattern, keeps '[IMG]' and parses
    escapes. The prompt's own positions agree with the official ones (within 1e-4): causal attention and relative
    positions make them independent of the left padding."""
    align = comfy.engine("te.align")
    aligned = align.align_clip(flux2["clip"], "flux2-dev")
    default = flux2["clip"]
    plain = PROMPTS["plain"]
    d, a = _encode(default, plain)["cond"], _encode(aligned, plain)["cond"]
    assert a.shape[1] == 512 > d.shape[1]
    assert _content_rows(d, a) <= TOL
    long_d, long_a = _encode(default, PROMPTS["long"])["cond"], _encode(aligned, PROMPTS["long"])["cond"]
    assert long_a.shape[1] == 512 < long_d.shape[1]
    digits_d, digits_a = _ids(default, PROMPTS["digits"]), _unpadded(_ids(aligned, PROMPTS["digits"]))
    assert digits_d != digits_a and len(digits_d) < len(digits_a)  # "100" one piece vs "1", "0", "0"
    assert 10 in _ids(default, "a [IMG] cat") and 10 not in _ids(aligned, "a [IMG] cat")  # [IMG] kept vs removed
    esc = r"a \(literal\) bracket"
    d, a = _encode(default, esc)["cond"], _encode(aligned, esc)["cond"]
    assert d.shape[1] != a.shape[1] or _max(d, a) > TOL
    assert len(_ids(default, esc)) < len(_unpadded(_ids(aligned, esc)))  # ComfyUI drops the backslashes


def test_flux2_comfyui_syntax_equals_stock_comfyui_content(comfy, flux2):
    """The 'comfyui' prompt syntax reads prompts as ComfyUI's Flux2Tokenizer does (escapes resolved, weights ignored):
    the same token ids, and the same embeddings at the prompt's positions."""
    align = comfy.engine("te.align")
    ac = align.align_clip(flux2["clip"], "flux2-dev", prompt_syntax="comfyui")
    for prompt in (r"a (red:1.3) circle, \(cat\) on ((grass))", PROMPTS["plain"]):
        d = flux2["clip"]
        assert _unpadded(_ids(ac, prompt)) == _ids(d, prompt), prompt
        assert _content_rows(_encode(d, prompt)["cond"], _encode(ac, prompt)["cond"]) <= TOL, prompt


def test_flux2_token_inspector_and_alignment_report(comfy, flux2):
    """The Token Inspector reads the aligned FLUX.2 CLIP: 512 positions, a long prompt's cut counted; the alignment
    report compares ComfyUI's default with the prompt's own positions of the left-padded spec (equal within 1e-4,
    cosine 1), and reports the 465 leading pads as the positions only the spec has."""
    align, inspect_ = comfy.engine("te.align"), comfy.engine("te.inspect")
    aligned = align.align_clip(flux2["clip"], "flux2-dev")
    info = inspect_.inspect_text(aligned, PROMPTS["plain"], trigger="ohwx")["encoders"]["mistral3_24b"]
    assert info["positions"] == 512 and info["truncated_tokens"] == 0
    long = inspect_.inspect_text(aligned, PROMPTS["long"])
    assert long["encoders"]["mistral3_24b"]["truncated_tokens"] > 0 and long["warnings"]
    (row,) = inspect_.compare_clips(flux2["clip"], aligned, [PROMPTS["plain"]])
    assert (row["positions_a"], row["positions_b"]) == (47, 512)
    assert row["min_token_cosine"] > 0.9999
    assert row["extra_positions_norm"] > 0
