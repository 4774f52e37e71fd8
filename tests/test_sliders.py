"""Concept sliders (LECO) from prompts alone, on the tiny SD1.5: after training, the LoRA loaded by ComfyUI's stock
loader moves the target prompt's prediction toward the positive prompt's base prediction at +1 and toward the
negative one's at -1 (measured against strength 0); resumed steps equal uninterrupted ones exactly; the saved file
records the slider; bad settings are refused before training; the strength sweep renders; an anchor keeps its prompt's
prediction. The shipped workflow (``train_slider``) is queued from the frontend in test_browser.py, which checks the
saved LoRA's record and the sweep grid shown on its node."""
from __future__ import annotations

import json
import time

import pytest
import torch

P = "AlignedTrainer_"
PROMPTS = dict(target="a photo of a person", positive="a photo of a smiling person, happy",
               negative="a photo of a frowning person, sad", anchor="")
STEPS = 6  # the straight run; a checkpoint at STEPS // 2 is resumed for the rest


def _slider_set(comfy, sd15, **kw):
    model, clip, _ = sd15
    aligned, _, _ = comfy.call(P + "LoadAlignedTextEncoders", clip=clip, spec="auto")
    args = dict(PROMPTS, guidance_scale=1.0, anchor_weight=1.0, strength=1.0, bidirectional=True, width=64,
                height=64, denoise_steps=1, denoise_cfg=1.0)
    args.update(kw)
    (tset,) = comfy.call(P + "SliderPrompts", model=model, clip=aligned, **args)
    return tset


def _init(T, sd15, tset, root, name, resume="none", algorithm="lora"):
    return T.loop.init_run(sd15[0], tset, T.C.LoraConfig(algorithm=algorithm, rank=4, alpha=4, preset="attention"),
                           T.C.TimestepConfig(), T.C.OptimizerConfig(lr=2e-3, weight_decay=0.0),
                           T.st.RunSettings(run_name=name, seed=5), resume=resume, runs_root=root)


@pytest.fixture(scope="module")
def slider_set(comfy, sd15):
    return _slider_set(comfy, sd15)


@pytest.fixture(scope="module")
def trained(T, sd15, slider_set, tmp_path_factory):
    """(runs folder, the slider run after STEPS straight steps with a checkpoint half way)."""
    root = tmp_path_factory.mktemp("slider_runs")
    t0 = time.perf_counter()
    run = T.loop.train_steps(_init(T, sd15, slider_set, root, "slider"), STEPS, checkpoint_every=STEPS // 2)
    print(f"slider: {STEPS} steps in {time.perf_counter() - t0:.1f}s")
    return root, run


def _eps(m, x, sigma, cond):
    """The eps prediction of MODEL ``m`` (SD1.5) for one conditioning, straight through ComfyUI's apply_model."""
    import comfy.model_management as mm

    mm.load_models_gpu([m])
    with torch.no_grad():
        den = m.model.apply_model(x, sigma, c_crossattn=cond[0][0].expand(x.shape[0], -1, -1))
    return (x - den) / sigma.view(-1, 1, 1, 1)


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_strength_moves_prediction_toward_positive_and_negative(T, sd15, slider_set, trained):
    """The slider's LoRA, applied by the stock LoRA loader at +1 / 0 / -1, conditioned on the target prompt:
    ``lean`` = distance to the base model's negative-prompt prediction minus distance to its positive-prompt one
    (> 0: nearer the positive end) rises from strength 0 to +1 and falls from 0 to -1, and the change at +1 points
    along (positive - negative), at -1 against it. The LoRA's metadata records the slider's prompts and the aligned
    spec."""
    from comfy.sd import load_lora_for_models

    lora = T.export.kohya_state_dict(trained[1], dtype=torch.float32)  # the file's tensors (the server test saves it)
    meta = T.export.metadata(trained[1])
    rec = json.loads(meta["aligned_trainer.slider"])
    assert {k: rec[k] for k in ("target", "positive", "negative")} == {k: PROMPTS[k] for k in
                                                                      ("target", "positive", "negative")}
    assert json.loads(meta["aligned_trainer.te_spec"])["id"] == "sd15" and meta["aligned_trainer.prompt_syntax"] == "literal"
    sl = slider_set.meta["slider"]
    model = sd15[0]
    g = torch.Generator().manual_seed(7)
    results = []
    for sigma in (1.0, 6.0):
        x = torch.randn(2, 4, 8, 8, generator=g) * sigma
        s = torch.tensor([sigma, sigma])
        e_t, e_p, e_n = (_eps(model, x, s, c) for c in (sl.target, sl.positive, sl.negative))
        at = {w: _eps(load_lora_for_models(model, None, lora, w, 0.0)[0], x, s, sl.target) for w in (1.0, -1.0)}
        at[0.0] = e_t

        def lean(e):
            return float((e - e_n).norm() - (e - e_p).norm())

        d = e_p - e_n
        results.append(dict(sigma=sigma, lean={w: lean(e) for w, e in at.items()},
                            cos_plus=_cos(at[1.0] - e_t, d), cos_minus=_cos(at[-1.0] - e_t, d)))
    print(json.dumps(results, indent=1))
    for r in results:
        assert r["lean"][1.0] > r["lean"][0.0] > r["lean"][-1.0], r
        assert r["cos_plus"] > 0.3 and r["cos_minus"] < -0.3, r


ANCHOR = "a photo of a man"  # shares most of the target's tokens: a slider without an anchor moves it too


@pytest.fixture(scope="module")
def anchored(T, comfy, sd15, tmp_path_factory):
    """The slider of ``trained`` with ANCHOR as its anchor (weight 1), everything else the same (same seed: the same
    noise and noise levels are drawn), after the same STEPS steps (half as many leave the anchored/plain drift ratio
    at 0.67 instead of 0.27: the anchor's pull builds up over the steps)."""
    tset = _slider_set(comfy, sd15, anchor=ANCHOR)
    t0 = time.perf_counter()
    run = T.loop.train_steps(_init(T, sd15, tset, tmp_path_factory.mktemp("slider_anchor_runs"), "anchored"), STEPS)
    print(f"anchored slider: {STEPS} steps in {time.perf_counter() - t0:.1f}s")
    return tset, run


def test_anchor_keeps_the_anchor_prompt_as_the_base_draws_it(T, sd15, trained, anchored):
    """The anchor's effect after training, through the stock LoRA loader: conditioned on the anchor prompt, the
    slider trained with the anchor changes the base model's prediction at +1 much less than the same slider trained
    without it for the same steps (``drift`` = |e_lora(anchor) - e_base(anchor)|; anchored/plain 0.27 measured,
    < 0.5 asserted: an ignored anchor gives 1; at -1 the same within 1 %, not rerun), and the slider still moves the
    target prompt along e(positive) - e(negative). Not told apart here (measured, printed): on this tiny model
    the anchor shrinks the target's change alike (|e_lora(target) - e_base(target)| 0.0049 vs 0.0171; drift per unit
    of target change 0.92 vs 0.98), so an anchor term conditioned on the target, or pulled to another prediction
    (equal to first order when both directions train), passes too; tests/test_pin_slider.py pins those terms."""
    from comfy.sd import load_lora_for_models

    tset, run = anchored
    sl = tset.meta["slider"]
    model = sd15[0]
    loras = {"plain": T.export.kohya_state_dict(trained[1], dtype=torch.float32),
             "anchored": T.export.kohya_state_dict(run, dtype=torch.float32)}
    g = torch.Generator().manual_seed(17)
    sigma = 2.0
    x = torch.randn(2, 4, 8, 8, generator=g) * sigma
    s = torch.tensor([sigma, sigma])
    e_t, e_p, e_n, e_a = (_eps(model, x, s, c) for c in (sl.target, sl.positive, sl.negative, sl.anchor))
    drift, cos, move = {}, {}, {}
    for name, lora in loras.items():
        for w in (1.0,):  # -1 measured alike (drift ratio 0.267 vs 0.268): the change is linear in the strength here
            patched = load_lora_for_models(model, None, lora, w, 0.0)[0]
            a, t = _eps(patched, x, s, sl.anchor), _eps(patched, x, s, sl.target)
            drift[name, w] = float((a - e_a).norm())
            move[name, w] = float((t - e_t).norm())
            cos[name, w] = _cos(t - e_t, e_p - e_n)
    _eps(model, x, s, sl.target)  # the base model loaded again (unpatched)
    ratio = {w: drift["anchored", w] / drift["plain", w] for w in (1.0,)}
    # selectivity: the anchor prompt's drift per unit of the target's change
    sel = {k: drift[k] / move[k] for k in drift}
    print(json.dumps({"drift": {f"{k[0]} {k[1]:+}": v for k, v in drift.items()}, "ratio": ratio,
                      "move": {f"{k[0]} {k[1]:+}": v for k, v in move.items()},
                      "sel": {f"{k[0]} {k[1]:+}": v for k, v in sel.items()},
                      "cos": {f"{k[0]} {k[1]:+}": v for k, v in cos.items()}, "|e_a - e_t|": float((e_a - e_t).norm())},
                     indent=1))
    assert drift["plain", 1.0] > 0 and ratio[1.0] < 0.5, (ratio, drift)
    assert cos["anchored", 1.0] > 0.3, cos


def test_memory_plan_of_an_anchored_slider_step(comfy, T, sd15, tmp_path):
    """Train Init's memory plan for a slider with an anchor (its activations probed as for a tight budget) against the
    live bytes of one slider step (adapters, optimizer state, the base predictions, both directions' forwards and
    backwards): within 15 %. The target and the anchor prompt back-propagate through one forward of twice the batch,
    which the plan counts (planned as one dataset step it was 34 % under the peak here and 37 % at 192 px; doubling
    the whole probed step instead was 31 % over here). Without an anchor: 109.5 planned, 109.2 MiB measured (not
    rerun here, suite time)."""
    memory = comfy.engine("train.memory")
    tset = _slider_set(comfy, sd15, anchor=ANCHOR, width=128, height=128)
    run = T.loop.init_run(sd15[0], tset, T.C.LoraConfig(rank=4, alpha=4, preset="attention"), T.C.TimestepConfig(),
                          T.C.OptimizerConfig(lr=1e-3), T.st.RunSettings(run_name="slider_mem"), runs_root=tmp_path)
    with torch.inference_mode(False):
        tr = T.loop.Trainer(run)
        tr.load()
        try:
            acts = memory.probe(tr, tuple(tset.samples[0].latent.shape))
            plan, _ = memory.plan(tr, acts=acts)
            assert acts.probed and memory.grad_batch(tr) == 2
            meter = memory.LiveBytes()
            with meter:  # the first step: the optimizer's state appears in it
                tr.step()
        finally:
            tr.release()
    step = plan.adapters + plan.activations  # what the step adds to the weights
    print(f"anchored slider memory plan: planned {step / 2**20:.1f} MiB, measured {meter.peak / 2**20:.1f} MiB")
    assert abs(step - meter.peak) / meter.peak < 0.15, (plan.text(), meter.peak)


def test_resumed_slider_equals_uninterrupted(T, sd15, slider_set, trained):
    """STEPS // 2 steps resumed from the half-way checkpoint equal the straight run's last STEPS // 2 exactly."""
    root, full = trained
    half = f"slider/checkpoints/step_{STEPS // 2:07d}.safetensors"
    resumed = _init(T, sd15, slider_set, root, "slider", resume=half)
    assert resumed.step == STEPS // 2
    done = T.loop.train_steps(resumed, STEPS - STEPS // 2)
    for k, v in full.state["adapters"].items():
        assert torch.equal(v, done.state["adapters"][k]), k
    assert [h["loss"] for h in full.history] == [h["loss"] for h in done.history]


def test_slider_refusals(comfy, T, sd15, slider_set, trained):
    """Before training: a slider with equal ends, a weight-patching adapter, differential output preservation, and
    resuming a slider checkpoint with other prompts are refused, each naming the fix."""
    with pytest.raises(T.C.ConfigError, match="positive and negative are the same"):
        _slider_set(comfy, sd15, negative=PROMPTS["positive"])
    with pytest.raises(T.C.ConfigError, match="sliders train lora/locon without DoRA"):
        _init(T, sd15, slider_set, trained[0], "slider_loha", algorithm="loha")
    with pytest.raises(T.C.ConfigError, match="write the prompt in Slider Prompts' anchor"):
        T.loop.init_run(sd15[0], slider_set, T.C.LoraConfig(rank=4, alpha=4, preset="attention"), T.C.TimestepConfig(),
                        T.C.OptimizerConfig(), T.st.RunSettings(run_name="slider_dop", dop_weight=1.0),
                        runs_root=trained[0], preservation=slider_set.meta["slider"].target)
    with pytest.raises(T.C.ConfigError, match="set Train Init processes to 1"):
        T.loop.init_run(sd15[0], slider_set, T.C.LoraConfig(rank=4, alpha=4, preset="attention"), T.C.TimestepConfig(),
                        T.C.OptimizerConfig(), T.st.RunSettings(run_name="slider_ddp", processes=2),
                        runs_root=trained[0])
    other = _slider_set(comfy, sd15, positive="a photo of a person with a hat")
    with pytest.raises(T.st.CheckpointError, match="positive"):
        _init(T, sd15, other, trained[0], "slider", resume="latest")


def test_sweep_grid_columns_are_the_lora_at_each_strength(comfy, T, sd15, trained):
    """Slider Sweep: one row per prompt, one column per strength; the 0 column is the base model's image and the +2
    column the image of the saved LoRA at strength 2 through the stock loader (same seed), which differs from it."""
    from comfy.sd import load_lora_for_models

    R = comfy.engine("sampling.render")
    model, clip, vae = sd15
    kw = dict(seed=3, seed_mode="fixed", steps=2, cfg=1.0, guidance=1.0, sampler_name="euler", scheduler="normal",
              width=64, height=64)
    grid, cols = comfy.call(P + "SliderSweep", run=trained[1], clip=clip, vae=vae, prompts=PROMPTS["target"],
                            strengths="0, 2", negative="", **kw)
    assert json.loads(cols) == [0.0, 2.0]
    s = R.SampleSettings(2, 1.0, 1.0, "euler", "normal", 64, 64, 3)
    pos, neg = R.encode(clip, PROMPTS["target"], 1.0), R.encode(clip, "", 1.0)
    base = R.sample(model, vae, pos, neg, s, 3)
    lora = T.export.kohya_state_dict(trained[1], dtype=torch.float32)
    plus2 = R.sample(load_lora_for_models(model, None, lora, 2.0, 0.0)[0], vae, pos, neg, s, 3)
    _, geo = R.grid([[base, base]], ["p"], ["+0", "+2"], [["seed 3"] * 2])
    assert tuple(grid.shape) == (1, geo["size"][1], geo["size"][0], 3)
    cells = [grid[0, y0:y1, x0:x1] for x0, y0, x1, y1 in geo["cell_boxes"][0]]
    assert torch.allclose(cells[0], base[0], atol=1 / 255) and torch.allclose(cells[1], plus2[0], atol=1 / 255)
    assert not torch.equal(cells[1], cells[0])
    with pytest.raises(ValueError, match="not a number"):
        comfy.call(P + "SliderSweep", run=trained[1], clip=clip, vae=vae, prompts="p", strengths="-2, big", negative="",
                   **kw)


def test_flux_slider_trains_toward_its_ends(comfy, family_bundle, tmp_path):
    """The same objective on the tiny FLUX.1 dev (flow velocity, guidance embedding, T5 + CLIP-L through the aligned
    spec): finite losses, and after 4 steps the LoRA's change of the target's velocity at +1 points along
    v(positive) - v(negative) and at -1 against it (measured with the trainer's own prediction path at a fixed
    latent; 16-channel latents from the model)."""
    C, st, loop, slider = (comfy.engine(m) for m in ("train.config", "train.state", "train.loop", "train.slider"))
    model, clip, _ = family_bundle("flux1-dev")
    aligned, _, _ = comfy.call(P + "LoadAlignedTextEncoders", clip=clip, spec="auto")
    (tset,) = comfy.call(P + "SliderPrompts", model=model, clip=aligned, **dict(
        PROMPTS, guidance_scale=1.0, anchor_weight=1.0, strength=1.0, bidirectional=True, width=64, height=64,
        denoise_steps=1, denoise_cfg=1.0))
    assert tset.samples[0].latent.shape == (16, 8, 8)
    run = loop.init_run(model, tset, C.LoraConfig(rank=4, alpha=4, preset="attention"), C.TimestepConfig(),
                        C.OptimizerConfig(lr=2e-3, weight_decay=0.0), st.RunSettings(run_name="flux_slider", seed=5),
                        runs_root=tmp_path)
    out = loop.train_steps(run, 4)
    assert all(torch.isfinite(torch.tensor([h["loss"] for h in out.history])))
    tr = loop.Trainer(out)
    tr.load()
    sl = tset.meta["slider"]
    try:
        x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.7
        sigma = torch.tensor([0.7])
        with torch.no_grad(), tr.hooked():
            with slider.base_model(tr.adapters):
                v_t, v_p, v_n = slider.SliderObjective.predict(tr, x, sigma, [sl.target, sl.positive, sl.negative])
            at = {}
            for w in (1.0, -1.0):
                with slider.multiplier(tr.adapters, w):
                    at[w] = tr.predict_at(x, sigma, [sl.target])
    finally:
        tr.release()
    d = v_p - v_n
    cos = {w: _cos(at[w] - v_t, d) for w in at}
    print("flux slider cosines", cos)
    assert cos[1.0] > 0.3 and cos[-1.0] < -0.3, cos


def test_sweep_reports_progress_and_leaves_no_lora_patched_model(comfy, T, sd15, trained):
    """The engine's sweep tells its progress per strength column and releases each LoRA-patched clone: afterwards
    none stays in ComfyUI's loaded set and the base's weights are as before."""
    import comfy.model_management as mm

    S, R = comfy.engine("sampling.slider_sweep"), comfy.engine("sampling.render")
    _, clip, vae = sd15
    base = trained[1].model
    mm.load_models_gpu([base])
    before = {k: v.clone() for k, v in base.model.diffusion_model.state_dict().items()}
    calls = []
    S.sweep(trained[1], clip, vae, [PROMPTS["target"]], [-1.5], "",
            R.SampleSettings(steps=1, cfg=1.0, width=64, height=64), progress=lambda k, msg: calls.append((k, msg)))
    assert calls == [(1, "strength -1.5 (1/1)")]
    live = [lm.model for lm in mm.current_loaded_models if lm.model is not None]
    assert not any(p.patches for p in live if p.model is base.model)
    assert all(torch.equal(v, before[k]) for k, v in base.model.diffusion_model.state_dict().items())
