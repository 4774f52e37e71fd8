"""The concept-slider objective pinned (issue #26) on the tiny SD1.5, against independent computations: the loss
against the Concept Sliders goal computed from the base model's own predictions (ComfyUI's ``apply_model``) and the
adapter applied by ComfyUI's stock LoRA loader at +/- strength; the noisy latent against Euler steps with CFG written
out here; the micro-batch's scaling by ``grad_accum``; the prompt set's conditionings against the stock
CLIPTextEncode; every validation bound at its edge; the resume check and the saved record."""
from __future__ import annotations

import dataclasses
import json
import math
import types

import pytest
import torch

P = "AlignedTrainer_"
PROMPTS = dict(target="a photo of a person", positive="a (smiling:1.5) person", negative="a frowning person",
               anchor="a photo")
# every factor differs from 1 and from the others, so a dropped or swapped factor changes the loss
CFG = dict(guidance_scale=2.0, anchor_weight=0.5, strength=0.75, bidirectional=True, width=64, height=64,
           denoise_steps=2, denoise_cfg=3.0)


@pytest.fixture(scope="module")
def S(comfy):
    return comfy.engine("train.slider")


@pytest.fixture(scope="module")
def aligned(comfy, sd15):
    return comfy.call(P + "LoadAlignedTextEncoders", clip=sd15[1], spec="auto")[0]


@pytest.fixture(scope="module")
def slider_run(comfy, T, sd15, aligned, tmp_path_factory):
    (tset,) = comfy.call(P + "SliderPrompts", model=sd15[0], clip=aligned, **PROMPTS, **CFG)
    return T.loop.init_run(sd15[0], tset, T.C.LoraConfig(rank=4, alpha=2, preset="attention"), T.C.TimestepConfig(),
                           T.C.OptimizerConfig(lr=1e-3, weight_decay=0.0), T.st.RunSettings(run_name="pin_slider", seed=3),
                           runs_root=tmp_path_factory.mktemp("pin_slider"))


@pytest.fixture(scope="module")
def trainer(T, slider_run):
    """A loaded trainer of the slider run whose adapters have random (non-zero) weights."""
    with torch.inference_mode(False):
        tr = T.loop.Trainer(slider_run)
        tr.load()
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in tr.params:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        yield tr
        tr.release()


def _base(model, x, sigma, cond, denoised=False):
    """SD1.5's prediction (eps, or the denoised estimate) straight through ComfyUI's apply_model."""
    import comfy.model_management as mm

    mm.load_models_gpu([model])
    with torch.no_grad():
        den = model.model.apply_model(x, sigma, c_crossattn=cond[0][0].expand(x.shape[0], -1, -1))
    return den if denoised else (x - den) / sigma.view(-1, 1, 1, 1)


def _x_sigma():
    g = torch.Generator().manual_seed(5)
    sigma = torch.tensor([1.5, 4.0])
    return torch.randn(2, 4, 8, 8, generator=g) * sigma.view(-1, 1, 1, 1), sigma


def test_loss_is_the_concept_slider_goal_at_plus_and_minus_strength(T, S, sd15, slider_run, trainer):
    """loss = mean over the trained directions s of  |pred(+-strength, target) - (e_t +- g (e_p - e_n))|^2
    + anchor_weight |pred(+-strength, anchor) - e_a|^2, with the adapter applied by ComfyUI's LoRA loader."""
    from comfy.sd import load_lora_for_models

    sl = slider_run.training_set.meta["slider"]
    x, sigma = _x_sigma()
    scales = {n: a.scale for n, a in trainer.adapters.items()}
    configs = {"both+anchor": {}, "one-way": dict(bidirectional=False), "anchor weight 0": dict(anchor_weight=0.0)}
    got = {}
    trainer.load()
    with torch.inference_mode(False), torch.no_grad(), trainer.hooked():
        for name, kw in configs.items():
            obj = S.SliderObjective(dataclasses.replace(sl, config=dataclasses.replace(sl.config, **kw)))
            got[name] = obj.loss(trainer, x, sigma)
        got["no anchor"] = S.SliderObjective(dataclasses.replace(sl, anchor=None)).loss(trainer, x, sigma)
    assert {n: a.scale for n, a in trainer.adapters.items()} == scales, "the multiplier is restored"
    model = sd15[0]
    e_t, e_p, e_n, e_a = (_base(model, x, sigma, c) for c in (sl.target, sl.positive, sl.negative, sl.anchor))
    run = slider_run.advanced(state={"adapters": trainer.adapter_state()})
    lora = T.export.kohya_state_dict(run, dtype=torch.float32)
    pred = {}
    for sign in (1.0, -1.0):
        patched = load_lora_for_models(model, None, lora, sign * CFG["strength"], 0.0)[0]
        pred[sign] = (_base(patched, x, sigma, sl.target), _base(patched, x, sigma, sl.anchor))
    _base(model, x, sigma, sl.target)  # the base model loaded again (unpatched)

    def part(sign, aw):
        goal = e_t + sign * CFG["guidance_scale"] * (e_p - e_n)
        return float(((pred[sign][0] - goal) ** 2).mean() + aw * ((pred[sign][1] - e_a) ** 2).mean())

    want = {"both+anchor": (part(1.0, 0.5) + part(-1.0, 0.5)) / 2, "one-way": part(1.0, 0.5),
            "anchor weight 0": (part(1.0, 0.0) + part(-1.0, 0.0)) / 2, "no anchor": (part(1.0, 0.0) + part(-1.0, 0.0)) / 2}
    for k in want:
        assert math.isclose(got[k], want[k], rel_tol=1e-4), (k, got[k], want[k])
    assert part(1.0, 0.5) != part(-1.0, 0.5)  # the two directions are told apart


def test_noisy_latent_is_euler_with_cfg_on_the_base_model(S, sd15, slider_run, trainer):
    """From the model's largest sigma (noise * sqrt(1 + sigma_max^2), ComfyUI's eps max-denoise scaling) k Euler
    steps of the base model (adapters off) on the straight sigma path, CFG target vs empty; k = 0: noise * sigma."""
    sl = slider_run.training_set.meta["slider"]
    ms = trainer.ms
    g = torch.Generator().manual_seed(9)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    sigma = torch.tensor([2.0, 0.7])
    got = {}
    trainer.load()  # (other tests load other models through ComfyUI)
    with torch.inference_mode(False), trainer.hooked():
        for k, cfg in ((2, 3.0), (1, 1.0), (1, 2.0), (0, 3.0)):
            obj = S.SliderObjective(dataclasses.replace(sl, config=dataclasses.replace(sl.config, denoise_steps=k,
                                                                                      denoise_cfg=cfg)))
            got[(k, cfg)] = obj.noisy_latent(trainer, noise, sigma)
        assert all(a.enabled for a in trainer.adapters.values())
    smax = float(ms.sigma_max)
    v = (-1, 1, 1, 1)
    for (k, cfg), x_got in got.items():
        if k == 0:
            assert torch.allclose(x_got, noise * sigma.view(v), rtol=1e-6, atol=1e-6)
            continue
        x = noise * math.sqrt(1 + smax ** 2)
        for i in range(k):
            s0 = smax + (sigma - smax) * i / k
            s1 = smax + (sigma - smax) * (i + 1) / k
            cond = _base(sd15[0], x, s0, sl.target, denoised=True)
            den = cond if cfg == 1.0 else (lambda u: u + cfg * (cond - u))(_base(sd15[0], x, s0, sl.empty, denoised=True))
            x = x + (x - den) / s0.view(v) * (s1 - s0).view(v)
        assert torch.allclose(x_got, x, rtol=1e-4, atol=1e-4), (k, cfg, (x_got - x).abs().max())


def test_micro_batch_loss_and_gradient_divided_by_grad_accum(trainer):
    """The same draws (the run's generator rewound) with grad_accum 1 and 3: the returned loss and the adapters'
    gradients of the latter are a third of the former's."""
    out = {}
    run = trainer.run
    trainer.load()
    state = trainer.gen.get_state()
    with torch.inference_mode(False), torch.enable_grad(), trainer.hooked():
        for accum in (1, 3):
            trainer.run = run.advanced(settings=dataclasses.replace(run.settings, grad_accum=accum))
            trainer.gen.set_state(state)
            trainer.opt.zero_grad(set_to_none=True)
            loss = trainer.objective.micro_batch(trainer)
            out[accum] = loss, [p.grad.clone() for p in trainer.params]
    trainer.run = run
    trainer.opt.zero_grad(set_to_none=True)
    assert out[1][0] > 0 and math.isclose(out[3][0], out[1][0] / 3, rel_tol=1e-5)
    assert all(torch.allclose(a / 3, b, rtol=1e-4, atol=1e-9) for a, b in zip(out[1][1], out[3][1]))
    assert any(a.abs().sum() > 0 for a in out[1][1])
    # the gradient is the loss's own (not a multiple): a step of -eps * g along it lowers the returned loss by
    # eps * |g|^2 to first order (x and sigma do not depend on the adapters: the base model makes them)
    loss, grads = out[1]
    sq = sum(float((g ** 2).sum()) for g in grads)
    eps = 1e-3 * loss / sq
    saved = [p.detach().clone() for p in trainer.params]
    try:
        with torch.no_grad():
            for p, g in zip(trainer.params, grads):
                p.sub_(eps * g)
        with torch.inference_mode(False), torch.enable_grad(), trainer.hooked():
            trainer.gen.set_state(state)
            lower = trainer.objective.micro_batch(trainer)
    finally:
        with torch.no_grad():
            for p, v in zip(trainer.params, saved):
                p.copy_(v)
        trainer.opt.zero_grad(set_to_none=True)
    assert (loss - lower) == pytest.approx(eps * sq, rel=0.05), (loss - lower, eps * sq)


def test_validation_loss_at_fixed_noise_and_levels(S, trainer):
    """The slider's validation loss: the mean of the (pinned) loss at noisy latents made from noise drawn from a
    generator seeded 12345, one per level, at the levels 0.1 .. 0.9 (val_timesteps of them, evenly spaced) taken as
    ComfyUI's percent_to_sigma(1 - u)."""
    import dataclasses as dc

    run = trainer.run
    trainer.load()
    trainer.run = run.advanced(settings=dc.replace(run.settings, val_timesteps=2))
    try:
        with torch.inference_mode(False), torch.no_grad(), trainer.hooked():
            got = trainer.objective.validation_loss(trainer)
            g = torch.Generator().manual_seed(12345)
            want = []
            for u in (0.1, 0.9):
                noise = torch.randn((1, 4, 8, 8), generator=g)
                sigma = torch.tensor([float(trainer.ms.percent_to_sigma(1.0 - u))])
                want.append(trainer.objective.loss(trainer, trainer.objective.noisy_latent(trainer, noise, sigma), sigma))
    finally:
        trainer.run = run
    assert got == pytest.approx(sum(want) / 2, rel=1e-6) and want[0] != want[1]


def test_prompt_set_holds_the_prompts_encoded_by_the_stock_node(comfy, T, S, sd15, aligned):
    """Each prompt's conditioning is what the stock CLIPTextEncode gives with the literal aligned CLIP, also when the
    slider is given a CLIP reading ComfyUI's syntax (the emphasis in the positive prompt is read as text, as captions
    are); a blank
    anchor is no anchor; the placeholder latent has the model's channels at resolution / 8; the encoder is
    unloaded afterwards; the set's key follows the settings."""
    D_cache = comfy.engine("data.cache")
    clip = aligned  # literal, as Load Aligned Text Encoders gives it
    inference = aligned.with_syntax("comfyui")  # a CLIP reading ComfyUI's emphasis: the slider still reads literally
    cfg = S.SliderConfig(**PROMPTS, width=64, height=48)
    ts = S.prompt_set(cfg, sd15[0], inference)
    assert not D_cache.is_loaded(aligned)
    sl = ts.meta["slider"]
    for name in ("target", "positive", "negative", "anchor"):
        (ref,) = comfy.nodes.CLIPTextEncode().encode(clip, PROMPTS[name])
        assert torch.equal(getattr(sl, name)[0][0], ref[0][0]), name
    (weighted,) = comfy.nodes.CLIPTextEncode().encode(inference, PROMPTS["positive"])  # emphasis applied
    assert not torch.equal(weighted[0][0], sl.positive[0][0])
    (empty,) = comfy.nodes.CLIPTextEncode().encode(clip, "")
    assert torch.equal(sl.empty[0][0], empty[0][0]) and ts.empty_conditioning is sl.empty
    assert ts.samples[0].latent.shape == (4, 6, 8) and ts.samples[0].bucket == (64, 48)
    assert ts.samples[0].captions[0].text == PROMPTS["target"]
    assert ts.te_spec_id == aligned.spec.key == "sd15" and ts.meta["prompt_syntax"] == "literal"
    assert ts.meta["report"] == {"images": 0, "slider": sl.record()} and ts.meta["clip_id"] == sl.clip_id
    D_cache.unload_text_encoder(aligned)
    blank = S.prompt_set(dataclasses.replace(cfg, anchor="  "), sd15[0], aligned, unload=False)
    assert blank.meta["slider"].anchor is None and blank.samples[0].key != ts.samples[0].key
    assert D_cache.is_loaded(aligned)
    D_cache.unload_text_encoder(aligned)
    with pytest.raises(T.C.ConfigError, match="same prompt"):  # validated before anything is encoded
        S.prompt_set(dataclasses.replace(cfg, negative=cfg.positive), sd15[0], aligned)


def test_validation_bounds_at_their_edges(T, S):
    ok = dict(target="t", positive="p", negative="n")
    for kw in (dict(strength=1e-3), dict(anchor_weight=0.0), dict(denoise_steps=0), dict(denoise_steps=1000),
               dict(denoise_cfg=0.0), dict(width=8, height=8), dict(target=" ", positive="p"),
               dict(target="t", positive="", negative="n")):
        S.SliderConfig(**{**ok, **kw}).validate()
    for kw, msg in ((dict(strength=0.0), "strength must be > 0"), (dict(anchor_weight=-0.1), "anchor_weight"),
                    (dict(denoise_steps=-1), "denoise_steps"), (dict(denoise_steps=1001), "denoise_steps"),
                    (dict(denoise_cfg=-0.1), "denoise_cfg"), (dict(width=12), "multiples of 8"),
                    (dict(height=4), "multiples of 8"), (dict(width=0), "multiples of 8"),
                    (dict(target="", positive=" "), "both empty"), (dict(negative="p"), "same prompt"),
                    (dict(guidance_scale=float("nan")), "guidance_scale")):
        with pytest.raises(T.C.ConfigError, match=msg):
            S.SliderConfig(**{**ok, **kw}).validate()


def test_resume_check_and_record(T, S, slider_run):
    """A slider checkpoint resumes only with the same settings (the message names what changed) and only into a
    slider run; Save LoRA's record is the config plus the CLIP's identity; dataset runs record nothing."""
    sl = slider_run.training_set.meta["slider"]
    rec = sl.config.record()
    assert rec["format"] == S.FORMAT and rec["guidance_scale"] == 2.0 and rec["target"] == PROMPTS["target"]
    meta = json.loads(S.metadata(slider_run)["aligned_trainer.slider"])
    assert meta == {**rec, "clip_id": sl.clip_id} and sl.clip_id
    dataset_run = types.SimpleNamespace(training_set=types.SimpleNamespace(meta={}))
    assert S.metadata(dataset_run) == {} and S.of(None) is None
    S.check_resume({"slider": rec}, slider_run.training_set)
    S.check_resume({}, dataset_run.training_set)
    S.check_resume(None, None)
    with pytest.raises(T.st.CheckpointError, match=r"other settings \(anchor_weight, strength: 1.0, 2.0\)"):
        S.check_resume({"slider": {**rec, "strength": 2.0, "anchor_weight": 1.0}}, slider_run.training_set)
    with pytest.raises(T.st.CheckpointError, match="belongs to a dataset run and this run is a slider run"):
        S.check_resume({}, slider_run.training_set)
    with pytest.raises(T.st.CheckpointError, match="belongs to a slider run and this run is a dataset run"):
        S.check_resume({"slider": rec}, dataset_run.training_set)


def test_multiplier_and_base_model_restore_after_an_error(S):
    adapters = {"a": types.SimpleNamespace(scale=0.5, enabled=True), "b": types.SimpleNamespace(scale=2.0, enabled=True)}
    with pytest.raises(KeyError):
        with S.multiplier(adapters, -3.0):
            assert [a.scale for a in adapters.values()] == [-1.5, -6.0]
            raise KeyError
    assert [a.scale for a in adapters.values()] == [0.5, 2.0]
    with pytest.raises(KeyError):
        with S.base_model(adapters):
            assert not any(a.enabled for a in adapters.values())
            raise KeyError
    assert all(a.enabled for a in adapters.values())


def test_objective_refusals_name_the_fix(T, sd15, slider_run, tmp_path):
    """Weight-side adapters, differential output preservation and processes > 1 are refused for a slider."""
    def init(lora, **settings):
        return T.loop.init_run(sd15[0], slider_run.training_set, lora, T.C.TimestepConfig(), T.C.OptimizerConfig(),
                               T.st.RunSettings(run_name="pin_slider_refused", **settings), runs_root=tmp_path,
                               preservation=slider_run.training_set.meta["slider"].target
                               if settings.get("dop_weight") else None)
    loha = T.C.LoraConfig(algorithm="loha", rank=4, alpha=4, preset="attention")
    names = T.ad.target_layers(sd15[0].model.diffusion_model, loha)
    with pytest.raises(T.C.ConfigError, match=rf"{len(names)} target layer\(s\) \(e.g. '{names[0]}'\) would be weight "):
        init(loha)
    assert init(T.C.LoraConfig(rank=4, alpha=4, preset="attention")).step == 0  # lora, no DOP, one process: accepted
    with pytest.raises(T.C.ConfigError, match="set dop_weight to 0"):
        init(T.C.LoraConfig(rank=4, alpha=4, preset="attention"), dop_weight=0.5)
    with pytest.raises(T.C.ConfigError, match="processes 2 asked"):
        init(T.C.LoraConfig(rank=4, alpha=4, preset="attention"), processes=2)


def test_video_model_refused(T, S, aligned):
    """A slider on Wan (video latents, 3 latent dimensions) is refused before any prompt is encoded."""
    from support.factories import wan

    with pytest.raises(T.C.ConfigError, match="sliders train image models"):
        S.prompt_set(S.SliderConfig(**PROMPTS, width=32, height=32), wan.build_model(), aligned)


def test_trainer_step_sums_the_objectives_micro_batches_with_seeded_dropout(T, sd15, slider_run, tmp_path):
    """Train Steps' backward on a slider run: grad_accum 2 is the sum of two slider micro-batches drawn one after the
    other from the run's stream; with rank dropout each micro-batch's masks come from a seed drawn from that stream,
    so the same stream state gives the same loss again."""
    run = T.loop.init_run(slider_run.model, slider_run.training_set,
                          T.C.LoraConfig(rank=4, alpha=2, preset="attention", rank_dropout=0.5), T.C.TimestepConfig(),
                          T.C.OptimizerConfig(lr=1e-3), T.st.RunSettings(run_name="pin_slider_acc", seed=3, grad_accum=2),
                          runs_root=tmp_path)
    with torch.inference_mode(False), torch.enable_grad():
        tr = T.loop.Trainer(run)
        tr.load()
        try:
            for a in tr.adapters.values():
                a.train()
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in tr.params:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            state = tr.gen.get_state()
            first = tr.backward()
            after = tr.gen.get_state()
            tr.opt.zero_grad(set_to_none=True)
            tr.gen.set_state(state)
            assert tr.backward() == first  # the masks replayed from the stream's seeds
            tr.opt.zero_grad(set_to_none=True)
            tr.gen.set_state(state)
            parts = []
            with tr.hooked():
                for _ in range(2):
                    seed = int(torch.randint(0, 2 ** 62, (1,), generator=tr.gen))
                    with T.loop.seeded_global_rng(seed, tr.device):
                        parts.append(tr.objective.micro_batch(tr))
            assert torch.equal(tr.gen.get_state(), after)
        finally:
            tr.release()
    assert first == pytest.approx(parts[0] + parts[1], rel=1e-6)
