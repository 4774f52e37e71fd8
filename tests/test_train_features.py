"""Training engine, second set: ai-toolkit timestep names, Cancel mid-run, LoHa/LoKr/LoCon export through
ComfyUI's loader, differential output preservation, regularization weight, seeded adapter init."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

N = 20000


def _run(T, sd15, tset, tmp_path, name="r", lora=None, tcfg=None, opt=None, resume="none", preservation=None,
         **settings):
    return T.loop.init_run(sd15[0], tset, lora or T.C.LoraConfig(rank=4, alpha=4, preset="attention"),
                           tcfg or T.C.TimestepConfig(), opt or T.C.OptimizerConfig(lr=1e-3),
                           T.st.RunSettings(run_name=name, **settings), resume=resume, runs_root=tmp_path / "runs",
                           preservation=preservation)


def _draw(T, **kw):
    return T.ts.sample_u(T.C.TimestepConfig(**kw), N, torch.Generator().manual_seed(5)).numpy()


def test_sigmoid_is_logit_normal(T):
    u = _draw(T, density="sigmoid", logit_mean=-0.3, logit_std=1.2)
    assert stats.kstest(np.log(u / (1 - u)), "norm", args=(-0.3, 1.2)).pvalue > 0.01


def test_linear_is_uniform_on_the_1000_step_grid(T):
    u = _draw(T, density="linear")
    steps = u * 1000 - 0.5
    assert np.allclose(steps, np.round(steps), atol=1e-3)  # on the grid
    assert stats.kstest(u, "uniform").pvalue > 0.01
    assert stats.chisquare(np.bincount(np.round(steps).astype(int) // 100, minlength=10)).pvalue > 0.01


def test_weighted_bell_curve(T):
    import comfy.model_sampling as ms

    class Eps(ms.ModelSamplingDiscrete, ms.EPS):
        pass

    cfg = T.C.TimestepConfig(weighting="weighted")
    grid = (torch.arange(1000) + 0.5) / 1000
    w = T.ts.loss_weights(cfg, Eps(None), torch.ones(1000), grid)
    assert abs(float(w.mean()) - 1.0) < 1e-4  # mean 1 over the grid
    assert float(w[0]) < 0.01 and float(w[-1]) < 0.01 and int(w.argmax()) in (499, 500)
    expected = torch.exp(-2 * (grid - 0.5) ** 2) - math.exp(-0.5)
    assert torch.allclose(w, expected / expected.mean(), atol=1e-5)


def test_fixed_shift_in_histogram(comfy):
    tcfg, img = comfy.call("AlignedTrainer_TimestepStrategy", density="uniform", logit_mean=0.0, logit_std=1.0,
                           mode_scale=1.29, shift="fixed", shift_value=3.0, bias="balanced", bias_strength=0.0,
                           min_timestep=0, max_timestep=1000, weighting="weighted", min_snr_gamma=5.0,
                           noise_offset=0.0, multires_iterations=0, multires_discount=0.3)
    ts = comfy.engine("train.timesteps")
    u = ts.histogram_u(tcfg).numpy()
    assert u.mean() > 0.6  # shift 3 moves the uniform's mean 0.5 up to ~0.65
    assert img.ndim == 4 and img.shape[-1] == 3


def test_cancel_stops_within_one_step_and_resumes(T, sd15, sd15_training_set, tmp_path):
    import comfy.model_management as mm

    seen = []

    def on_step(r, trainer):
        seen.append(r.step)
        if r.step == 2:
            mm.interrupt_current_processing(True)  # what ComfyUI's Cancel button does

    run = _run(T, sd15, sd15_training_set, tmp_path, "cancel")
    with pytest.raises(mm.InterruptProcessingException):
        T.loop.train_steps(run, 10, on_step=on_step)
    assert seen == [1, 2] and run.step == 0
    resumed = _run(T, sd15, sd15_training_set, tmp_path, "cancel", resume="latest")
    assert resumed.step == 2 and len(resumed.history) == 2
    done = T.loop.train_steps(resumed, 1)
    full = T.loop.train_steps(_run(T, sd15, sd15_training_set, tmp_path, "cancel_ref"), 3)
    for k, v in full.state["adapters"].items():
        assert torch.equal(v, done.state["adapters"][k]), k


@pytest.mark.parametrize("algorithm,preset", [("loha", "attention"), ("lokr", "attention"),
                                              ("locon", "all-linear+conv")])
def test_algorithms_save_with_zero_unmapped_keys(T, sd15, sd15_training_set, tmp_path, algorithm, preset):
    import comfy.lora

    run = T.loop.train_steps(_run(T, sd15, sd15_training_set, tmp_path, algorithm,
                                  lora=T.C.LoraConfig(algorithm=algorithm, rank=4, alpha=4, preset=preset),
                                  opt=T.C.OptimizerConfig(lr=1e-2)), 1)
    path, report = T.export.save_lora(run, f"tiny_{algorithm}", folder=tmp_path / "loras")
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(path))
    assert report["unmapped"] == 0 and T.export.unmapped_keys(sd15[0], sd) == []
    if algorithm == "locon":
        convs = [k for k, v in sd.items() if k.endswith("lora_down.weight") and v.ndim == 4]
        assert convs, "conv LoRA pairs use kohya's 4-D layout"
    key_map = comfy.lora.model_lora_keys_unet(sd15[0].model, {})
    patches = comfy.lora.load_lora(sd, key_map, log_missing=False)
    assert len(patches) == len({T.export._split(k)[0] for k in run.state["adapters"]})  # every module
    # the LoRA changes the weights it targets
    patched = T.export.model_with_lora(sd15[0], sd)
    key = next(iter(patched.patches))
    w0 = sd15[0].model.state_dict()[key].float()
    w1 = comfy.lora.calculate_weight(patched.patches[key], w0.clone(), key)
    assert (w1 - w0).abs().max() > 0


def test_seeded_init_is_reproducible_for_all_algorithms(T, sd15, sd15_training_set, tmp_path):
    for algorithm in ("lora", "loha", "lokr"):
        lora = T.C.LoraConfig(algorithm=algorithm, rank=4, alpha=4, preset="attention")
        a = T.loop.Trainer(_run(T, sd15, sd15_training_set, tmp_path, "i1", lora=lora, seed=7)).adapter_state()
        torch.manual_seed(999)  # the global RNG must not matter
        b = T.loop.Trainer(_run(T, sd15, sd15_training_set, tmp_path, "i2", lora=lora, seed=7)).adapter_state()
        c = T.loop.Trainer(_run(T, sd15, sd15_training_set, tmp_path, "i3", lora=lora, seed=8)).adapter_state()
        assert all(torch.equal(a[k], b[k]) for k in a), algorithm
        assert any(not torch.equal(a[k], c[k]) for k in a), algorithm


def test_dop_and_reg_weight_change_the_loss(T, sd15, sd15_training_set, tmp_path):
    """DOP adds a term that is 0 while the LoRA is zero and grows once it has learned; reg_weight scales
    the loss of regularization samples."""
    pres = sd15_training_set.samples[0].captions[0].conditioning
    with pytest.raises(T.C.ConfigError, match="preservation prompt"):
        _run(T, sd15, sd15_training_set, tmp_path, "dop_bad", dop_weight=1.0)
    lr = T.C.OptimizerConfig(lr=3e-2)
    plain = T.loop.train_steps(_run(T, sd15, sd15_training_set, tmp_path, "p", opt=lr), 2)
    dop = T.loop.train_steps(_run(T, sd15, sd15_training_set, tmp_path, "d", opt=lr, preservation=pres,
                                  dop_weight=100.0), 2)
    lp, ld = [h["loss"] for h in plain.history], [h["loss"] for h in dop.history]
    assert lp[0] == pytest.approx(ld[0], rel=1e-5)  # step 1: LoRA up = 0, so prediction == base prediction
    assert ld[1] > lp[1]  # afterwards the preservation term is positive
    reg = T.types.TrainingSet(tuple(type(s)(s.key, s.latent, s.captions, s.weight, True, s.bucket, s.repeats)
                                    for s in sd15_training_set.samples))
    r1 = T.loop.train_steps(_run(T, sd15, reg, tmp_path, "reg1"), 1)
    r0 = T.loop.train_steps(_run(T, sd15, reg, tmp_path, "reg0", reg_weight=0.5), 1)
    assert r0.history[0]["loss"] == pytest.approx(0.5 * r1.history[0]["loss"], rel=1e-5)


def test_ema_weights_are_saved_and_resumed(T, sd15, sd15_training_set, tmp_path):
    import comfy.utils

    run = T.loop.train_steps(_run(T, sd15, sd15_training_set, tmp_path, "ema", opt=T.C.OptimizerConfig(lr=1e-2),
                                  ema_decay=0.5), 3, checkpoint_every=3)
    ema, raw = run.state["ema_adapters"], run.state["adapters"]
    ups = [k for k in raw if k.endswith("lora_up.weight")]
    assert any(not torch.equal(ema[k], raw[k]) for k in ups)
    names = T.naming.module_prefixes(sd15[0], {T.export._split(k)[0] for k in ups})  # the family's file names
    kohya = lambda k: names[T.export._split(k)[0]] + ".lora_up.weight"  # noqa: E731
    p_ema, rep = T.export.save_lora(run, "tiny_ema", folder=tmp_path / "loras", dtype=torch.float32)
    p_raw, _ = T.export.save_lora(run, "tiny_raw", folder=tmp_path / "loras", dtype=torch.float32, ema=False)
    s_ema, s_raw = comfy.utils.load_torch_file(str(p_ema)), comfy.utils.load_torch_file(str(p_raw))
    assert rep["weights"] == "ema"
    assert all(torch.equal(s_ema[kohya(k)], ema[k]) and torch.equal(s_raw[kohya(k)], raw[k]) for k in ups)
    resumed = _run(T, sd15, sd15_training_set, tmp_path, "ema", resume="latest", opt=T.C.OptimizerConfig(lr=1e-2),
                   ema_decay=0.5)
    tr = T.loop.Trainer(resumed)
    assert all(torch.equal(tr.ema_adapter_state()[k], ema[k]) for k in ups)  # EMA restored from the checkpoint


def test_training_load_keeps_other_models_loaded(T, sd15, sd15_training_set, tmp_path):
    """A real memory estimate (adapter + optimizer state + activations), not 'evict everything' (1e20)."""
    import comfy.model_management as mm

    clip = sd15[1]
    mm.load_models_gpu([clip.patcher])
    tr = T.loop.Trainer(_run(T, sd15, sd15_training_set, tmp_path, "mem"))
    with torch.inference_mode(False):
        tr.load()
    adapter_bytes = sum(p.numel() * 4 for p in tr.params)
    assert 4 * adapter_bytes < tr.memory_estimate < 2 * 1024 ** 3
    assert any(m is clip.patcher for m in mm.loaded_models())  # the text encoder stayed loaded
    assert any(m is tr.patcher for m in mm.loaded_models())


def test_mixed_precision_bf16_fp16(T, sd15, sd15_training_set, tmp_path):
    """bf16 and fp16 autocast train with fp32 adapters; fp16 scales the loss (GradScaler) and its scale is
    checkpointed, so an fp16 run interrupted and resumed equals an uninterrupted one."""
    opt = T.C.OptimizerConfig(lr=1e-2)
    ref = T.loop.train_steps(_run(T, sd15, sd15_training_set, tmp_path, "fp32", opt=opt), 1)
    for precision in ("bf16", "fp16"):  # fp16 runs 3 steps with a checkpoint at 2 for the resume check below
        run = T.loop.train_steps(_run(T, sd15, sd15_training_set, tmp_path, precision, opt=opt, precision=precision),
                                 3 if precision == "fp16" else 1, checkpoint_every=2)
        losses = [h["loss"] for h in run.history]
        assert all(math.isfinite(v) for v in losses), (precision, losses)
        assert losses[0] == pytest.approx(ref.history[0]["loss"], rel=0.05), precision  # same step, lower precision
        assert losses[0] != ref.history[0]["loss"]  # autocast really ran in lower precision
        ups = [v for k, v in run.state["adapters"].items() if k.endswith("lora_up.weight")]
        assert all(v.dtype == torch.float32 for v in ups) and any(v.abs().sum() > 0 for v in ups), precision
        assert (run.state["scaler"] is not None) == (precision == "fp16")
    resumed = _run(T, sd15, sd15_training_set, tmp_path, "fp16", opt=opt, precision="fp16", resume="latest")
    assert resumed.step == 2 and resumed.state["scaler"]["scale"] > 0
    fresh = T.loop.train_steps(_run(T, sd15, sd15_training_set, tmp_path, "fp16_ref", opt=opt, precision="fp16"), 3)
    done = T.loop.train_steps(resumed, 1)
    for k, v in fresh.state["adapters"].items():
        assert torch.equal(v, done.state["adapters"][k]), k


@pytest.mark.parametrize("algorithm,preset", [("lora", "attention"), ("locon", "all-linear+conv")])
def test_dora_trains_and_loads_as_trained(T, sd15, sd15_training_set, tmp_path, algorithm, preset):
    """DoRA trains a magnitude per input column; the saved file's dora_scale makes ComfyUI's stock LoRA loader
    produce exactly the weights training used (fp32), and DoRA is refused where it does not apply."""
    import comfy.lora
    import comfy.utils

    with pytest.raises(T.C.ConfigError, match="DoRA"):
        T.C.LoraConfig(algorithm="loha", dora=True).validate()
    lora = T.C.LoraConfig(algorithm=algorithm, rank=4, alpha=4, preset=preset, dora=True)
    run = T.loop.train_steps(_run(T, sd15, sd15_training_set, tmp_path, "dora_" + algorithm, lora=lora,
                                  opt=T.C.OptimizerConfig(lr=3e-2)), 2)
    scales = {k: v for k, v in run.state["adapters"].items() if k.endswith("dora_scale")}
    assert scales and len(scales) == len({T.export._split(k)[0] for k in run.state["adapters"]})
    path, report = T.export.save_lora(run, "tiny_dora_" + algorithm, folder=tmp_path / "loras", dtype=torch.float32)
    sd = comfy.utils.load_torch_file(str(path))
    assert report["unmapped"] == 0 and T.export.unmapped_keys(sd15[0], sd) == []
    patched = T.export.model_with_lora(sd15[0], sd)  # ComfyUI's stock LoRA loading path
    tr = T.loop.Trainer(run)  # adapters restored from the run's state
    for a in tr.adapters.values():
        a.eval()
    base = sd15[0].model.state_dict()
    checked = moved = 0
    for name, adapter in tr.adapters.items():
        key = f"diffusion_model.{name}.weight"
        w0 = base[key].float()
        with torch.no_grad():
            ours = adapter(w0.clone())
        theirs = comfy.lora.calculate_weight(patched.patches[key], w0.clone(), key)
        assert (ours - theirs).abs().max() <= 1e-5 * max(1.0, float(w0.abs().max())), name
        checked += 1
        moved += int(not torch.allclose(ours, w0, atol=1e-7))
    assert checked == len(scales) and moved > 0
