"""The memory plan's parts (train/memory.py) pinned one by one against independent counts (issue #26, mutation
survivors of the first run): the meter's and the plan text's edges; the CPU budget (free memory + this model's
share); the weight bytes of a quantized / offloaded model on one or two devices, counted here layer by layer;
the probe shapes written out for odd latents; ComfyUI's inference estimate x3 (x1 checkpointed); the probe's
fitted line against live bytes measured here at both probe shapes, its random streams left as they were; the
plan at the largest (non-square) latent, its resolution, the scaling by another precision; the refusal's
alternatives against the documented candidate list (one change at a time, then cumulatively). In process, on
the tiny SD1.5 with a training set whose second sample has a non-square latent (no dataset built: the plan
reads shapes only)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

GiB = 1024 ** 3
R = dataclasses.replace


def _run(T, sd15, tset, tmp_path, name, **settings):
    return T.loop.init_run(sd15[0], tset, T.C.LoraConfig(rank=4, alpha=4, preset="attention"), T.C.TimestepConfig(),
                           T.C.OptimizerConfig(lr=1e-3), T.st.RunSettings(run_name=name, seed=1, **settings),
                           runs_root=tmp_path / "runs")


@pytest.fixture(scope="module")
def mixed_set(sd15_training_set):
    """The 64 px set with its second sample's latent made 6 x 14 (larger than 8 x 8 by numel, not square)."""
    s0, s1 = sd15_training_set.samples[:2]
    wide = R(s1, latent=torch.randn((4, 6, 14), generator=torch.Generator().manual_seed(3)), bucket=(112, 48))
    return R(sd15_training_set, samples=(s0, wide))


def test_meter_activations_and_text_edges(comfy):
    memory = comfy.engine("train.memory")
    meter = memory.LiveBytes()
    assert (meter.current, meter.peak) == (0, 0)
    with meter:
        torch.ones(0)  # no storage
    assert (meter.current, meter.peak) == (0, 0)
    # batch * max(fixed + per_pixel * area, 0), truncated to bytes
    assert memory.Activations(100.0, 2.5, True).at(3, 16) == 3 * 140
    assert memory.Activations(-50.0, 1.0, True).at(2, 10) == 0
    assert memory.Activations(0.25, 0.0, True).at(2, 1) == 0
    settings = {"precision": "fp32", "quantize": "none", "offload_blocks": 0, "gradient_checkpointing": False,
                "batch_size": 1, "resolution": "64x64"}
    p = memory.Plan(weights=10 * GiB, adapters=0, activations=0, budget=int(10.5 * GiB), device="cpu",
                    settings=settings, probed=True)
    # three decimals below 10 GiB, one from 10 GiB on
    assert p.text().startswith("memory plan on cpu: peak 10.0 GiB of 10.5 GiB (fits)")
    assert R(p, weights=int(9.9996 * GiB)).text().startswith("memory plan on cpu: peak 10.000 GiB")
    # the load is named as the peak only when it is above the sum of the three parts
    parts = R(p, weights=5 * GiB, adapters=3 * GiB, activations=GiB)
    assert "is the peak" not in R(parts, load=9 * GiB).text()
    assert "is the peak" not in R(parts, load=8 * GiB).text()
    assert "loading the model (9.000 GiB) is the peak" in R(parts, load=9 * GiB + 1).text()


def test_cpu_budget_is_free_memory_plus_this_models_share(comfy, monkeypatch):
    """On the CPU the budget is ComfyUI's free memory plus what the model itself holds (loaded_size); without
    that method, nothing is added."""
    memory = comfy.engine("train.memory")
    import comfy.model_management as mm

    monkeypatch.delenv(memory.ENV_BUDGET, raising=False)
    no_budget = type("S", (), {"memory_budget_gb": 0.0})()

    class Holder:  # what a patcher reports as loaded
        def loaded_size(self):
            return 64 * GiB

    cpu = torch.device("cpu")

    def stable(patcher, held):
        for _ in range(50):  # free memory moves between calls: keep a sample where it did not
            before = int(mm.get_free_memory(cpu))
            b = memory.budget_bytes(no_budget, patcher, cpu)
            if before == int(mm.get_free_memory(cpu)):
                return b - held == before
        return False

    assert stable(Holder(), 64 * GiB)
    assert stable(object(), 0)


def test_weight_bytes_counted_layer_by_layer(comfy, sd15):
    """Quantized (int8, int4) and offloaded (last k streamed layers, two in flight) weights on one device and
    on two, each counted here from the layers; a module with buffers and no eligible layer."""
    memory = comfy.engine("train.memory")
    quantize = comfy.engine("train.quantize")
    dm = sd15[0].model.diffusion_model
    full = sum(t.numel() * t.element_size() for t in dm.parameters())
    lin = [m for m in dm.modules() if quantize.eligible(m)]

    def packed(m, mode):
        n, rows, cols = m.weight.numel(), m.weight.shape[0], m.weight.shape[1]
        if mode == "int8":
            return n + rows * 4  # one byte per value + an fp32 scale per row
        gs = quantize.group_size(cols) or cols
        return n // 2 + 2 * (n // gs) * 4  # two values per byte + fp32 scale and shift per group

    def nbytes(m):
        return m.weight.numel() * m.weight.element_size()

    for mode in ("int8", "int4"):
        q = sum(packed(m, mode) for m in lin)
        assert memory.weight_bytes(dm, mode, 0, True) == full + q          # next to the originals
        assert memory.weight_bytes(dm, mode, 0, False) == full + q - sum(nbytes(m) for m in lin)  # instead
        assert memory.load_bytes(dm, mode, False) == full + q - sum(nbytes(m) for m in lin) + max(map(nbytes, lin))
    assert memory.load_bytes(dm, "none", False) == full
    # offloaded: the last 4 streamed layers (UNet blocks contribute their layers), the two largest in flight
    layers = [c for b in [*dm.input_blocks, *dm.output_blocks, dm.middle_block] for c in b
              if any(True for _ in c.parameters())][-4:]
    qs = {id(m): packed(m, "int8") for m in lin}

    def layer_bytes(c, quantized):
        b = 0
        for m in c.modules():
            for name, p in m.named_parameters(recurse=False):
                b += qs[id(m)] if (quantized and name == "weight" and id(m) in qs) else p.numel() * p.element_size()
        return b

    for quantized in (False, True):
        mode = "int8" if quantized else "none"
        sizes = sorted(layer_bytes(c, quantized) for c in layers)
        base = memory.weight_bytes(dm, mode, 0, False)
        assert memory.weight_bytes(dm, mode, 4, False) == base + sum(sizes[-2:]) - sum(sizes)
        assert memory.weight_bytes(dm, mode, 4, True) == memory.weight_bytes(dm, mode, 0, True) + sum(sizes[-2:])
    # buffers count; no eligible layer: the load is the weights
    norm = torch.nn.Sequential(torch.nn.BatchNorm1d(7), torch.nn.Conv1d(7, 3, 1))
    counted = sum(t.numel() * t.element_size() for t in [*norm.parameters(), *norm.buffers()])
    assert counted > sum(t.numel() * t.element_size() for t in norm.parameters())
    assert memory.weight_bytes(norm, "none", 0, True) == counted
    assert memory.load_bytes(norm, "int8", True) == counted


def test_probe_shapes_of_odd_latents(comfy):
    """Written out by hand: f = max(1, sqrt(h * w / 256)); ph = max(2, even(h / f)), pw = max(4, even(w / f));
    the second probe max(2, even(pw / 2)), the third max(2, even(pw / 4))."""
    memory = comfy.engine("train.memory")
    assert memory._probe_shapes((4, 6, 14)) == [(4, 6, 14), (4, 6, 6), (4, 6, 2)]
    assert memory._probe_shapes((4, 14, 6)) == [(4, 14, 6), (4, 14, 2), (4, 14, 2)]
    assert memory._probe_shapes((4, 1, 2)) == [(4, 2, 4), (4, 2, 2), (4, 2, 2)]
    assert memory._probe_shapes((4, 3, 7)) == [(4, 2, 6), (4, 2, 2), (4, 2, 2)]
    # 64 x 36: f = sqrt(9) = 3 -> 21.33 -> 20, 12 -> 12; second 6, third 12 // 4 = 3 -> 2
    assert memory._probe_shapes((16, 64, 36)) == [(16, 20, 12), (16, 20, 6), (16, 20, 2)]
    # 20 x 180: f = sqrt(3600 / 256) = 3.75 -> 5.33 -> 4, 48 -> 48; second 24, third 12
    assert memory._probe_shapes((16, 20, 180)) == [(16, 4, 48), (16, 4, 24), (16, 4, 12)]


def test_probe_fit_by_hand(comfy):
    """fit(): exact through three points of 10 + 2 A + 0.5 A^2; downward curvature is not extrapolated (the line
    through the two largest areas); repeated areas count once."""
    memory = comfy.engine("train.memory")
    assert memory.fit([(8, 58.0), (4, 26.0), (2, 16.0)]) == pytest.approx((10.0, 2.0, 0.5))
    assert memory.fit([(2, 16.0), (8, 58.0), (4, 26.0)]) == pytest.approx((10.0, 2.0, 0.5))  # any order
    # 10 + 2 A - 0.1 A^2 at 8, 4, 2: 19.6, 16.4, 13.6 -> the line through (8, 19.6) and (4, 16.4)
    assert memory.fit([(8, 19.6), (4, 16.4), (2, 13.6)]) == pytest.approx((13.2, 0.8, 0.0))
    assert memory.fit([(8, 58.0), (4, 26.0), (4, 26.0)]) == pytest.approx((-6.0, 8.0, 0.0))
    assert memory.fit([(4, 26.0), (4, 26.0)]) == pytest.approx((0.0, 6.5, 0.0))
    a = memory.Activations(10.0, 2.0, True, 0.5)
    assert a.at(3, 8) == 3 * 58 and a.per_element(8) == 48.0


def test_estimate_probe_plan_and_alternatives(T, comfy, sd15, mixed_set, tmp_path, monkeypatch):
    memory = comfy.engine("train.memory")
    monkeypatch.delenv(memory.ENV_BUDGET, raising=False)
    run = _run(T, sd15, mixed_set, tmp_path, "mixed")            # no budget set: the rough plan fits, no probe
    gc_run = _run(T, sd15, mixed_set, tmp_path, "mixed_gc", gradient_checkpointing=True)
    patcher = sd15[0]
    s = run.settings
    with torch.inference_mode(False), torch.enable_grad():
        tr, tr_gc = T.loop.Trainer(run), T.loop.Trainer(gc_run)
        try:
            # ComfyUI's inference estimate at batch 1, x3 without checkpointing, x1 with, per latent pixel
            req = patcher.memory_required([1, 4, 6, 14])
            for t, k in ((tr, 3), (tr_gc, 1)):
                est = memory.comfy_estimate(t, (4, 6, 14))
                assert (est.fixed, est.per_pixel, est.probed) == (0.0, req * k / 84, False)
            one = memory.comfy_estimate(tr, (4, 1, 1))
            assert one.per_pixel == patcher.memory_required([1, 4, 1, 1]) * 3
            rough, acts = memory.plan(tr)  # free memory is far above twice the rough plan: not probed
            assert not acts.probed and not rough.probed
            assert rough.settings["resolution"] == "112x48"  # the largest latent, 14 x 6, times 8
            assert rough.activations == acts.at(1, 84)

            # the probe (of the checkpointed run: its peak is in backward) from a base as ComfyUI leaves it:
            # weights loaded under inference mode (inference tensors) or with requires_grad on; up to
            # PROBE_MAX_PARAMS parameters on a CPU
            dm = patcher.model.diffusion_model
            n = sum(p.numel() for p in dm.parameters())
            monkeypatch.setattr(memory, "PROBE_MAX_PARAMS", n)
            layers = [m for m in dm.modules() if m._parameters]
            with torch.inference_mode():
                for m in layers[::2]:
                    for k, w in list(m._parameters.items()):
                        if w is not None:
                            m._parameters[k] = torch.nn.Parameter(w.detach().clone(), requires_grad=False)
            for m in layers[1::2]:
                for w in m._parameters.values():
                    if w is not None and not w.is_inference():
                        w.requires_grad_(True)
            gen, py = tr_gc.gen.get_state(), tr_gc.py_rng.getstate()
            torch.manual_seed(5)
            global_rng = torch.get_rng_state()
            probed = memory.probe(tr_gc, (4, 6, 14))
            assert torch.equal(torch.get_rng_state(), global_rng)  # its noise comes from its own generator
            assert torch.equal(tr_gc.gen.get_state(), gen) and tr_gc.py_rng.getstate() == py
            assert not any(w.is_inference() or w.requires_grad or w.grad is not None for w in dm.parameters())
            # its line through the live bytes of the trainer's own checkpointed step measured here at both shapes
            cond = tr_gc.samples[0].captions[0].conditioning
            sigma = torch.tensor([float(tr_gc.ms.percent_to_sigma(0.5))])
            for shp in ((4, 6, 14), (4, 6, 6)):
                meter = memory.LiveBytes()
                with tr_gc.hooked(), T.loop.checkpointed_blocks(dm, True, lambda: tr_gc.clone_saved), \
                        tr_gc._saved_tensor_mode(), meter:
                    tr_gc.predict_loss(torch.randn((1, *shp)), torch.randn((1, *shp)), sigma, [cond]).mean().backward()
                for w in tr_gc.params:
                    w.grad = None
                fitted = probed.fixed + probed.per_pixel * shp[-1] * shp[-2]
                assert probed.probed and abs(fitted - meter.peak) / meter.peak < 0.03, (shp, fitted, meter.peak)
            monkeypatch.setattr(memory, "PROBE_MAX_PARAMS", n - 1)  # one parameter more than allowed: estimated
            assert not memory.probe(tr, (4, 6, 14)).probed

            # another precision / checkpointing than the probed run's: scaled by their ratio (_factor)
            acts = memory.Activations(fixed=3.0e6, per_pixel=5.0e4, probed=True)
            a = acts.at(1, 84)
            plain, _ = memory.plan(tr_gc, R(gc_run.settings, gradient_checkpointing=False), acts)
            assert plain.activations == int(a / 0.35)
            quarter, _ = memory.plan(tr, memory._Alt("fp32", "none", 0, False, 2, area_scale=0.25), acts)
            assert quarter.activations == acts.at(2, 21) and quarter.settings["resolution"] == "56x24"

            # the refusal's alternatives: the documented candidates, one change at a time from the run's settings
            # and cumulatively, each planned; those that fit, cheapest first, four at most
            units = len(comfy.engine("train.offload").units(T.loop.checkpoint_units(patcher.model.diffusion_model)))
            heavy = memory.Activations(fixed=3.0e6, per_pixel=1.0e9, probed=True)  # the resolution's share first
            steps = [dict(gradient_checkpointing=True), dict(precision="bf16"), dict(batch_size=1),
                     dict(quantize="int8"), dict(offload_blocks=units // 2), dict(quantize="int4"),
                     dict(offload_blocks=units - 2), dict(area_scale=0.25)]
            for quant, acts in (("none", acts), ("none", heavy), ("int4", heavy)):
                tr.run = R(run, settings=R(s, batch_size=2, quantize=quant))
                base = memory._Alt("fp32", quant, 0, False, 2)
                cands, cum = [], base
                for ch in steps:
                    cands += [R(base, **ch), R(cum, **ch)]
                    cum = R(cum, **ch)
                cands = [c for c in dict.fromkeys(cands) if c != base]
                monkeypatch.setenv(memory.ENV_BUDGET, "1e6")
                planned = {c: memory.plan(tr, c, acts)[0] for c in cands}
                totals = sorted(p.total for p in planned.values())
                for budget in (1e6, totals[len(totals) // 2] / GiB):  # all fit; about half
                    monkeypatch.setenv(memory.ENV_BUDGET, str(budget))
                    planned = {c: memory.plan(tr, c, acts)[0] for c in cands}
                    want = sorted((p for p in planned.values() if p.fits), key=lambda p: p.total)[:4]
                    got = memory.alternatives(tr, acts)
                    assert [(p.settings, p.total) for p in got] == [(p.settings, p.total) for p in want], quant
                    assert len(got) == 4 and (budget == 1e6) != any(not p.fits for p in planned.values())
        finally:
            tr.run = run
            tr.release()
            tr_gc.release()
