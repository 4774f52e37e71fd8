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


def test_live_bytes_counts_each_storage_once_until_it_is_freed(comfy):
    """The meter the probe measures with, against allocations of known size: a view is the same storage, a freed
    tensor gives its bytes back, the peak is the largest sum at any time."""
    memory = comfy.engine("train.memory")
    meter = memory.LiveBytes()
    with meter:
        a = torch.ones(1000)                     # 4000 bytes
        view = a[:10]                            # the same storage: not counted again
        b = torch.ones(250, dtype=torch.float64)  # 2000 bytes
        empty = torch.ones(0)                    # no storage
        at_two = (meter.current, meter.peak)
        del a, view                              # 4000 bytes back
        c = torch.ones(100)                      # 400 bytes
    assert at_two == (6000, 6000)
    assert (meter.current, meter.peak) == (2400, 6000)
    del b, c, empty


def test_plan_arithmetic_with_given_activations(T, comfy, sd15, sd15_training_set, tmp_path, monkeypatch):
    """The plan's sums with activations given (no probe, fast): batch, area, precision and checkpointing scale the
    activations; int8 adds the packed weights (1 byte per value + an fp32 scale per row) next to the originals
    on a single device; offloading adds the two largest of the streamed layers in flight (on one device); an EMA adds one fp32
    copy; the budget is memory_budget_gb, else the environment variable; a plan fits up to its budget; the
    alternatives offered all fit, cheapest first."""
    memory = comfy.engine("train.memory")
    quantize = comfy.engine("train.quantize")
    run = _run(T, sd15, sd15_training_set, tmp_path, "sums")  # no budget set: the rough plan fits, no probe
    ema = _run(T, sd15, sd15_training_set, tmp_path, "sums_ema", ema_decay=0.9)
    acts = memory.Activations(fixed=3.0e6, per_pixel=5.0e4, probed=True)
    lat = max(s.latent.shape for s in sd15_training_set.samples)
    area = lat[-1] * lat[-2]
    dm = sd15[0].model.diffusion_model
    monkeypatch.setenv(memory.ENV_BUDGET, "2.0")
    s = run.settings
    R = dataclasses.replace
    with torch.inference_mode(False):
        tr, tr_ema = T.loop.Trainer(run), T.loop.Trainer(ema)
        try:
            p, _ = memory.plan(tr, None, acts)
            batch3, _ = memory.plan(tr, R(s, batch_size=3), acts)
            bf16, _ = memory.plan(tr, R(s, precision="bf16"), acts)
            gc, _ = memory.plan(tr, R(s, gradient_checkpointing=True), acts)
            int8, _ = memory.plan(tr, R(s, quantize="int8"), acts)
            off, _ = memory.plan(tr, R(s, offload_blocks=3), acts)
            p_ema, _ = memory.plan(tr_ema, None, acts)
            n = sum(q.numel() for q in tr.params)
            by_hand = memory.budget_bytes(R(s, memory_budget_gb=1.25), tr.patcher, tr.device)
            monkeypatch.setenv(memory.ENV_BUDGET, str((p.total - 2 ** 20) / GiB))  # 1 MiB short
            tight, _ = memory.plan(tr, None, acts)
            alts = memory.alternatives(tr, acts)
        finally:
            tr.release()
            tr_ema.release()
    weights = sum(t.numel() * t.element_size() for t in [*dm.parameters(), *dm.buffers()])
    one = acts.fixed + acts.per_pixel * area
    assert (p.weights, p.adapters, p.activations, p.budget) == (weights, n * 4 * 3, int(one), 2 * GiB)
    assert p.total == weights + n * 12 + int(one) and p.fits and not tight.fits
    assert p_ema.adapters == n * 4 * 4
    assert batch3.activations == int(3 * one)
    assert bf16.activations == int(int(one) * 0.55) and gc.activations == int(int(one) * 0.35)  # _factor's sizes
    packed = sum(m.weight.numel() + m.weight.shape[0] * 4 for m in dm.modules() if quantize.eligible(m))
    assert packed > 0 and int8.weights == weights + packed
    # loading is the peak's other candidate: ComfyUI loads in full; quantized around the load, the largest
    # eligible full weight is on the device next to the packed ones
    largest = max(m.weight.numel() * m.weight.element_size() for m in dm.modules() if quantize.eligible(m))
    assert p.load == weights and int8.load == weights + packed + largest
    # the probe's three shapes: the latent's area cut to about PROBE_AREA (256) latent pixels, aspect kept, even
    # sides, the second half as wide, the third a quarter (by hand)
    assert memory._probe_shapes((4, 8, 8)) == [(4, 8, 8), (4, 8, 4), (4, 8, 2)]
    assert memory._probe_shapes((16, 128, 128)) == [(16, 16, 16), (16, 16, 8), (16, 16, 4)]
    assert memory._probe_shapes((16, 5, 60, 104)) == [(16, 5, 12, 20), (16, 5, 12, 10), (16, 5, 12, 4)]
    # the streamed layers: the last offload_blocks layers, in checkpoint_units' order (the block lists in order,
    # the middle block last)
    layers = [c for b in [*dm.input_blocks, *dm.output_blocks, dm.middle_block] for c in b
              if any(True for _ in c.parameters())]
    streamed = sorted(sum(q.numel() * q.element_size() for q in c.parameters()) for c in layers[-3:])
    assert off.weights == weights + sum(streamed[-2:])
    assert by_hand == int(1.25 * GiB)  # memory_budget_gb wins over the environment variable
    assert alts and len(alts) <= 4 and all(a.fits and a.total <= tight.budget for a in alts)
    assert [a.total for a in alts] == sorted(a.total for a in alts)
    assert any(a.settings["gradient_checkpointing"] for a in alts)
    edge = memory.Plan(weights=10, adapters=5, activations=5, budget=20, device="cpu", settings=p.settings,
                       probed=True)
    assert edge.fits and not R(edge, budget=19).fits and R(edge, load=30).total == 30
    text = p.text()
    assert text.startswith(f"memory plan on cpu: peak {p.total / GiB:.3f} GiB of 2.000 GiB (fits)")
    assert f"activations {p.activations / GiB:.3f} GiB" in text and memory.describe(p.settings) in text
    assert "is the peak" not in text
    big = R(edge, weights=12 * GiB, adapters=GiB // 2, activations=GiB // 4, budget=16 * GiB, load=13 * GiB)
    assert big.text().startswith("memory plan on cpu: peak 13.0 GiB of 16.0 GiB (fits) = weights 12.0 GiB + "
                                 "adapters/optimizer 0.500 GiB + activations 0.250 GiB; ")
    assert big.text().endswith("; loading the model (13.0 GiB) is the peak: offload_blocks acts after the load, "
                               "quantize or fp8 loading lower it")
    monkeypatch.delenv(memory.ENV_BUDGET)
    assert memory.forced_budget(s) == 0.0 and memory.forced_budget(R(s, memory_budget_gb=0.5)) == 0.5


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
