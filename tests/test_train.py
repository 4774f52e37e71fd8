"""Training engine: finite loss, overfit, resume equality, crash-safe checkpoints, invalid settings, save."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

P = "AlignedTrainer_"


def _run(T, sd15, ts, tmp_path, name="r", lora=None, tcfg=None, opt=None, resume="none", **settings):
    model = sd15[0]
    return T.loop.init_run(model, ts, lora or T.C.LoraConfig(rank=8, alpha=8, preset="attention+mlp"),
                           tcfg or T.C.TimestepConfig(), opt or T.C.OptimizerConfig(lr=1e-3),
                           T.st.RunSettings(run_name=name, **settings), resume=resume, runs_root=tmp_path / "runs")


def test_overfit_validation_loss_falls(T, sd15, sd15_training_set, tmp_path):
    """4 images, fixed validation noise and timesteps: the validation loss must fall clearly in 30 steps (it is at
    0.43 of its start after 30 steps and 0.42 after 50, the length this test used before)."""
    run = _run(T, sd15, sd15_training_set, tmp_path, lora=T.C.LoraConfig(rank=16, alpha=16, preset="all-linear+conv"),
               opt=T.C.OptimizerConfig(lr=1e-2, grad_clip=1.0), batch_size=2)
    v0 = T.loop.validation_loss(run)
    out = T.loop.train_steps(run, 30, val_every=30)
    losses = [h["loss"] for h in out.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    v1 = out.history[-1]["val_loss"]
    print(f"validation loss {v0:.4f} -> {v1:.4f} ({(1 - v1 / v0) * 100:.1f}% lower) after 30 steps")
    assert v1 < 0.6 * v0
    assert run.step == 0 and run.state is None and len(run.history) == 0  # input run untouched


def test_resume_equals_uninterrupted(T, sd15, sd15_training_set, tmp_path):
    kw = dict(lora=T.C.LoraConfig(rank=4, alpha=4, preset="attention", rank_dropout=0.1, module_dropout=0.1),
              opt=T.C.OptimizerConfig(lr=1e-3, scheduler="cosine", warmup_steps=3, total_steps=20),
              tcfg=T.C.TimestepConfig(density="logit_normal", noise_offset=0.05), ema_decay=0.9)
    full = T.loop.train_steps(_run(T, sd15, sd15_training_set, tmp_path, "full", **kw), 20)
    half = T.loop.train_steps(_run(T, sd15, sd15_training_set, tmp_path, "half", **kw), 10, checkpoint_every=10)
    assert half.checkpoints and Path(half.checkpoints[-1]).exists()
    resumed = _run(T, sd15, sd15_training_set, tmp_path, "half", resume="latest", **kw)
    assert resumed.step == 10
    done = T.loop.train_steps(resumed, 10)
    for k, v in full.state["adapters"].items():
        assert torch.equal(v, done.state["adapters"][k]), k
        assert torch.equal(full.state["ema_adapters"][k], done.state["ema_adapters"][k]), k
    assert [h["loss"] for h in full.history] == [h["loss"] for h in done.history]


CHILD = """
import importlib.util, os, sys
sys.path.insert(0, {comfy_root!r})
spec = importlib.util.spec_from_file_location("atpack", {init!r}, submodule_search_locations=[{repo!r}])
pkg = importlib.util.module_from_spec(spec); sys.modules["atpack"] = pkg; spec.loader.exec_module(pkg)
import torch, safetensors.torch
from atpack.aligned_trainer.train import state as st, config as C
def dying(tensors, path, metadata=None):
    with open(path, "wb") as f:
        f.write(b"half a checkpoint")
    os._exit(9)  # killed in the middle of the write
st.save_file = dying
run = st.TrainRun(model=None, training_set=None, lora=C.LoraConfig(), timesteps=C.TimestepConfig(),
                  optimizer=C.OptimizerConfig(), settings=st.RunSettings(), run_dir={run_dir!r}, step=4,
                  state={{"adapters": {{"a": torch.ones(3)}}}})
st.save_checkpoint(run, keep_last=1)
"""


def test_process_killed_during_checkpoint_write_keeps_previous(comfy, T, sd15, sd15_training_set, tmp_path):
    from support.paths import REPO

    run = T.loop.train_steps(_run(T, sd15, sd15_training_set, tmp_path, "crash"), 2, checkpoint_every=2)
    first = Path(run.checkpoints[-1])
    code = CHILD.format(comfy_root=str(comfy.root), init=str(REPO / "__init__.py"), repo=str(REPO), run_dir=run.run_dir)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr[-2000:]
    assert first.exists()
    assert not (first.parent / "step_0000004.safetensors").exists()
    ck = T.st.load_checkpoint(T.st.latest_checkpoint(run.run_dir))
    assert ck["step"] == 2 and torch.equal(ck["state"]["adapters"][next(iter(run.state["adapters"]))],
                                           next(iter(run.state["adapters"].values())))
    resumed = _run(T, sd15, sd15_training_set, tmp_path, "crash", resume="latest")
    assert resumed.step == 2


@pytest.mark.parametrize("kw,match", [
    (dict(lora=dict(rank=0, alpha=None)), "rank must be >= 1"),
    (dict(lora=dict(rank=0, alpha=8.0)), "alpha 8.0 was given without a rank"),
    (dict(opt=dict(lr=-1e-4)), "learning rate must be > 0"),
    (dict(lora=dict(algorithm="locon", preset="attention")), "LoCon trains convolutions"),
    (dict(lora=dict(algorithm="loha", network_dropout=0.1)), "network_dropout acts on activations"),
    (dict(lora=dict(dora=True, network_dropout=0.1)), "network_dropout acts on activations"),
    (dict(tcfg=dict(min_timestep=500, max_timestep=100)), "min_timestep"),
    (dict(settings=dict(run_name="../evil")), "plain name"),
])
def test_invalid_settings_fail_before_training(T, sd15, sd15_training_set, tmp_path, kw, match):
    lora = T.C.LoraConfig(**{"rank": 4, "alpha": 4.0, **kw.get("lora", {})})
    opt = T.C.OptimizerConfig(**kw.get("opt", {}))
    tcfg = T.C.TimestepConfig(**kw.get("tcfg", {}))
    settings = T.st.RunSettings(**{"run_name": "ok", **kw.get("settings", {})})
    with pytest.raises(T.C.ConfigError, match=match):
        T.loop.init_run(sd15[0], sd15_training_set, lora, tcfg, opt, settings, runs_root=tmp_path)


def test_dit_preset_mismatch_is_reported(T, sd15, sd15_training_set, tmp_path):
    with pytest.raises(T.C.ConfigError, match="no layer of this model matches"):
        T.loop.init_run(sd15[0], sd15_training_set, T.C.LoraConfig(rank=4, alpha=4, preset="attention",
                                                                   include="", exclude=".*"),
                        T.C.TimestepConfig(), T.C.OptimizerConfig(), T.st.RunSettings(), runs_root=tmp_path)


def test_saved_lora_loads_in_stock_comfyui_and_changes_output(comfy, T, sd15, sd15_training_set, tmp_path,
                                                              comfy_dirs):
    import comfy.model_management as mm
    import comfy.utils as cu

    run = T.loop.train_steps(_run(T, sd15, sd15_training_set, tmp_path, "save",
                                  opt=T.C.OptimizerConfig(lr=1e-2)), 5)
    (path,) = comfy.call(P + "SaveLora", run=run, name="tiny_test_lora", dtype="fp16")
    path = Path(path)
    assert path.parent == comfy_dirs["models"] / "loras" and path.exists()
    sd = cu.load_torch_file(str(path))
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in sd)
    assert T.export.unmapped_keys(sd15[0], sd) == []
    meta = cu.load_torch_file(str(path), return_metadata=True)[1]
    assert meta["ss_network_dim"] == "8" and json.loads(meta["aligned_trainer.config"])["lora"]["rank"] == 8
    # the stock LoraLoaderModelOnly node applies it and the model output changes
    (patched,) = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(sd15[0], path.name, 1.0)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = sd15_training_set.samples[0].captions[0].conditioning[0][0]
    sigma = torch.tensor([5.0])

    def out(m):
        mm.load_models_gpu([m])
        with torch.no_grad():
            return m.model.apply_model(x, sigma, c_crossattn=ctx)

    base, tuned = out(sd15[0]), out(patched)
    assert (base - tuned).abs().max() > 1e-4
    with pytest.raises(T.export.ExportError, match="not allowed"):
        comfy.call(P + "SaveLora", run=run, name="../escape", dtype="fp16")


def test_training_nodes_chain(comfy, sd15, sd15_training_set):
    (lcfg,) = comfy.call(P + "LoraConfig", algorithm="lora", rank=4, alpha=4.0, targets="attention", include="",
                         exclude="", rank_dropout=0.0, module_dropout=0.0, network_dropout=0.0, init="default",
                         max_norm=0.0)
    tcfg, hist = comfy.call(P + "TimestepStrategy", density="logit_normal", logit_mean=0.0, logit_std=1.0,
                            mode_scale=1.29, shift="model", shift_value=3.0, bias="balanced", bias_strength=0.0,
                            min_timestep=0, max_timestep=1000, weighting="min_snr", min_snr_gamma=5.0,
                            noise_offset=0.0, multires_iterations=2, multires_discount=0.3)
    assert hist.shape[-1] == 3
    (ocfg,) = comfy.call(P + "Optimizer", optimizer="prodigy", learning_rate=1.0, weight_decay=0.0, beta1=0.9,
                         beta2=0.999, scheduler="constant", warmup_steps=0, total_steps=10, num_cycles=1, power=1.0,
                         grad_clip=1.0, d_coef=1.0, decouple=True, use_bias_correction=False, safeguard_warmup=False)
    (run,) = comfy.call(P + "TrainInit", model=sd15[0], training_set=sd15_training_set, lora_config=lcfg,
                        timesteps=tcfg, optimizer=ocfg, seed=1, batch_size=1, grad_accum=2, precision="fp32",
                        gradient_checkpointing=True, ema_decay=0.0, guidance=1.0, val_count=1, run_name="chain",
                        resume="none")
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        new, model, plot = comfy.call(P + "TrainSteps", run=run, steps=3, checkpoint_every=0, keep_last=2,
                                      val_every=3)
    assert new.step == 3 and run.step == 0
    assert len(new.history) == 3 and "val_loss" in new.history[-1]
    assert new.checkpoints and Path(new.checkpoints[-1]).exists()
    assert model is not sd15[0] and plot.shape[-1] == 3
    with pytest.raises(Exception, match="learning rate must be > 0"):
        comfy.call(P + "Optimizer", optimizer="adamw", learning_rate=-1.0, weight_decay=0.0, beta1=0.9, beta2=0.999,
                   scheduler="constant", warmup_steps=0, total_steps=10, num_cycles=1, power=1.0, grad_clip=1.0,
                   d_coef=1.0, decouple=True, use_bias_correction=False, safeguard_warmup=False)


def test_base_weights_get_no_gradient(T, sd15, sd15_training_set, tmp_path):
    """Only the adapters train: the model's own weights get no gradient, even when loaded outside inference mode
    with requires_grad on (as ComfyUI's loaders leave them there)."""
    params = list(sd15[0].model.diffusion_model.parameters())
    was = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        T.loop.train_steps(_run(T, sd15, sd15_training_set, tmp_path, "frozen"), 2)
        assert all(p.grad is None for p in params)
        assert not any(p.requires_grad for p in params)
    finally:
        for p, w in zip(params, was):
            p.grad = None
            p.requires_grad_(w)


def test_validation_batches_a_samples_timesteps_when_they_fit(T, sd15, sd15_training_set, tmp_path, monkeypatch):
    """Validation runs each sample's fixed timesteps in one forward when free memory allows (the rule ComfyUI's
    sampler batches conds by), with the same loss as one forward per timestep."""
    run = _run(T, sd15, sd15_training_set, tmp_path)
    calls = []
    predict_loss = T.loop.Trainer.predict_loss

    def counted(self, x0, *a, **kw):
        calls.append(x0.shape[0])
        return predict_loss(self, x0, *a, **kw)

    monkeypatch.setattr(T.loop.Trainer, "predict_loss", counted)
    batched = T.loop.validation_loss(run)
    k, n = run.settings.val_timesteps, len(sd15_training_set.samples)
    assert calls == [k] * n, calls  # CPU: plenty of free memory
    calls.clear()
    monkeypatch.setattr(T.loop.Trainer, "_timesteps_per_forward", lambda self, shape, k, sample=None: 1)  # no room for two
    single = T.loop.validation_loss(run)
    assert calls == [1] * (k * n), calls
    assert batched == pytest.approx(single, rel=1e-6) and batched > 0
