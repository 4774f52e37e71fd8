"""A/B Compare: each column equals a direct stock KSampler call with that side's CLIP or MODEL."""
from __future__ import annotations

import importlib
import json

import pytest
import torch
from support.factories.lora import cell, kohya_lora, stock_render, write_lora

P = "AlignedTrainer_"
KW = dict(seed=7, seed_mode="fixed", steps=2, cfg=2.0, guidance=3.5, sampler_name="euler", scheduler="normal",
          width=64, height=64)


@pytest.fixture(scope="module")
def stock(comfy, sd15):
    cache = {}

    def get(model, clip, prompt):
        key = (id(model), id(clip), prompt)
        if key not in cache:
            cache[key] = stock_render(comfy.nodes, model, clip, sd15[2], prompt, "", 7)
        return cache[key]

    return get


def test_ab_clip_columns_equal_direct_sampler_calls(comfy, sd15, stock):
    model, clip, vae = sd15
    aligned = comfy.engine("te.align").align_clip(clip, "sd15")
    long = "ohwx, " + ", ".join(f"thing {i}" for i in range(40))
    grid, a, b, diffs = comfy.call(P + "ABCompare", model=model, vae=vae, clip_a=aligned, clip_b=clip,
                                   prompts=f"a cat\n{long}", negative="", label_a="aligned", label_b="unaligned", **KW)
    d = json.loads(diffs)
    for i, prompt in enumerate(["a cat", long]):
        assert torch.allclose(a[i:i + 1], stock(model, aligned, prompt), atol=1e-5)
        assert torch.allclose(b[i:i + 1], stock(model, clip, prompt), atol=1e-5)
        assert d[i]["prompt"] == prompt and d[i]["seed"] == 7
        assert d[i]["mean_abs_diff"] == pytest.approx(float((a[i] - b[i]).abs().mean()), abs=1e-7)
    assert d[0]["mean_abs_diff"] < 1e-5  # short prompt: aligned == default for SD1.5
    assert d[1]["mean_abs_diff"] > 1e-4  # long prompt: truncation vs chunking differ
    assert grid.shape[2] > 3 * 64


def test_ab_two_models_grid_and_difference_column(comfy, sd15, stock, comfy_dirs):
    model, clip, vae = sd15
    write_lora(comfy_dirs["models"] / "loras" / "ab_test.safetensors", kohya_lora(model, seed=3))
    (lora_model,) = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(model, "ab_test.safetensors", 1.0)
    cmp, render = comfy.engine("sampling.compare"), comfy.engine("sampling.render")
    s = render.SampleSettings(steps=2, cfg=2.0, width=64, height=64, seed=7)
    g, a, b, diffs, geo = cmp.ab_compare(model, lora_model, clip, clip, vae, ["a cat"], "", s, ("base", "lora"))
    loaded = [lm.model for lm in importlib.import_module("comfy.model_management").current_loaded_models]
    assert not any(m is model or m is lora_model for m in loaded)  # both released after the comparison
    assert torch.allclose(a, stock(model, clip, "a cat"), atol=1e-5)
    assert torch.allclose(b, stock(lora_model, clip, "a cat"), atol=1e-5)
    assert geo["col_labels"][:2] == ["base", "lora"] and len(geo["cell_boxes"][0]) == 3
    assert geo["col_labels"][2] == f"|base − lora| ×{cmp.DIFF_GAIN:g}" and geo["row_labels"] == ["a cat"]
    assert geo["cell_labels"][0][:2] == ["seed 7", "seed 7"] and diffs[0]["prompt"] == "a cat"
    assert geo["cell_labels"][0][2] == f"mean |Δ| {diffs[0]['mean_abs_diff']:.4f}"
    assert diffs[0]["mean_abs_diff"] > 1e-3  # the LoRA changes the image
    assert (cell(g, geo, 0, 0) - a[0]).abs().max() <= 1 / 255 + 1e-6
    assert (cell(g, geo, 0, 1) - b[0]).abs().max() <= 1 / 255 + 1e-6
    expected = ((a[0] - b[0]).abs() * cmp.DIFF_GAIN).clamp(0, 1)
    assert (cell(g, geo, 0, 2) - expected).abs().max() <= 1 / 255 + 1e-6


def _fit_one_char_at_a_time(imaging, text, width, draw, f):
    """The label fit as it was written first: drop the last character until the text and an ellipsis fit."""
    if imaging.text_width(draw, text, f) <= width:
        return text
    while text and imaging.text_width(draw, text + "…", f) > width:
        text = text[:-1]
    return text + "…"


def test_label_fit_keeps_the_longest_prefix_that_fits(comfy):
    from PIL import Image, ImageDraw

    imaging = comfy.engine("imaging")
    d, f = ImageDraw.Draw(Image.new("RGB", (8, 8))), imaging.font(12)
    texts = ["aligned", "a much longer column label than fits", "WWWWWWWWWWiiiiiiiiii" * 5, "ohwx, a photo of 漢字 🙂",
             "", "x", "…" * 30]
    for text in texts:
        for width in (0, 1, 8, 40, 97, 200, 1000):
            assert imaging.fit(text, width, d, f) == _fit_one_char_at_a_time(imaging, text, width, d, f), (text, width)


@pytest.mark.server
def test_a_very_long_label_does_not_block_the_queue(server):
    """A/B Compare with a 20,000-character label (any label input: A/B, sweeps, grids): the label is cut to its
    column in log n measurements. Before: one measurement per dropped character, minutes of work that ComfyUI's
    Cancel could not stop, with the queue blocked."""
    import time

    from support.api_nodes import node

    prompt = {"1": node(server, "CheckpointLoaderSimple", ckpt_name="tiny-sd15.safetensors"),
              "2": node(server, P + "ABCompare", model=["1", 0], vae=["1", 2], clip_a=["1", 1], clip_b=["1", 1],
                        **{**KW, "steps": 1, "seed": 11}, label_a="x" * 20_000, label_b="y" * 20_000),
              "3": node(server, "PreviewImage", images=["2", 0])}
    t0 = time.monotonic()
    entry = server.run(prompt, timeout=150)
    print(f"A/B Compare with two 20,000-character labels: {time.monotonic() - t0:.1f} s")
    assert entry["status"]["status_str"] == "success"
