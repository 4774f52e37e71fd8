"""Training captions are cached literally (whatever prompt syntax the aligned CLIP uses for inference), the saved
LoRA records its text-encoder recipe, and Load LoRA (aligned) re-applies it, warning on mismatches."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

P = "AlignedTrainer_"
CAPTION = "ohwx, 1girl, hat (object), (red:1.3) \\(cat\\), solo"


@pytest.fixture(scope="module")
def literal_set(comfy, sd15, tmp_path_factory):
    """A 2-image training set whose captions use ComfyUI prompt syntax, cached with an aligned CLIP that was
    set to ComfyUI's syntax for inference."""
    from support.factories.dataset import make_dataset

    _, clip, vae = sd15
    base = tmp_path_factory.mktemp("literal_set")
    folder = make_dataset(base / "data", n=2, sizes=((64, 64),))
    for txt in folder.glob("*.txt"):
        txt.write_text(CAPTION, encoding="utf-8")
    D, caps, bk, cache = (comfy.engine(n) for n in ("data.dataset", "data.captions", "data.buckets", "data.cache"))
    ds = D.from_folder(folder.parent, caps.CaptionConfig(), bk.BucketConfig(resolution=64, min_side=64, max_side=64,
                                                                            step=64))
    aligned = comfy.engine("te.align").align_clip(clip, "sd15", prompt_syntax="comfyui")
    lc = cache.cache_latents(ds, vae, base / "cache")
    ts, _ = cache.cache_text(lc, aligned, base / "cache", unload=False)
    return ts, aligned


def test_caption_with_syntax_reaches_the_cache_literally(comfy, literal_set):
    ts, aligned = literal_set
    caption = ts.samples[0].captions[0].text
    assert caption == CAPTION and ts.meta["prompt_syntax"] == "literal"
    lit = aligned.training_clip()
    assert lit.prompt_syntax == "literal" and aligned.prompt_syntax == "comfyui"
    tokens = lit.tokenize(caption)["l"][0]
    sub = aligned.tokenizer.clip_l
    ids = [t for t, _ in tokens if t not in (sub.start_token, sub.end_token)]
    decoded = sub.tokenizer.decode(ids)
    assert decoded.replace(" ", "") == caption.replace(" ", "").lower()  # brackets, ':1.3' and backslashes kept
    cached = ts.samples[0].captions[0].conditioning[0][0]
    assert (cached - lit.encode_from_tokens(lit.tokenize(caption)).float()).abs().max() <= 1e-5
    parsed = aligned.encode_from_tokens(aligned.tokenize(caption)).float()
    assert (cached - parsed).abs().max() > 1e-2  # ComfyUI's syntax would have cached something else


@pytest.fixture(scope="module")
def saved_lora(comfy, sd15, literal_set, comfy_dirs, tmp_path_factory):
    T = comfy.engine("train.loop")
    C, st = comfy.engine("train.config"), comfy.engine("train.state")
    ts, _ = literal_set
    run = T.init_run(sd15[0], ts, C.LoraConfig(rank=4, alpha=4, preset="attention"), C.TimestepConfig(),
                     C.OptimizerConfig(lr=1e-2), st.RunSettings(run_name="recipe"),
                     runs_root=tmp_path_factory.mktemp("runs"))
    run = T.train_steps(run, 2)
    (path,) = comfy.call(P + "SaveLora", run=run, name="recipe_lora", dtype="fp16")
    return Path(path)


def test_saved_lora_records_spec_syntax_and_base(comfy, saved_lora):
    import comfy.utils as cu

    meta = cu.load_torch_file(str(saved_lora), return_metadata=True)[1]
    assert json.loads(meta["aligned_trainer.te_spec"])["id"] == "sd15"
    assert meta["aligned_trainer.prompt_syntax"] == "literal"
    assert meta["aligned_trainer.base_model"] == "SD15"


def test_load_lora_aligned_restores_the_recorded_spec(comfy, sd15, saved_lora):
    model, clip, _ = sd15
    out = comfy.call_full(P + "LoadLoraAligned", model=model, clip=clip, lora_name=saved_lora.name,
                          strength_model=1.0, strength_clip=1.0)
    patched, aclip, info = out.args
    assert aclip.aligned_trainer_spec["id"] == "sd15" and aclip.prompt_syntax == "literal"
    assert "WARNING" not in info and out.ui["text"] == [info]
    # the LoRA is applied as the stock LoraLoader applies it
    stock_model, _ = comfy.nodes.LoraLoader().load_lora(model, clip, saved_lora.name, 1.0, 1.0)
    assert set(patched.patches) == set(stock_model.patches) and patched.patches


def test_load_lora_aligned_warns_on_mismatch(comfy, sd15, saved_lora, comfy_dirs, caplog):
    """A LoRA recorded for another base model and another text-encoder family: both are named in the node's
    text (ui) and in the log."""
    model, clip, _ = sd15
    import comfy.utils as cu

    tensors = safetensors.torch.load_file(str(saved_lora))

    meta = dict(cu.load_torch_file(str(saved_lora), return_metadata=True)[1])
    meta["aligned_trainer.base_model"] = "Flux"
    meta["aligned_trainer.te_spec"] = json.dumps({"id": "flux1-dev", "variant": "default", "hash": "x"})
    bad = comfy_dirs["models"] / "loras" / "recipe_mismatch.safetensors"
    safetensors.torch.save_file(tensors, str(bad), metadata=meta)
    with caplog.at_level("WARNING"):
        out = comfy.call_full(P + "LoadLoraAligned", model=model, clip=clip, lora_name=bad.name,
                              strength_model=1.0, strength_clip=1.0)
    info = out.args[2]
    assert "trained on a Flux model, this model is SD15" in info and "spec 'flux1-dev'" in info
    assert out.ui["text"] == [info]
    assert any("Load LoRA (aligned)" in r.getMessage() and "Flux" in r.getMessage() for r in caplog.records)


def test_with_comfyui_syntax_weights_match_stock_clip_text_encode(comfy, sd15):
    """With the option set to ComfyUI syntax, (word:1.2) weights are applied exactly as the stock
    CLIPTextEncode applies them with the unaligned CLIP (SD1.5: the spec's lengths equal ComfyUI's for a short
    prompt); literal reading differs."""
    _, clip, _ = sd15
    prompt = "a (red:1.2) circle, ((blue)) background"
    aligned, _, _ = comfy.call(P + "LoadAlignedTextEncoders", clip=clip, spec="sd15", prompt_syntax="comfyui")
    (ours,) = comfy.nodes.CLIPTextEncode().encode(aligned, prompt)
    (stock,) = comfy.nodes.CLIPTextEncode().encode(clip, prompt)
    assert torch.allclose(ours[0][0], stock[0][0], atol=1e-6)
    weights = {round(w, 6) for _, w in aligned.tokenize(prompt)["l"][0]}
    assert 1.2 in weights and round(1.1 * 1.1, 6) in weights
    literal, _, _ = comfy.call(P + "LoadAlignedTextEncoders", clip=clip, spec="sd15")
    (lit,) = comfy.nodes.CLIPTextEncode().encode(literal, prompt)
    assert (lit[0][0] - stock[0][0]).abs().max() > 1e-2


def test_inspector_and_report_show_the_syntax_and_what_it_changes(comfy, sd15):
    _, clip, _ = sd15
    text = "1girl, hat (object), embedding:foo, solo"
    lit, _, spec_json = comfy.call(P + "LoadAlignedTextEncoders", clip=clip, spec="sd15")
    com, _, _ = comfy.call(P + "LoadAlignedTextEncoders", clip=clip, spec="sd15", prompt_syntax="comfyui")
    assert json.loads(spec_json)["prompt_syntax"] == "literal"
    shown, js = comfy.call(P + "TokenInspector", clip=lit, text=text, trigger_word="")
    syn = json.loads(js)["syntax"]
    assert syn["syntax"] == "literal" and syn["changes"] == []
    assert any("'object' x1.1" in c for c in syn["comfyui_would"]) and any("foo" in c for c in syn["comfyui_would"])
    assert "prompt syntax: literal" in shown and "'object' x1.1" in shown
    shown, js = comfy.call(P + "TokenInspector", clip=com, text=text, trigger_word="")
    assert json.loads(js)["syntax"]["syntax"] == "comfyui" and "prompt syntax: comfyui; it changed: weights" in shown
    _, rows = comfy.call(P + "TextEncoderAlignmentReport", clip_a=lit, clip_b=clip, prompts=text)
    row = json.loads(rows)[0]
    assert (row["syntax_a"], row["syntax_b"]) == ("literal", "comfyui") and row["comfyui_syntax_changes"]
    assert row["min_token_cosine"] < 0.999  # the same prompt, read two ways
