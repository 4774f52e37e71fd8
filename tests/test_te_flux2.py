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

import json

import pytest
import torch

from support.factories import te_flux2

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


def test_flux2_tokenizer_builds_with_the_pack_loaded(comfy, tmp_path):
    """With the pack loaded, ComfyUI's own Flux2Tokenizer builds from the tekken data as the loader passes it and
    tokenizes ComfyUI's own template: <s> (Mistral3Tokenizer's start token), then the same ids as transformers'
    own converter of the same tekken.json gives the templated text."""
    import comfy.text_encoders.flux as flux

    tok = flux.Flux2Tokenizer(tokenizer_data=te_flux2.tokenizer_data())
    assert tok.llama_template == COMFY_TEMPLATE.replace("{}", "{}")
    ref = te_flux2.tekken_tokenizer(tmp_path)
    for prompt in ("a red circle on a blue background", "", "héllo wörld ✨ 100%", "line one\nline two",
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
