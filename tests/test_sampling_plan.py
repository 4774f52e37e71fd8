"""Preview Plan: renders at the requested steps with the model it is handed, through the stock sampler path,
and releases sampling memory before it returns (measured: process RSS and peak RSS)."""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import os

import pytest
import torch
from support.factories.lora import cell, kohya_lora, stock_render, write_lora

P = "AlignedTrainer_"
KW = dict(seed=7, seed_mode="fixed", steps=2, cfg=2.0, guidance=3.5, sampler_name="euler", scheduler="normal",
          width=64, height=64)
MB = 2 ** 20


def rss() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so RSS shows what is still held
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) of this process


def peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def test_plan_renders_requested_steps_and_releases_memory(comfy, sd15, comfy_dirs):
    import comfy.model_management as mm

    model, clip, vae = sd15
    render = comfy.engine("sampling.render")
    write_lora(comfy_dirs["models"] / "loras" / "plan_test.safetensors", kohya_lora(model, seed=11))
    (lora_model,) = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(model, "plan_test.safetensors", 1.0)
    (plan,) = comfy.call(P + "PreviewPlan", clip=clip, vae=vae, prompts="ohwx", negative="", every_n=2, **KW)
    assert plan.every_n == 2 and plan.prompts == ("ohwx",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.every_n = 3
    with torch.inference_mode():
        g2 = plan.render(lora_model, 2)  # also warms up allocator and code paths
        base = rss()
        reset_peak()
        g4 = plan.render(lora_model, 4)
        peak_mb, held_mb = (peak() - base) / MB, (rss() - base) / MB
        loaded_after = any(lm.model is lora_model for lm in mm.current_loaded_models)
        # control: the same sampling without the release keeps the LoRA-patched weights loaded
        base2 = rss()
        img = render.sample(lora_model, vae, plan.positives[0], plan.negative, plan.settings, 7)
        kept_mb = (rss() - base2) / MB
        loaded_control = any(lm.model is lora_model for lm in mm.current_loaded_models)
        render.release(lora_model)
    print(f"\npreview render: peak +{peak_mb:.1f} MiB over baseline, held after render {held_mb:+.1f} MiB; "
          f"without release {kept_mb:+.1f} MiB held")
    assert g2.shape == g4.shape and g2.shape[0] == 1 and g2.shape[-1] == 3
    assert not loaded_after and loaded_control
    assert kept_mb > 8 and held_mb < kept_mb / 4 and held_mb < peak_mb / 4
    geo = comfy.engine("sampling.render").grid([[img]], ["step 4"], ["ohwx"], [["seed 7"]])[1]
    # fixed seed: the same cell at steps 2 and 4; it is the stock KSampler image of the LoRA model
    assert torch.equal(cell(g2, geo, 0, 0), cell(g4, geo, 0, 0))
    assert not torch.equal(g2, g4)  # the step label differs
    ref = stock_render(comfy.nodes, lora_model, clip, vae, "ohwx", "", 7)
    assert torch.allclose(img, ref, atol=1e-5)
    assert (cell(g4, geo, 0, 0) - ref[0]).abs().max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_train_steps_renders_plan_at_requested_steps(comfy, sd15, sd15_training_set, quantize):
    """Train Steps (the training helper's loop) calls plan.render every N steps; training is unchanged by it,
    also when the base is quantized around ComfyUI's load (the previews then sample the base as loaded and
    training resumes quantized)."""
    import comfy.model_management as mm

    model, clip, vae = sd15
    (plan,) = comfy.call(P + "PreviewPlan", clip=clip, vae=vae, prompts="ohwx", negative="", every_n=2, **KW)
    C, st, loop = comfy.engine("train.config"), comfy.engine("train.state"), comfy.engine("train.loop")
    run = loop.init_run(model, sd15_training_set, C.LoraConfig(rank=4, alpha=4), C.TimestepConfig(),
                        C.OptimizerConfig(lr=1e-2), st.RunSettings(run_name="preview", quantize=quantize))
    rendered = []

    class Spy:  # records the calls, renders with the real plan
        every_n = plan.every_n

        def check(self, m):
            plan.check(m)

        def render(self, m, step):
            img = plan.render(m, step)
            rendered.append((step, tuple(img.shape), any(lm.model is m for lm in mm.current_loaded_models)))
            return img

    with torch.inference_mode():
        with_preview, _, _ = comfy.call(P + "TrainSteps", run=run, steps=4, checkpoint_every=0, keep_last=1,
                                        val_every=0, preview_plan=Spy())
        without, _, _ = comfy.call(P + "TrainSteps", run=run, steps=4, checkpoint_every=0, keep_last=1, val_every=0)
    assert [r[0] for r in rendered] == [2, 4]
    assert all(r[1][0] == 1 and r[1][-1] == 3 for r in rendered)
    assert not any(r[2] for r in rendered)  # the preview model left memory before training resumed
    for k, v in without.state["adapters"].items():  # previews do not disturb training
        assert torch.equal(v, with_preview.state["adapters"][k]), k
    assert with_preview.history == without.history
    assert all(type(p.data) is torch.Tensor for p in model.model.diffusion_model.parameters())  # the base as loaded


@pytest.mark.server
@pytest.mark.parametrize("plan, words", [
    ({"frames": 5}, "frames = 5 needs a video model"),
    ({"vae": "tiny-flux1-ae.safetensors"}, "16-channel latents"),
])
def test_a_preview_plan_that_cannot_render_is_refused_before_the_first_step(server, comfy_dirs, plan, words):
    """A preview plan the model cannot render (frames > 1 on an image model, another family's VAE) fails Train Steps
    before any step: no checkpoint is written (before: the run trained up to the first due preview, wrote its
    checkpoints, then failed; a long run lost every step since its last checkpoint)."""
    import json

    from support.api_nodes import execution_error, node
    from support.factories import family_files
    from support.factories.dataset import make_dataset
    from support.train_prompt import prompt as train_prompt

    if not (server.input_dir / "plan_ds").exists():
        make_dataset(server.input_dir / "plan_ds", n=2, sizes=((64, 64),))
    vae_file = comfy_dirs["models"] / "vae" / "tiny-flux1-ae.safetensors"
    if not vae_file.exists():
        vae_file.symlink_to(family_files.vae_file("flux1-dev"))
    run = "plan_refused_" + "_".join(plan)
    p = train_prompt(run, steps=3, checkpoint_every=1, dataset="plan_ds")
    p["11"] = node(server, "VAELoader", vae_name=plan.get("vae", "tiny-flux1-ae.safetensors"))
    p["12"] = node(server, P + "PreviewPlan", clip=["1", 1], vae=["11", 0] if "vae" in plan else ["1", 2],
                   every_n=2, frames=plan.get("frames", 1), **{**KW, "steps": 1})
    p["9"]["inputs"]["preview_plan"] = ["12", 0]
    err = execution_error(server, p)
    assert err["node_type"] == P + "TrainSteps" and words in err["exception_message"], json.dumps(err)[:600]
    checkpoints = server.output_dir / "aligned_trainer" / "runs" / run / "checkpoints"
    assert not checkpoints.exists() or not list(checkpoints.iterdir()), sorted(checkpoints.iterdir())
