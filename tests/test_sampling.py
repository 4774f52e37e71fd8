"""Previews, preview plans, A/B and checkpoint grids through ComfyUI's own sampler path (tiny SD1.5)."""
from __future__ import annotations

import json

import pytest
import torch

P = "AlignedTrainer_"
KW = dict(seed=7, seed_mode="fixed", steps=2, cfg=2.0, guidance=3.5, sampler_name="euler", scheduler="normal",
          width=64, height=64)


def ksampler(comfy, model, clip, vae, prompt, negative, seed):
    """The stock nodes: CLIPTextEncode -> EmptyLatentImage -> KSampler -> VAEDecode."""
    n = comfy.nodes
    (pos,) = n.CLIPTextEncode().encode(clip, prompt)
    (neg,) = n.CLIPTextEncode().encode(clip, negative)
    (lat,) = n.EmptyLatentImage().generate(64, 64, 1)
    (out,) = n.common_ksampler(model, seed, 2, 2.0, "euler", "normal", pos, neg, lat)
    (img,) = n.VAEDecode().decode(vae, out)
    return img


def cell(grid, geo, i, j):
    x0, y0, x1, y1 = geo["cell_boxes"][i][j]
    return grid[0, y0:y1, x0:x1]


def test_preview_matches_stock_ksampler_and_is_deterministic(comfy, sd15):
    model, clip, vae = sd15
    plans = comfy.engine("sampling.plans")
    render = comfy.engine("sampling.render")
    s = render.SampleSettings(**{"steps": 2, "cfg": 2.0, "sampler": "euler", "scheduler": "normal", "width": 64,
                                 "height": 64, "seed": 7})
    g1, cells1, geo = plans.preview_grid(model, clip, vae, ["a red circle", "a blue square"], "", s, step=3)
    g2, cells2, _ = plans.preview_grid(model, clip, vae, ["a red circle", "a blue square"], "", s, step=3)
    assert torch.equal(g1, g2)
    for j, prompt in enumerate(["a red circle", "a blue square"]):
        ref = ksampler(comfy, model, clip, vae, prompt, "", 7)
        assert torch.allclose(cells1[j:j + 1], ref, atol=1e-5)
        assert torch.allclose(cell(g1, geo, 0, j), cells1[j], atol=1 / 255 + 1e-6)  # grid cell = the image


def test_walk_seed_changes_per_step(comfy, sd15):
    model, clip, vae = sd15
    render = comfy.engine("sampling.render")
    plans = comfy.engine("sampling.plans")
    s = render.SampleSettings(steps=2, cfg=2.0, width=64, height=64, seed=10, seed_mode="walk")
    assert [s.seed_for(k) for k in (0, 5, 6)] == [10, 15, 16]
    _, a, _ = plans.preview_grid(model, clip, vae, ["x"], "", s, step=5)
    _, b, _ = plans.preview_grid(model, clip, vae, ["x"], "", s, step=6)
    assert not torch.equal(a, b)
    assert torch.allclose(a, ksampler(comfy, model, clip, vae, "x", "", 15), atol=1e-5)  # seed 10 + step 5
    fixed = render.SampleSettings(steps=2, cfg=1.0, width=64, height=64, seed=10)
    _, c, _ = plans.preview_grid(model, clip, vae, ["x"], "", fixed, step=5)
    _, d, _ = plans.preview_grid(model, clip, vae, ["x"], "", fixed, step=6)
    assert torch.equal(c, d)


def test_ab_columns_equal_direct_sampler_calls(comfy, sd15):
    model, clip, vae = sd15
    aligned = comfy.engine("te.align").align_clip(clip, "sd15")
    long = "ohwx, " + ", ".join(f"thing {i}" for i in range(40))
    grid, a, b, diffs = comfy.call(P + "ABCompare", model=model, vae=vae, clip_a=aligned, clip_b=clip,
                                   prompts=f"a cat\n{long}", negative="", label_a="aligned", label_b="unaligned", **KW)
    d = json.loads(diffs)
    for i, prompt in enumerate(["a cat", long]):
        assert torch.allclose(a[i:i + 1], ksampler(comfy, model, aligned, vae, prompt, "", 7), atol=1e-5)
        assert torch.allclose(b[i:i + 1], ksampler(comfy, model, clip, vae, prompt, "", 7), atol=1e-5)
    assert d[0]["mean_abs_diff"] < 1e-5  # short prompt: aligned == default for SD1.5
    assert d[1]["mean_abs_diff"] > 1e-4  # long prompt: truncation vs chunking differ
    assert grid.shape[2] > 2 * 64


def test_preview_plan_renders_during_training_and_releases_memory(comfy, sd15, sd15_training_set):
    import comfy.model_management as mm

    model, clip, vae = sd15
    (plan,) = comfy.call(P + "PreviewPlan", clip=clip, vae=vae, prompts="ohwx", negative="", every_n=2, **KW)
    C = comfy.engine("train.config")
    st = comfy.engine("train.state")
    loop = comfy.engine("train.loop")
    run = loop.init_run(model, sd15_training_set, C.LoraConfig(rank=4, alpha=4), C.TimestepConfig(),
                        C.OptimizerConfig(lr=1e-2), st.RunSettings(run_name="preview"))
    rendered = []

    orig = plan.render

    class Spy:
        every_n = plan.every_n

        def render(self, m, step):
            img = orig(m, step)
            rendered.append((step, img.shape, any(lm.model is m for lm in mm.current_loaded_models)))
            return img

    with torch.inference_mode():
        with_preview, _, _ = comfy.call(P + "TrainSteps", run=run, steps=5, checkpoint_every=0, keep_last=1,
                                        val_every=0, preview_plan=Spy())
        without, _, _ = comfy.call(P + "TrainSteps", run=run, steps=5, checkpoint_every=0, keep_last=1, val_every=0)
    assert [r[0] for r in rendered] == [2, 4]
    # previews do not disturb training: the training model is reloaded with its adapters afterwards
    for k, v in without.state["adapters"].items():
        assert torch.equal(v, with_preview.state["adapters"][k]), k
    assert with_preview.history == without.history
    assert all(r[1][-1] == 3 for r in rendered)
    assert not any(r[2] for r in rendered)  # the preview model left memory before training resumed


def test_checkpoint_grid_and_loss_graph(comfy, sd15, sd15_training_set, tmp_path):
    model, clip, vae = sd15
    C = comfy.engine("train.config")
    st = comfy.engine("train.state")
    loop = comfy.engine("train.loop")
    run = loop.init_run(model, sd15_training_set, C.LoraConfig(rank=4, alpha=4), C.TimestepConfig(),
                        C.OptimizerConfig(lr=5e-2), st.RunSettings(run_name="grid"), runs_root=tmp_path)
    out = loop.train_steps(run, 4, checkpoint_every=2, keep_last=5, val_every=2)
    folder = tmp_path / "grid" / "checkpoints"
    grid, rows = comfy.call(P + "CheckpointGrid", model=model, clip=clip, vae=vae, folder=str(folder),
                            prompts="ohwx\na cat", negative="", strength=1.0, **KW)
    labels = json.loads(rows)
    assert [lab.split(" (")[0] for lab in labels] == ["step 2", "step 4"]
    assert grid.shape[1] > 2 * 64 and grid.shape[2] > 2 * 64
    plot_img, summary = comfy.call(P + "LossGraph", run=out, smoothing=0.5)
    s = json.loads(summary)
    assert s["steps"] == 4 and len(s["val"]) == 2 and s["best_val_step"] in (2, 4)
    img2, _ = comfy.call(P + "LossGraph", history_json=json.dumps(list(out.history)), smoothing=0.5)
    assert torch.equal(plot_img, img2)
    with pytest.raises(ValueError, match="loss history JSON"):
        comfy.call(P + "LossGraph", history_json='{"x": 1}', smoothing=0.5)


def test_local_minima_marked(comfy):
    plot = comfy.engine("plot")
    hist = [{"step": i, "loss": v} for i, v in enumerate([5, 4, 3, 2, 3, 4, 5, 4, 1, 2, 3, 4, 5, 6, 7])]
    info = plot.summarize(hist, smoothing=0.0, window=2)
    assert info["smoothed_minima_steps"] == [3, 8]
