"""Three Train Init options pinned against independent computations (issue #26): the training-side ``guidance``
reaches a guidance-distilled model (tiny FLUX.1 dev) as the model keyword it reads, fp16's grad scaler (clipping
sees unscaled gradients; an overflowed step is skipped and the scale backed off), and ``dop_weight`` between 0
and 1 (the loss is the plain loss plus dop_weight times the preservation term, linear in the weight)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from test_pin_loop import live  # a Trainer as train_steps builds it


def _run(T, sd15, tset, tmp_path, name, opt=None, preservation=None, **settings):
    return T.loop.init_run(sd15[0], tset, T.C.LoraConfig(rank=4, alpha=4, preset="attention"), T.C.TimestepConfig(),
                           opt or T.C.OptimizerConfig(lr=1e-3), T.st.RunSettings(run_name=name, **settings),
                           runs_root=tmp_path / "runs", preservation=preservation)


def _norm(tensors) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors])))


def test_training_guidance_reaches_a_guidance_distilled_model(T, comfy, family_bundle, sd15):
    """FLUX.1 dev reads ``guidance`` from its keyword arguments: the Trainer's batch carries the run's value for
    every sample (as FluxGuidance's conditioning does at inference), and the prediction depends on it."""
    model, clip, _ = family_bundle("flux1-dev")
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a cat"))
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))

    def kwargs(g, patcher=model, c=cond):
        fake = SimpleNamespace(patcher=patcher, run=SimpleNamespace(settings=SimpleNamespace(guidance=g)),
                               context=T.loop.Trainer.context)
        return T.loop.concat_conds(T.loop.Trainer.model_conds(fake, [c, c], x))

    k = kwargs(2.5)
    torch.testing.assert_close(k["guidance"].float(), torch.tensor([2.5, 2.5]))
    torch.testing.assert_close(kwargs(6.0)["guidance"].float(), torch.tensor([6.0, 6.0]))
    sigma = torch.tensor([0.7, 0.7])
    with torch.no_grad():
        a = model.model.apply_model(x, sigma, **k)
        b = model.model.apply_model(x, sigma, **kwargs(6.0))
    assert not torch.allclose(a, b)
    assert "guidance" not in kwargs(2.5, sd15[0], sd15[1].encode_from_tokens_scheduled(sd15[1].tokenize("a")))


def test_fp16_scaler_unscales_before_clipping_and_skips_overflow(T, sd15, sd15_training_set, tmp_path):
    """fp16: the loss is scaled for backward; gradient clipping (and the optimizer) see the unscaled gradients,
    so the norm at the optimizer step is the clip value, not clip / scale. A step whose gradients overflowed
    is skipped (weights unchanged) and the scale is backed off by half (GradScaler's backoff_factor)."""
    clip = 1e-3
    run = _run(T, sd15, sd15_training_set, tmp_path, "fp16clip", seed=2,
               opt=T.C.OptimizerConfig(lr=1e-2, grad_clip=clip))
    seen = []
    with live(T, run) as tr:
        # the GradScaler Trainer builds for precision fp16 (enabled); the forward stays fp32 because fp16 autocast
        # on the CPU is slow (the fp16 forward itself: test_train_features.py::test_mixed_precision_bf16_fp16)
        assert not tr.scaler.is_enabled()
        tr.scaler = torch.amp.GradScaler(tr.device.type, enabled=True)
        tr.opt.register_step_pre_hook(
            lambda opt, args, kwargs: seen.append(_norm([p.grad for p in tr.params if p.grad is not None])))
        tr.backward()
        scale = float(tr.scaler.get_scale())
        scaled = _norm([p.grad for p in tr.params if p.grad is not None])
        tr._update(0.0)
        assert scale == 2.0 ** 16  # GradScaler's initial scale
        assert scaled / scale > clip  # the true gradient norm is above the clip value
        assert seen and seen[0] == pytest.approx(clip, rel=2e-3)
        assert float(tr.scaler.get_scale()) == scale  # no overflow: the scale holds (growth after 2000 steps)
        tr.backward()
        before = [p.detach().clone() for p in tr.params]
        g = next(p for p in tr.params if p.grad is not None).grad
        g.view(-1)[0] = float("inf")  # an fp16 overflow in one gradient
        tr._update(0.0)
        assert len(seen) == 1  # the optimizer did not step
        assert all(torch.equal(a, p.detach()) for a, p in zip(before, tr.params))
        assert float(tr.scaler.get_scale()) == scale * 0.5


def test_dop_weight_between_zero_and_one_is_linear(T, sd15, sd15_training_set, tmp_path):
    """loss(w) = loss(0) + w * P, P = the preservation term the Trainer computed on the same draws (one Trainer,
    its random state restored before each weight), and P > 0 once the LoRA differs from the base."""
    import dataclasses

    pres = sd15_training_set.samples[0].captions[0].conditioning
    run = _run(T, sd15, sd15_training_set, tmp_path, "dop", seed=3, dop_weight=1.0, preservation=pres)
    losses, terms = {}, []
    with live(T, run) as tr:
        g = torch.Generator().manual_seed(9)
        with torch.no_grad():  # a LoRA that has learned something (up is zero at init)
            for a in tr.adapters.values():
                up = a.inner.lora_up.weight
                up.copy_(0.5 * torch.randn(up.shape, generator=g))
        term = tr.preservation_loss
        tr.preservation_loss = lambda *args: terms.append(term(*args)) or terms[-1]  # records P, changes nothing
        rng, py = tr.gen.get_state(), tr.py_rng.getstate()
        for w in (0.0, 0.25):
            tr.run = dataclasses.replace(run, settings=dataclasses.replace(run.settings, dop_weight=w))
            tr.gen.set_state(rng)
            tr.py_rng.setstate(py)
            losses[w] = tr.backward()
    assert len(terms) == 1  # computed only for w > 0
    p = float(terms[0])
    assert p > 1e-6 * abs(losses[0.0])
    assert losses[0.25] - losses[0.0] == pytest.approx(0.25 * p, rel=1e-3)


def test_prodigy_reports_d_times_lr(T, sd15, sd15_training_set, tmp_path):
    """Prodigy's step size is d * lr (d starts at d0 = 1e-6 and adapts): the reported lr is that product, not
    the configured lr."""
    run = _run(T, sd15, sd15_training_set, tmp_path, "prodigy", seed=2, opt=T.C.OptimizerConfig(name="prodigy", lr=1.0))
    with live(T, run) as tr:
        tr.backward()
        d = float(tr.opt.param_groups[0]["d"])
        _, lr = tr._update(0.0)
    assert d == 1e-6  # prodigyopt's d0
    assert lr == pytest.approx(float(run.optimizer.lr) * d)
