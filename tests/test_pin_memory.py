"""Train Init's memory plan (train/memory.py) pinned on the tiny SD1.5 (issue #26), each part against an
independent count: the weights are the bytes of the UNet's parameters and buffers as loaded; adapters/optimizer
are the trained parameters x 4 bytes x (the parameter + AdamW's two moments); the budget is memory_budget_gb GiB
(or the environment variable's); the probed activations are within 15 % of the live bytes of one training
backward at the training latent measured here (memory.LiveBytes) and double with the batch; a budget below the
plan is refused at Train Init naming both sizes and only settings whose peak is within the budget."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

GiB = 1024 ** 3


def _run(T, sd15, tset, tmp_path, name, **settings):
    return T.loop.init_run(sd15[0], tset, T.C.LoraConfig(rank=4, alpha=4, preset="attention"), T.C.TimestepConfig(),
                           T.C.OptimizerConfig(lr=1e-3), T.st.RunSettings(run_name=name, seed=1, **settings),
                           runs_root=tmp_path / "runs")


def test_plan_parts_against_independent_counts_and_refusal(T, comfy, sd15, sd15_training_set, tmp_path, monkeypatch):
    memory = comfy.engine("train.memory")
    run = _run(T, sd15, sd15_training_set, tmp_path, "plan", memory_budget_gb=3.0)
    assert "not probed" not in run.meta["memory_plan"] and "(fits)" in run.meta["memory_plan"]
    dm = sd15[0].model.diffusion_model
    with torch.inference_mode(False), torch.enable_grad():
        tr = T.loop.Trainer(run)
        tr.load()
        try:
            plan, acts = memory.plan(tr)
            for a in tr.adapters.values():
                a.train()
            meter = memory.LiveBytes()
            with meter:
                tr.backward()  # batch 1 at the training latent, as the plan assumes
            two, _ = memory.plan(tr, dataclasses.replace(run.settings, batch_size=2), acts)
            monkeypatch.setenv(memory.ENV_BUDGET, "1.5")
            env_budget = memory.budget_bytes(dataclasses.replace(run.settings, memory_budget_gb=0.0), tr.patcher,
                                             tr.device)
            n_trained = sum(p.numel() for p in tr.params)
        finally:
            for a in tr.adapters.values():
                a.eval()
            tr.release()
    weights = sum(t.numel() * t.element_size() for t in [*dm.parameters(), *dm.buffers()])
    assert plan.weights == weights and plan.load == weights
    assert plan.adapters == n_trained * 4 * 3
    assert plan.budget == 3 * GiB and env_budget == int(1.5 * GiB)
    assert acts.probed and abs(plan.activations - meter.peak) / meter.peak < 0.15, (plan.activations, meter.peak)
    assert plan.total == weights + plan.adapters + plan.activations and plan.fits
    assert abs(two.activations - 2 * plan.activations) <= 2 and two.weights == weights
    assert run.meta["memory_plan"] == plan.text()
    # a budget 1 MiB under the plan: refused at Train Init, before a run folder exists
    budget = (plan.total - 2 ** 20) / GiB
    with pytest.raises(memory.MemoryError_) as e:
        _run(T, sd15, sd15_training_set, tmp_path, "tight", memory_budget_gb=budget)
    msg = str(e.value)
    assert f"needs about {plan.total / GiB:.3f} GiB" in msg and f"{budget:.3f} GiB is available" in msg
    fits = msg.split("Settings that would fit:")[1]
    peaks = [float(p) for p in re.findall(r"\(peak ([0-9.]+) GiB\)", fits)]
    assert peaks and all(p <= budget + 5e-4 for p in peaks), (budget, fits)
    assert "gradient_checkpointing on" in fits
    assert not (tmp_path / "runs" / "tight").exists()
