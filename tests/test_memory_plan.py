"""Train Init's memory plan: the estimate (weights as loaded, adapters and optimizer, probed activations) is
within 15 % of the peak measured on the CPU while training the tiny FLUX.1 and SDXL at a size larger than the
probe's (so the extrapolation is tested), and a plan above the budget is refused naming settings that fit."""
from __future__ import annotations

import pytest
import torch

from support.factories import families


def _tset(comfy, family_bundle, name, side):
    types = comfy.engine("data.types")
    _, clip, _ = family_bundle(name)
    (cond,) = comfy.nodes.CLIPTextEncode().encode(clip, "ohwx, a red circle")
    ch = 16 if name.startswith("flux") else 4
    lat = torch.randn(ch, side, side, generator=torch.Generator().manual_seed(0))
    return types.TrainingSet((types.Sample("a", lat, (types.CaptionVariant("ohwx", cond),),
                                           bucket=(side * 8, side * 8)),))


def measured_peak(memory, tr) -> int:
    """The diffusion model's weights and buffers plus the live bytes of one real training step (the first: the
    optimizer's state appears in it); releases the trainer."""
    dm = tr.patcher.model.diffusion_model
    try:
        meter = memory.LiveBytes()
        with meter:
            tr.step()
    finally:
        tr.release()
    return sum(t.numel() * t.element_size() for t in [*dm.parameters(), *dm.buffers()]) + meter.peak


@pytest.mark.parametrize("name,side,gc", [("flux1-dev", 32, False), ("flux1-dev", 48, False), ("flux1-dev", 32, True),
                                        ("sdxl", 24, True)])
def test_estimate_within_15_percent_of_measured_peak(comfy, family_bundle, name, side, gc, tmp_path):
    C = comfy.engine("train.config")
    st = comfy.engine("train.state")
    loop = comfy.engine("train.loop")
    memory = comfy.engine("train.memory")
    model = families.build_model(name)
    run = loop.init_run(model, _tset(comfy, family_bundle, name, side), C.LoraConfig(rank=4, alpha=4, preset="attention"),
                        C.TimestepConfig(), C.OptimizerConfig(lr=1e-3),
                        st.RunSettings(run_name="m", gradient_checkpointing=gc, memory_budget_gb=64), runs_root=tmp_path)
    assert "activations" in run.meta["memory_plan"] and "not probed" not in run.meta["memory_plan"]
    with torch.inference_mode(False):
        tr = loop.Trainer(run)
        tr.load()
        dm = tr.patcher.model.diffusion_model
        plan, acts = memory.plan(tr)
        assert acts.probed and max(s[-1] * s[-2] for s in memory._probe_shapes((1, side, side))) < side * side
        with loop.checkpointed_blocks(dm, gc, lambda: tr.clone_saved):
            measured = measured_peak(memory, tr)
    assert plan.weights == sum(t.numel() * t.element_size() for t in [*dm.parameters(), *dm.buffers()])
    assert abs(plan.total - measured) / measured < 0.15, (plan.text(), measured)


def test_refused_plan_lists_settings_that_fit(comfy, family_bundle, tmp_path):
    """Through the Train Init node: a budget between the checkpointed and the plain plan is refused with the
    sizes and a list of settings that fit (checkpointing among them); with room, the plan is the node's text."""
    C = comfy.engine("train.config")
    memory = comfy.engine("train.memory")
    model = families.build_model("flux1-dev")
    tset = _tset(comfy, family_bundle, "flux1-dev", 32)
    common = dict(model=model, training_set=tset, lora_config=C.LoraConfig(rank=4, alpha=4, preset="attention"),
                  timesteps=C.TimestepConfig(), optimizer=C.OptimizerConfig(lr=1e-3), seed=0, batch_size=1,
                  grad_accum=1, precision="fp32", ema_decay=0.0, guidance=1.0, val_count=0, resume="none")
    import folder_paths

    runs = tmp_path / "runs"
    orig = folder_paths.get_output_directory
    folder_paths.get_output_directory = lambda: str(tmp_path)
    try:
        with torch.inference_mode():
            out = comfy.call_full("AlignedTrainer_TrainInit", **common, gradient_checkpointing=False,
                                  run_name="roomy", memory_budget_gb=64)
            (text,) = out.ui["text"]  # shown under the node
            assert text.startswith("memory plan on cpu") and "fits" in text and len(out.args) == 1
            plain = out.args[0].meta["memory_plan"]
            assert plain == text
            gc = comfy.call("AlignedTrainer_TrainInit", **common, gradient_checkpointing=True, run_name="gc",
                            memory_budget_gb=64)[0].meta["memory_plan"]
            peak = lambda t: float(t.split("peak ")[1].split(" GiB")[0])  # noqa: E731
            assert peak(gc) < peak(plain)
            budget = (peak(gc) + peak(plain)) / 2
            with pytest.raises(C.ConfigError) as e:
                comfy.call("AlignedTrainer_TrainInit", **common, gradient_checkpointing=False, run_name="tight",
                           memory_budget_gb=budget)
    finally:
        folder_paths.get_output_directory = orig
    msg = str(e.value)
    assert isinstance(e.value, memory.MemoryError_)
    assert f"{budget:.3f} GiB is available" in msg and "Settings that would fit:" in msg
    assert "gradient_checkpointing on" in msg.split("Settings that would fit:")[1]
    assert not (runs / "tight").exists()


def test_probe_shapes_keep_a_video_latents_frames(comfy):
    """The probe cuts a latent's area, not its frame axis: video and Qwen-Image latents are (C, T, H, W), and a
    probe that dropped T crashed their models at Train Init."""
    memory = comfy.engine("train.memory")
    for shape in ((16, 128, 128), (16, 5, 60, 104), (16, 1, 128, 128)):
        probes = memory._probe_shapes(shape)
        assert [p[:-2] for p in probes] == [shape[:-2]] * 3
        assert all(p[-2] * p[-1] <= max(memory.PROBE_AREA, shape[-2] * shape[-1]) for p in probes)
        assert probes[0][-1] > probes[1][-1] > probes[2][-1]  # three areas, for the quadratic fit


def test_edit_references_counted_in_the_estimate(comfy, family_bundle, tmp_path):
    """Image-edit training gives each sample's control latents to the transformer as reference latents (FLUX
    Kontext: their image tokens join the sequence). With two controls the step holds about three targets' worth of
    image tokens: the probed plan stays within 15 % of the measured peak, and ComfyUI's inference estimate (used
    for large models on a CPU and by the loader) counts the references as ComfyUI's sampler does."""
    import dataclasses

    C = comfy.engine("train.config")
    st = comfy.engine("train.state")
    loop = comfy.engine("train.loop")
    memory = comfy.engine("train.memory")
    types = comfy.engine("data.types")
    side = 32
    plain = _tset(comfy, family_bundle, "flux1-dev", side)
    g = torch.Generator().manual_seed(1)
    sample = dataclasses.replace(plain.samples[0], control_latents=tuple(torch.randn(16, side, side, generator=g)
                                                                         for _ in range(2)))
    model = families.build_model("flux1-dev")
    run = loop.init_run(model, types.TrainingSet((sample,)), C.LoraConfig(rank=4, alpha=4, preset="attention"),
                        C.TimestepConfig(), C.OptimizerConfig(lr=1e-3),
                        st.RunSettings(run_name="refs", memory_budget_gb=64), runs_root=tmp_path)
    with torch.inference_mode(False):
        tr = loop.Trainer(run)
        tr.load()
        plan, acts = memory.plan(tr)
        assert acts.probed
        # ComfyUI's estimate: each reference adds as many image tokens as the target has
        shape = [1, 16, side, side]
        assert memory.inference_bytes(tr.patcher, shape, sample) == pytest.approx(
            3 * memory.inference_bytes(tr.patcher, shape, plain.samples[0]))
        # not probed (large models on a CPU): x3 without checkpointing, per pixel of the target (a wide one here)
        wide = (16, side, side // 2)
        est = memory.comfy_estimate(tr, wide)
        assert not est.probed and est.per_pixel == pytest.approx(
            memory.inference_bytes(tr.patcher, [1, *wide], sample) * 3 / (side * side // 2))
        assert memory.inference_bytes(tr.patcher, [1, *wide], sample) == pytest.approx(
            5 * memory.inference_bytes(tr.patcher, [1, *wide]))  # 2 references of 32x32 = 4 targets of 32x16
        measured = measured_peak(memory, tr)
    assert abs(plan.total - measured) / measured < 0.15, (plan.text(), measured)
