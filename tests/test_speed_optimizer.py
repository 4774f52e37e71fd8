"""The ``optimizer_impl`` speed option (train/optim.py): AdamW with torch's ``foreach`` or ``fused`` kernels trains
the same adapters as the default implementation (5 steps, fp32, within 1e-6) on a UNet (SD1.5) and a
transformer (FLUX.1), and the chosen kernels are seen running (torch's profiler: ``_fused_adamw_`` /
``_foreach_addcdiv_``). A checkpoint written with one implementation resumes with another (same result as no
switch), and the resumed run runs the implementation it asked for, not the checkpoint's; the LoRA files are the
same. Other optimizers keep their own code and Train Init says so."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from safetensors import safe_open

from support import speed_pair as sp

FUSED, FOREACH = "aten::_fused_adamw_", "aten::_foreach_addcdiv_"  # what AdamW's fused / multi-tensor paths run


def _profiled(fn):
    """``fn()`` and how many times each aten op ran in it."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, Counter(e.name for e in prof.events())


@pytest.fixture(scope="module")
def families(comfy, T, sd15, sd15_training_set, family_bundle):
    flux_model, flux_set = sp.one_sample_set(comfy, family_bundle("flux1-dev"), 16)
    return {"sd15": (sd15[0], sd15_training_set, T.C.LoraConfig(rank=4, alpha=4, preset="attention")),
            "flux1": (flux_model, flux_set, T.C.LoraConfig(rank=4, alpha=2, preset="all-linear+conv"))}


@pytest.mark.parametrize("family", ["sd15", "flux1"])
def test_foreach_and_fused_adamw_train_the_same_adapters(T, families, family, tmp_path):
    model, tset, lora = families[family]
    runs, kernels, described = {}, {}, {}
    for impl in ("default", "foreach", "fused"):
        seen = []
        run = sp.init(T, model, tset, tmp_path / "runs", impl, lora=lora, optimizer_impl=impl)
        runs[impl], kernels[impl] = _profiled(
            lambda: sp.train(T, run, 5, on_step=lambda r, tr: seen.append(T.optim.describe(tr.opt))))
        described[impl] = set(seen)
    # acted: the implementation asked for ran, every step
    assert described == {"default": {"AdamW (default)"}, "foreach": {"AdamW (foreach)"},
                         "fused": {"AdamW (fused)"}}
    assert kernels["default"][FUSED] == 0 and kernels["default"][FOREACH] == 0  # torch's CPU default: per tensor
    assert kernels["foreach"][FOREACH] == 5 and kernels["foreach"][FUSED] == 0
    assert kernels["fused"][FUSED] == 5 and kernels["fused"][FOREACH] == 0
    for impl in ("foreach", "fused"):
        print(f"{family} {impl}: max adapter difference {sp.max_diff(runs['default'], runs[impl]):.3g}")
        sp.assert_same(runs["default"], runs[impl])


@pytest.mark.parametrize("first,then", [("default", "fused"), ("fused", "default"), ("foreach", "fused")])
def test_resume_across_implementations_equals_no_switch(T, sd15, sd15_training_set, tmp_path, first, then):
    """2 steps with ``first`` (checkpointed), resumed with ``then`` for 3: the adapters of 5 uninterrupted steps,
    with ``then``'s kernels running after the resume (torch's load_state_dict would otherwise take the
    checkpoint's implementation back with its group settings); checkpoint and LoRA files alike."""
    root = tmp_path / "runs"
    plain = sp.train(T, sp.init(T, sd15[0], sd15_training_set, root, "plain"), 5, checkpoint_every=2)
    half = sp.train(T, sp.init(T, sd15[0], sd15_training_set, root, "switch", optimizer_impl=first), 2,
                    checkpoint_every=2)
    resumed = sp.init(T, sd15[0], sd15_training_set, root, "switch", resume="latest", optimizer_impl=then)
    assert resumed.step == 2
    done, kernels = _profiled(lambda: sp.train(T, resumed, 3))
    assert kernels[FUSED] == (3 if then == "fused" else 0)
    assert kernels[FOREACH] == (3 if then == "foreach" else 0)
    sp.assert_same(plain, done)
    # the checkpoint written with ``first`` holds the tensors a default one does
    with safe_open(plain.checkpoints[0], "pt") as a, safe_open(half.checkpoints[-1], "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            x, y = a.get_tensor(k), b.get_tensor(k)
            assert x.shape == y.shape and x.dtype == y.dtype, k
    sp.assert_same_layout(sp.saved_lora(T, plain, tmp_path / "a"), sp.saved_lora(T, done, tmp_path / "b"))


def test_other_optimizers_keep_their_code_and_train_init_says_so(comfy, T, sd15, sd15_training_set, tmp_path):
    opt = T.C.OptimizerConfig(name="prodigy", lr=1.0)
    run = sp.init(T, sd15[0], sd15_training_set, tmp_path / "runs", "prodigy", opt=opt, optimizer_impl="fused")
    assert "optimizer_impl fused: applies to AdamW only; prodigyopt's Prodigy" in run.meta["speed_note"]
    seen = []
    sp.train(T, run, 1, on_step=lambda r, tr: seen.append(T.optim.describe(tr.opt)))
    assert seen == ["Prodigy (default)"]
    plain = sp.init(T, sd15[0], sd15_training_set, tmp_path / "runs", "adamw", optimizer_impl="fused")
    assert plain.meta["speed_note"] is None  # AdamW: nothing to say
    with pytest.raises(T.C.ConfigError, match="optimizer_impl must be one of"):
        T.optim.build_optimizer(T.C.OptimizerConfig(), [torch.nn.Parameter(torch.zeros(2))], "apex")
