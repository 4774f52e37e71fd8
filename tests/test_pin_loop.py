"""Train Init / Train Steps options pinned on the tiny SD1.5 (issue #26), each against an independent
computation: grad_accum (K micro-batches = the mean of K separate ones, one optimizer step), EMA (the averaged
value after N steps, by diffusers' EMAModel decay schedule written out), max norm after the update, gradient
clipping at the optimizer step, repeats and buckets in the draw, caption dropout, loss weights (sample weight,
reg_weight, min-SNR-γ in the loop), validation split, val_every / checkpoint_every / keep_last, reported lr."""
from __future__ import annotations

import contextlib
import math
import dataclasses

import pytest
import torch


def _run(T, sd15, tset, tmp_path, name="r", lora=None, tcfg=None, opt=None, **settings):
    return T.loop.init_run(sd15[0], tset, lora or T.C.LoraConfig(rank=4, alpha=4, preset="attention"),
                           tcfg or T.C.TimestepConfig(), opt or T.C.OptimizerConfig(lr=1e-3),
                           T.st.RunSettings(run_name=name, **settings), runs_root=tmp_path / "runs")


@contextlib.contextmanager
def live(T, run):
    """A Trainer as ``train_steps`` builds it (outside inference mode, model loaded, adapters training)."""
    with torch.inference_mode(False), torch.enable_grad():
        tr = T.loop.Trainer(run)
        tr.load()
        for a in tr.adapters.values():
            a.train()
        yield tr


def _grads(tr):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in tr.params]


def _with(tset, **kw):
    return dataclasses.replace(tset, samples=tuple(dataclasses.replace(s, **kw) for s in tset.samples))


def test_grad_accum_is_the_mean_of_k_micro_batches_and_one_step(T, sd15, sd15_training_set, tmp_path):
    k = 3
    with live(T, _run(T, sd15, sd15_training_set, tmp_path, "acc", grad_accum=k, seed=4)) as acc:
        loss = acc.backward()
        g_acc = _grads(acc)
        state_after = acc.py_rng.getstate()
    with live(T, _run(T, sd15, sd15_training_set, tmp_path, "one", seed=4)) as one:
        losses = [one.backward() for _ in range(k)]  # gradients add up in .grad
        g_sum = _grads(one)
        assert one.py_rng.getstate() == state_after  # the same k draws
    assert loss == pytest.approx(sum(losses) / k, rel=1e-5)
    assert any(float(g.abs().sum()) > 0 for g in g_acc)
    for a, b in zip(g_acc, g_sum):
        torch.testing.assert_close(a, b / k, rtol=1e-4, atol=1e-8)
    with live(T, _run(T, sd15, sd15_training_set, tmp_path, "acc2", grad_accum=k, seed=4)) as acc:
        acc.step()
        assert acc.sched.last_epoch == 1 and acc.py_rng.getstate() == state_after
        assert all(p.grad is None for p in acc.params)


def _expected_ema(history, decay):
    """diffusers EMAModel (no warmup, update_after_step 0): at optimisation step k the decay is 0 for k = 1, else
    min(decay, (1 + (k-1)) / (10 + (k-1))); shadow <- shadow - (1 - d)(shadow - param)."""
    shadow = [p.clone() for p in history[0]]
    for k, params in enumerate(history[1:], start=1):
        s = k - 1
        d = 0.0 if s <= 0 else min(decay, (1 + s) / (10 + s))
        shadow = [sh - (1 - d) * (sh - p) for sh, p in zip(shadow, params)]
    return shadow


def test_ema_value_after_n_steps(T, sd15, sd15_training_set, tmp_path):
    decay = 0.2
    run = _run(T, sd15, sd15_training_set, tmp_path, "ema", opt=T.C.OptimizerConfig(lr=1e-2), ema_decay=decay)
    with live(T, run) as tr:
        history = [[p.detach().clone() for p in tr.params]]
        for _ in range(4):
            tr.step()
            history.append([p.detach().clone() for p in tr.params])
        shadow = list(tr.ema.shadow_params)
        state = tr.ema_adapter_state()
        names = [f"{n}.{k}" for n, a in tr.adapters.items() for k, p in a.inner.named_parameters() if p.requires_grad]
    expected = _expected_ema(history, decay)
    assert any(not torch.allclose(e, p) for e, p in zip(expected, history[-1]))  # the EMA lags the weights
    for e, s, n in zip(expected, shadow, names):
        torch.testing.assert_close(s, e, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(state[n], e, rtol=1e-5, atol=1e-7)


def test_max_norm_holds_after_each_update(T, sd15, sd15_training_set, tmp_path):
    max_norm = 2e-3
    run = _run(T, sd15, sd15_training_set, tmp_path, "mn", opt=T.C.OptimizerConfig(lr=5e-2),
               lora=T.C.LoraConfig(rank=4, alpha=4, preset="attention", max_norm=max_norm))
    free = _run(T, sd15, sd15_training_set, tmp_path, "free", opt=T.C.OptimizerConfig(lr=5e-2))
    norms = lambda tr: [float(((a.inner.lora_up.weight @ a.inner.lora_down.weight) * a.scale).detach().norm())  # noqa
                        for a in tr.adapters.values()]
    with live(T, free) as tr:
        tr.step()
        unconstrained = norms(tr)
    assert max(unconstrained) > 2 * max_norm  # the bound bites in this run
    with live(T, run) as tr:
        for _ in range(2):
            tr.step()
            got = norms(tr)
            assert max(got) == pytest.approx(max_norm, rel=1e-4)
            assert all(n <= max_norm * (1 + 1e-5) for n in got)


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_grad_clip_bounds_the_norm_the_optimizer_sees(T, sd15, sd15_training_set, tmp_path, clip):
    seen = []
    run = _run(T, sd15, sd15_training_set, tmp_path, f"clip{clip}", seed=2,
               opt=T.C.OptimizerConfig(lr=1e-3, grad_clip=clip))
    with live(T, run) as tr:
        tr.opt.register_step_pre_hook(
            lambda opt, args, kwargs: seen.append(float(torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in tr.params if p.grad is not None])))))
        tr.backward()
        natural = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in _grads(tr)])))
        tr._update(0.0)
    assert natural > 1e-3
    assert seen[0] == pytest.approx(min(natural, clip) if clip else natural, rel=2e-3)  # torch: clip / (norm + 1e-6)


def test_repeats_weight_the_draws_and_batches_stay_in_one_bucket(T, sd15, sd15_training_set, tmp_path):
    base = sd15_training_set.samples
    reps = (1, 2, 3, 6)
    tset = dataclasses.replace(sd15_training_set, samples=tuple(
        dataclasses.replace(s, repeats=r, key=f"s{i}") for i, (s, r) in enumerate(zip(base, reps))))
    with live(T, _run(T, sd15, tset, tmp_path, "rep", batch_size=2)) as tr:
        counts = {s.key: 0 for s in tset.samples}
        n = 3000
        for _ in range(n):
            for s in tr.draw_batch():
                counts[s.key] += 1
    for (key, c), r in zip(counts.items(), reps):
        assert c / (2 * n) == pytest.approx(r / sum(reps), abs=0.02), key
    # two buckets: every batch comes from one, both are drawn
    wide = tuple(dataclasses.replace(s, latent=torch.zeros(4, 8, 16), key=f"w{i}") for i, s in enumerate(base[:2]))
    tset = dataclasses.replace(sd15_training_set, samples=(*base[:2], *wide))
    with live(T, _run(T, sd15, tset, tmp_path, "buckets", batch_size=3)) as tr:
        shapes = set()
        for _ in range(200):
            batch = tr.draw_batch()
            assert len(batch) == 3 and len({tuple(s.latent.shape) for s in batch}) == 1
            shapes.add(tuple(batch[0].latent.shape))
    assert len(shapes) == 2


def test_caption_dropout_rate_and_variants(T, sd15, sd15_training_set, tmp_path):
    empty = [["EMPTY"]]
    s0 = sd15_training_set.samples[0]
    two = dataclasses.replace(s0, captions=(s0.captions[0], dataclasses.replace(s0.captions[0], text="other",
                                                                                  conditioning=[["OTHER"]])))
    n = 4000
    for p in (0.0, 0.3):
        tset = dataclasses.replace(sd15_training_set, samples=(two, *sd15_training_set.samples[1:]),
                                   empty_conditioning=empty, caption_dropout=p)
        with live(T, _run(T, sd15, tset, tmp_path, f"cd{p}")) as tr:
            got = [tr.conditioning(two) for _ in range(n)]
        dropped = sum(c is empty for c in got) / n
        other = sum(c == [["OTHER"]] for c in got) / n
        assert dropped == pytest.approx(p, abs=0.025)
        assert other == pytest.approx((1 - p) / 2, abs=0.025)  # one of the cached variants, uniformly


def _first_loss(T, sd15, tset, tmp_path, name, **kw):
    with live(T, _run(T, sd15, tset, tmp_path, name, seed=9, **kw)) as tr:
        return tr.backward()


def test_loss_weights_sample_weight_reg_weight(T, sd15, sd15_training_set, tmp_path):
    base = _first_loss(T, sd15, sd15_training_set, tmp_path, "w1")
    assert _first_loss(T, sd15, _with(sd15_training_set, weight=2.5), tmp_path, "w2") == pytest.approx(2.5 * base, rel=1e-5)
    reg = _with(sd15_training_set, is_reg=True)
    assert _first_loss(T, sd15, reg, tmp_path, "r3", reg_weight=3.0) == pytest.approx(3.0 * base, rel=1e-5)
    # reg_weight only applies to regularization samples
    assert _first_loss(T, sd15, sd15_training_set, tmp_path, "r4", reg_weight=3.0) == pytest.approx(base, rel=1e-5)


def test_min_snr_weight_in_the_loop(T, sd15, sd15_training_set, tmp_path):
    """Batch 1: the weighted loss is the plain loss times min(snr, γ)/snr at the drawn sigma; the draws (noise,
    then u, from the run's generator) are replayed by hand."""
    seed, gamma = 9, 2.0
    plain = _first_loss(T, sd15, sd15_training_set, tmp_path, "snr0")
    weighted = _first_loss(T, sd15, sd15_training_set, tmp_path, "snr1",
                           tcfg=T.C.TimestepConfig(weighting="min_snr", min_snr_gamma=gamma))
    g = torch.Generator().manual_seed(seed)
    torch.randn((1, *sd15_training_set.samples[0].latent.shape), generator=g)
    u = float(torch.rand(1, generator=g).clamp(1e-5, 1 - 1e-5))
    sigma = float(sd15[0].model.model_sampling.percent_to_sigma(1.0 - u))
    snr = 1 / sigma ** 2
    assert weighted == pytest.approx(plain * min(snr, gamma) / snr, rel=1e-4)


def test_validation_split(T, sd15, sd15_training_set, tmp_path):
    samples = sd15_training_set.samples
    with live(T, _run(T, sd15, sd15_training_set, tmp_path, "val", val_count=1)) as tr:
        assert [s.key for s in tr.val_samples] == [samples[-1].key]
        assert [s.key for s in tr.train_samples] == [s.key for s in samples[:-1]]
        assert all(b.key != samples[-1].key for _ in range(200) for b in tr.draw_batch())
    with live(T, _run(T, sd15, sd15_training_set, tmp_path, "val0", val_count=0)) as tr:
        assert len(tr.val_samples) == len(tr.train_samples) == len(samples)
    with pytest.raises(T.C.ConfigError, match=f"val_count {len(samples)} would hold out every sample .*"
                                              f"use at most {len(samples) - 1},"):
        with live(T, _run(T, sd15, sd15_training_set, tmp_path, "valall", val_count=len(samples))):
            pass  # nothing left to train: refused by name, not silently ignored


def test_val_every_checkpoint_every_keep_last_and_lr(T, sd15, sd15_training_set, tmp_path):
    run = _run(T, sd15, sd15_training_set, tmp_path, "sched", val_timesteps=2,
               opt=T.C.OptimizerConfig(lr=1e-3, scheduler="linear", warmup_steps=2, total_steps=6))
    out = T.loop.train_steps(run, 5, checkpoint_every=2, keep_last=1, val_every=2)
    assert [("val_loss" in h) for h in out.history] == [False, True, False, True, False]
    assert [h["step"] for h in out.history] == [1, 2, 3, 4, 5]
    assert [round(h["lr"], 9) for h in out.history] == [0.0, 5e-4, 1e-3, 7.5e-4, 5e-4]
    files = sorted((tmp_path / "runs" / "sched" / "checkpoints").glob("step_*.safetensors"))
    assert [f.name for f in files] == [f.name for f in map(__import__("pathlib").Path, out.checkpoints)]
    assert len(files) == 1 and "4" in files[0].stem
    assert out.step == 5 and run.step == 0 and run.history == ()  # the input run is unchanged


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops a step dispatches, and among them the reads of a tensor's value on the host
    (``aten._local_scalar_dense``: ``bool()``, ``float()``, ``.item()``, each a wait for the GPU there)."""

    def __init__(self):
        super().__init__()
        self.ops, self.reads = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def _kohya_max_norm(adapters, max_norm):
    """kohya's scale_weight_norms, pair by pair with a host-side test (the plain path)."""
    with torch.no_grad():
        for a in adapters.values():
            i = a.inner
            n = ((i.lora_up.weight @ i.lora_down.weight.flatten(1)) * (i.alpha / i.rank)).norm()
            if float(n) > max_norm:
                r = (max_norm / n).sqrt()
                i.lora_up.weight.mul_(r)
                i.lora_down.weight.mul_(r)


def test_max_norm_waits_for_the_device_once_and_equals_the_plain_path(T, sd15, sd15_training_set, tmp_path,
                                                                       monkeypatch):
    """Issue #25 (host overhead): max norm reads the device once per step (its count), not once per LoRA pair, and
    5 steps equal kohya's pair-by-pair rule (adapters within 1e-6, fp32)."""
    max_norm = 2e-3
    lora = T.C.LoraConfig(rank=4, alpha=4, preset="attention", max_norm=max_norm)
    opt = T.C.OptimizerConfig(lr=5e-2)
    with live(T, _run(T, sd15, sd15_training_set, tmp_path, "mn_dev", opt=opt, lora=lora, seed=6)) as tr:
        tr.step()
        counter = _HostReads()
        with counter:
            scaled = T.ad.apply_max_norm(tr.adapters, max_norm)
        assert len(tr.adapters) >= 8 and counter.reads == 1, (len(tr.adapters), counter.reads)
        assert 0 < scaled <= len(tr.adapters)  # pairs at the bound, a rounding over it, are scaled again
        for _ in range(4):
            tr.step()
        fast = [p.detach().clone() for p in tr.params]
    monkeypatch.setattr(T.ad, "apply_max_norm", _kohya_max_norm)
    with live(T, _run(T, sd15, sd15_training_set, tmp_path, "mn_plain", opt=opt, lora=lora, seed=6)) as tr:
        for _ in range(5):
            tr.step()
        plain = [p.detach().clone() for p in tr.params]
    assert any(float(p.abs().max()) > 0 for p in plain)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_ema_update_is_a_fixed_number_of_ops_and_equals_the_per_parameter_update(T, sd15, sd15_training_set,
                                                                                   tmp_path):
    """Issue #25 (host overhead): the EMA update dispatches the same few ops whatever the number of trained tensors
    (foreach: a handful of kernels on a GPU, not three per tensor), and 5 steps equal diffusers' per-parameter
    update within 1e-6 (fp32)."""
    from diffusers.training_utils import EMAModel

    def ops(n):
        params = [torch.nn.Parameter(torch.randn(3, 4)) for _ in range(n)]
        ema = T.optim.build_ema(params, 0.9)
        counter = _HostReads()
        with counter:
            ema.step(params)
        return counter.ops, counter.reads

    assert ops(40) == ops(4) and ops(4)[1] == 0
    opt = T.C.OptimizerConfig(lr=1e-2)
    with live(T, _run(T, sd15, sd15_training_set, tmp_path, "ema_fe", opt=opt, ema_decay=0.5, seed=7)) as tr:
        plain = EMAModel(tr.params, decay=0.5, foreach=False)
        for _ in range(5):
            tr.step()
            plain.step(tr.params)
        got = list(tr.ema.shadow_params)
    assert len(got) == len(plain.shadow_params) > 8
    assert any(not torch.equal(s, p) for s, p in zip(got, tr.params))  # the average lags the weights
    for a, b in zip(got, plain.shadow_params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_diverged_run_stops_before_applying_a_non_finite_step_and_keeps_the_last_good_checkpoint(
        T, sd15, sd15_training_set, tmp_path):
    """lr 1e30: step 1 is finite and throws the adapters to ~1e30, so step 2's loss is not finite. The run stops
    there with a message naming the step and what to change, before that step's update; the last good step is the
    kept checkpoint (keep_last 1: before, step 2's NaN weights were checkpointed and rotated step 1 out, and Train
    Init refuses a NaN checkpoint, so nothing was left to resume)."""
    run = _run(T, sd15, sd15_training_set, tmp_path, "diverge", opt=T.C.OptimizerConfig(lr=1e30, grad_clip=0.0))
    with torch.inference_mode():  # as ComfyUI runs Train Steps
        with pytest.raises(T.loop.NonFiniteLoss, match=r"loss became (nan|inf) at step 2.*was not applied.*holds step 1"
                           r".*lower learning_rate") as e:
            T.loop.train_steps(run, 5, checkpoint_every=1, keep_last=1)
    kept = sorted((tmp_path / "runs" / "diverge" / "checkpoints").glob("step_*.safetensors"))
    assert [k.name for k in kept] == ["step_0000001.safetensors"] and str(kept[0]) in str(e.value)
    ck = T.st.load_checkpoint(kept[0])  # verified, and refused if its adapters held NaN/inf
    assert ck["step"] == 1 and len(ck["history"]) == 1 and math.isfinite(ck["history"][0]["loss"])
    assert all(torch.isfinite(v).all() for v in ck["state"]["adapters"].values())
