"""Optimizer options pinned (issue #26): every hyper-parameter reaches the optimizer, and each scheduler's
learning rate follows its published formula (diffusers' schedules / the papers), warmup included."""
from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture(scope="module")
def O(comfy):
    class NS:
        C = comfy.engine("train.config")
        optim = comfy.engine("train.optim")
    return NS


def _params():
    return [torch.nn.Parameter(torch.ones(3))]


def test_hyper_parameters_reach_each_optimizer(O):
    cfg = dict(lr=3e-3, weight_decay=0.07, betas=(0.8, 0.95), eps=1e-6)
    g = O.optim.build_optimizer(O.C.OptimizerConfig(name="adamw", **cfg), _params()).param_groups[0]
    assert (g["lr"], g["weight_decay"], g["betas"], g["eps"]) == (3e-3, 0.07, (0.8, 0.95), 1e-6)
    opt = O.optim.build_optimizer(O.C.OptimizerConfig(name="prodigy", d_coef=0.5, decouple=False,
                                                      use_bias_correction=True, safeguard_warmup=True, **cfg),
                                  _params())
    g = opt.param_groups[0]
    assert type(opt).__name__ == "Prodigy"
    assert (g["lr"], g["weight_decay"], g["betas"], g["d_coef"], g["decouple"], g["use_bias_correction"],
            g["safeguard_warmup"]) == (3e-3, 0.07, (0.8, 0.95), 0.5, False, True, True)
    opt = O.optim.build_optimizer(O.C.OptimizerConfig(name="adafactor", **cfg), _params())
    g = opt.param_groups[0]
    assert type(opt).__name__ == "Adafactor"
    assert (g["lr"], g["weight_decay"], g["relative_step"], g["scale_parameter"], g["warmup_init"]) == \
        (3e-3, 0.07, False, False, False)
    opt = O.optim.build_optimizer(O.C.OptimizerConfig(name="lion", **cfg), _params())
    g = opt.param_groups[0]
    assert type(opt).__name__ == "Lion" and (g["lr"], g["weight_decay"], g["betas"]) == (3e-3, 0.07, (0.8, 0.95))
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(O.C.ConfigError, match="bitsandbytes"):
            O.optim.build_optimizer(O.C.OptimizerConfig(name="adamw8bit"), _params())


def test_adamw_first_step_is_the_adam_formula(O):
    """One AdamW step from a known gradient: p - lr * (wd * p + m_hat / (sqrt(v_hat) + eps)), m_hat = g, v_hat = g^2."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = O.optim.build_optimizer(O.C.OptimizerConfig(lr=0.1, weight_decay=0.2, eps=0.5), [p])
    p.grad = torch.tensor([0.3, -1.0, 2.0])
    opt.step()
    g = torch.tensor([0.3, -1.0, 2.0])
    expected = torch.tensor([1.0, -2.0, 0.5]) * (1 - 0.1 * 0.2) - 0.1 * g / (g.abs() + 0.5)
    torch.testing.assert_close(p.detach(), expected)


def _lrs(O, steps=12, **kw):
    p = _params()
    cfg = O.C.OptimizerConfig(lr=1.0, **kw)
    opt = O.optim.build_optimizer(cfg, p)
    sched = O.optim.build_scheduler(cfg, opt)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def _warm(step, warmup):
    return step / max(1, warmup)


@pytest.mark.parametrize("name", ["constant", "cosine", "cosine_with_restarts", "linear", "polynomial"])
def test_scheduler_formulas_with_warmup(O, name):
    total, warmup, cycles, power = 10, 3, 2, 2.0
    got = _lrs(O, scheduler=name, warmup_steps=warmup, total_steps=total, num_cycles=cycles, power=power)
    for s, lr in enumerate(got):
        progress = (s - warmup) / (total - warmup)
        if s < warmup:
            expected = _warm(s, warmup)
        elif name == "constant":
            expected = 1.0
        elif name == "cosine":
            expected = max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))
        elif name == "cosine_with_restarts":
            expected = 0.0 if progress >= 1 else 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1.0)))
        elif name == "linear":
            expected = max(0.0, (total - s) / (total - warmup))
        else:  # polynomial decay to lr_end = 1e-7
            lr_end = 1e-7
            expected = lr_end if s > total else (1 - lr_end) * (1 - progress) ** power + lr_end
        assert lr == pytest.approx(expected, abs=1e-6), (name, s)


def test_constant_without_warmup_is_flat(O):
    assert _lrs(O, scheduler="constant", warmup_steps=0) == [1.0] * 12
