"""Text-encoder nodes, run the way ComfyUI's executor runs them."""
from __future__ import annotations

import json

import torch

P = "AlignedTrainer_"
LONG = "ohwx, " + ", ".join(f"a very detailed thing number {i}" for i in range(30))


def test_load_aligned_detects_family_and_passes_unaligned_through(comfy, sd15):
    _, clip, _ = sd15
    aligned, unaligned, spec_json = comfy.call(P + "LoadAlignedTextEncoders", clip=clip, spec="auto")
    assert unaligned is clip
    assert aligned.aligned_trainer_spec["id"] == "sd15"
    assert json.loads(spec_json)["id"] == "sd15"
    a = aligned.encode_from_tokens(aligned.tokenize(LONG))
    u = clip.encode_from_tokens(clip.tokenize(LONG))
    assert a.shape[1] == 77 and u.shape[1] > 77


def test_load_aligned_rejects_a_spec_for_another_family(comfy, sd15):
    _, clip, _ = sd15
    aligned, _, _ = comfy.call(P + "LoadAlignedTextEncoders", clip=clip, spec="sd2x")
    # sd2x names clip_h, which an SD1.5 CLIP does not have: nothing is applied to clip_l, shapes stay ComfyUI's
    assert aligned.aligned_trainer_spec["id"] == "sd2x"


def test_token_inspector_warns_on_split_trigger_and_truncation(comfy, sd15):
    _, clip, _ = sd15
    aligned, _, _ = comfy.call(P + "LoadAlignedTextEncoders", clip=clip, spec="sd15")
    text, js = comfy.call(P + "TokenInspector", clip=aligned, text=LONG, trigger_word="zqxjvelorn")
    rep = json.loads(js)
    e = rep["encoders"]["clip_l"]
    assert len(e["trigger_pieces"]) >= 2  # a made-up word is several CLIP pieces
    assert e["truncated_tokens"] > 0
    assert any("truncated" in w for w in rep["warnings"]) and any("splits into" in w for w in rep["warnings"])
    _, js2 = comfy.call(P + "TokenInspector", clip=aligned, text="a dog", trigger_word="dog")
    assert any("ordinary word" in w for w in json.loads(js2)["warnings"])
    rare = json.loads(comfy.call(P + "TokenInspector", clip=aligned, text="a dog", trigger_word="ohwx")[1])
    assert rare["encoders"]["clip_l"]["trigger_pieces"] == ["ohwx</w>"] and rare["warnings"] == []
    _, js3 = comfy.call(P + "TokenInspector", clip=aligned, text="a dog", trigger_word="")
    assert json.loads(js3)["warnings"] == []


def test_alignment_report_compares_two_clips(comfy, sd15):
    _, clip, _ = sd15
    aligned, _, _ = comfy.call(P + "LoadAlignedTextEncoders", clip=clip, spec="sd15")
    img, js = comfy.call(P + "TextEncoderAlignmentReport", clip_a=aligned, clip_b=clip, prompts=f"a cat\n{LONG}")
    rows = json.loads(js)
    assert img.ndim == 4 and img.shape[-1] == 3 and img.shape[1] > 40
    assert rows[0]["positions_a"] == rows[0]["positions_b"] == 77 and rows[0]["seq_cosine"] > 0.9999
    assert rows[1]["positions_a"] == 77 and rows[1]["positions_b"] > 77
    assert rows[1]["truncated_a"]["clip_l"] > 0
    same = comfy.call(P + "TextEncoderAlignmentReport", clip_a=clip, clip_b=clip, prompts="x")[1]
    assert json.loads(same)[0]["seq_cosine"] > 0.99999
    assert torch.isfinite(img).all()
