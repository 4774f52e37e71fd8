"""Run validation pinned at its edges (issue #26): each documented range accepts its boundary values and refuses
the first value past them, with a ConfigError that names the field the user typed. The ranges are the ones the
nodes' tooltips and docs/training.md promise (e.g. dropouts in [0, 1), 0 <= min_timestep < max_timestep <= 1000,
grad_clip 0 = off), not read back from the code."""
from __future__ import annotations

import math

import pytest


@pytest.fixture(scope="module")
def C(comfy):
    return comfy.engine("train.config")


def ok(cfg):
    cfg.validate()
    return cfg


def refused(C, cfg, match):
    with pytest.raises(C.ConfigError, match=match):
        cfg.validate()


def test_lora_ranges_accept_their_edges_and_refuse_past_them(C):
    L = C.LoraConfig
    ok(L(rank=1, alpha=None))
    ok(L(rank=1, alpha=1e-6))
    refused(C, L(rank=0, alpha=None), r"rank must be >= 1 \(got 0\)")
    refused(C, L(rank=None, alpha=None), r"rank must be >= 1 \(got None\)")
    refused(C, L(rank=0, alpha=4.0), "alpha 4.0 was given without a rank")
    refused(C, L(rank=4, alpha=0.0), r"alpha must be > 0 \(got 0.0\)")
    refused(C, L(rank=4, alpha=-1.0), "alpha must be > 0")
    for name in ("rank_dropout", "module_dropout", "network_dropout"):
        ok(L(**{name: 0.0}))
        ok(L(**{name: 0.999}))
        refused(C, L(**{name: 1.0}), rf"{name} must be in \[0, 1\), got 1.0")
        refused(C, L(**{name: -0.01}), rf"{name} must be in \[0, 1\)")
    refused(C, L(algorithm="dora"), "unknown LoRA algorithm 'dora'")
    refused(C, L(preset="attn"), "unknown target preset 'attn'")
    refused(C, L(init="xavier"), "init must be 'default' or 'gaussian'")
    ok(L(init="gaussian"))
    ok(L(init="default"))


def test_lora_algorithm_combinations(C):
    L = C.LoraConfig
    for algo in C.ALGORITHMS:
        ok(L(algorithm=algo, preset="all-linear+conv"))
    # LoCon needs convolutions in its preset
    refused(C, L(algorithm="locon", preset="attention"), "LoCon trains convolutions but preset 'attention'")
    refused(C, L(algorithm="locon", preset="cross-attention"), "LoCon trains convolutions")
    ok(L(algorithm="locon", preset="attention+mlp"))
    # rank dropout: lora and locon only
    ok(L(algorithm="lora", rank_dropout=0.2))
    ok(L(algorithm="locon", rank_dropout=0.2))
    for algo in ("loha", "lokr"):
        refused(C, L(algorithm=algo, rank_dropout=0.2), "rank_dropout applies to lora/locon only")
        ok(L(algorithm=algo, module_dropout=0.2))
    # network dropout acts on activations: lora/locon without DoRA
    ok(L(algorithm="lora", network_dropout=0.2))
    ok(L(algorithm="locon", network_dropout=0.2))
    refused(C, L(algorithm="lokr", network_dropout=0.2), "network_dropout acts on activations.*'lokr' patches")
    refused(C, L(algorithm="lora", dora=True, network_dropout=0.2), "'lora' with DoRA patches weights")
    # DoRA: lora/locon only
    ok(L(algorithm="lora", dora=True))
    ok(L(algorithm="locon", dora=True))
    ok(L(algorithm="lora", dora=True, dora_axis="output"))
    refused(C, L(algorithm="lora", dora=True, dora_axis="rows"), r"dora_axis must be one of \('input', 'output'\) \(got 'rows'\)")
    refused(C, L(algorithm="loha", dora=True), "DoRA decomposes LoRA weights; it does not apply to 'loha'")
    refused(C, L(algorithm="lokr", dora=True), "does not apply to 'lokr'")


def test_lora_conv_and_scale_alpha(C):
    L = C.LoraConfig
    assert L(algorithm="locon", preset="attention+mlp").conv is True
    assert L(algorithm="lora", preset="all-linear+conv").conv is True
    assert L(algorithm="loha", preset="all-linear+conv").conv is True
    assert L(algorithm="lora", preset="all-linear").conv is False
    assert L(algorithm="lokr", preset="attention").conv is False
    assert L(rank=8, alpha=None).scale_alpha == 8.0 and isinstance(L(rank=8, alpha=None).scale_alpha, float)
    assert L(rank=8, alpha=2.5).scale_alpha == 2.5


def test_user_patterns_blank_length_and_syntax(C):
    assert C.user_pattern("include", "") is None
    assert C.user_pattern("include", None) is None
    p = C.user_pattern("include", r"attn\d")
    assert p.search("blocks.attn2.to_q") and not p.search("blocks.ff.net")
    assert p.search("attn1", timeout=1.0)  # the `regex` engine: matching takes a timeout
    edge = "a" * C.MAX_PATTERN
    assert C.user_pattern("exclude", edge).pattern == edge
    with pytest.raises(C.ConfigError, match=rf"exclude pattern is {C.MAX_PATTERN + 1} characters long"):
        C.user_pattern("exclude", edge + "a")
    with pytest.raises(C.ConfigError, match=r"include pattern '\(attn' is not a valid regex"):
        C.user_pattern("include", "(attn")
    refused(C, C.LoraConfig(exclude="[x"), "exclude pattern '\\[x' is not a valid regex")
    refused(C, C.LoraConfig(include="a" * (C.MAX_PATTERN + 1)), "include pattern is 1001 characters")


def test_non_finite_floats_refused_with_the_users_names(C):
    for bad in (math.nan, math.inf, -math.inf):
        refused(C, C.OptimizerConfig(lr=bad), rf"learning_rate is {bad!r}: it must be a finite number")
        refused(C, C.OptimizerConfig(betas=(0.9, bad)), r"beta1/beta2 is \(0.9, " + repr(bad))
        refused(C, C.OptimizerConfig(betas=(bad, 0.9)), "beta1/beta2 is")
        refused(C, C.TimestepConfig(noise_offset=bad), "noise_offset is .*finite number")
        refused(C, C.LoraConfig(max_norm=bad), "max_norm is .*finite number")
    # integers and strings are not floats: never flagged
    ok(C.TimestepConfig(min_timestep=0, max_timestep=1000))
    ok(C.OptimizerConfig(betas=(0.0, 0.0), warmup_steps=0))


def test_timestep_ranges(C):
    T = C.TimestepConfig
    ok(T(min_timestep=0, max_timestep=1000))
    ok(T(min_timestep=999, max_timestep=1000))
    ok(T(min_timestep=0, max_timestep=1))
    refused(C, T(min_timestep=500, max_timestep=500), r"need 0 <= min_timestep < max_timestep <= 1000 \(got 500, 500\)")
    refused(C, T(min_timestep=-1, max_timestep=1000), "min_timestep")
    refused(C, T(min_timestep=0, max_timestep=1001), "min_timestep")
    ok(T(expert="high_noise", expert_boundary=0.001))
    ok(T(expert="low_noise", expert_boundary=0.999))
    ok(T(expert="high_noise", expert_boundary=0.0))  # 0: the model's official boundary, set by Train Init
    refused(C, T(expert_boundary=-0.001), r"expert_boundary must be between 0 and 1 \(got -0.001\); 0 takes")
    refused(C, T(expert_boundary=1.0), "expert_boundary must be between 0 and 1")
    refused(C, T(expert="middle"), "expert must be none, high_noise or low_noise")
    ok(T(logit_std=1e-6))
    refused(C, T(logit_std=0.0), "logit_std must be > 0")
    for d in C.DENSITIES:
        ok(T(density=d))
    for w in C.WEIGHTINGS:
        ok(T(weighting=w))
    for b in ("balanced", "high_noise", "low_noise"):
        ok(T(bias=b))
    for s in ("model", "none", "fixed", "flux_resolution"):
        ok(T(shift=s))
    refused(C, T(density="gauss"), "unknown density 'gauss'")
    refused(C, T(weighting="snr"), "unknown loss weighting 'snr'")
    refused(C, T(bias="middle"), "bias must be balanced")
    refused(C, T(shift="sd3"), "shift must be model")


def test_optimizer_ranges(C):
    O = C.OptimizerConfig
    for name in C.OPTIMIZERS:
        ok(O(name=name))
    for s in C.SCHEDULERS:
        ok(O(scheduler=s))
    refused(C, O(name="sgd"), "unknown optimizer 'sgd'")
    refused(C, O(scheduler="step"), "unknown scheduler 'step'")
    ok(O(lr=1e-12))
    refused(C, O(lr=0.0), r"learning rate must be > 0 \(got 0.0\)")
    ok(O(weight_decay=0.0))
    refused(C, O(weight_decay=-1e-6), r"weight decay must be >= 0 \(got -1e-06\)")
    ok(O(warmup_steps=0, total_steps=1))
    refused(C, O(warmup_steps=-1), "warmup_steps must be >= 0 and total_steps >= 1")
    refused(C, O(total_steps=0), "warmup_steps must be >= 0 and total_steps >= 1")
    ok(O(grad_clip=0.0))
    refused(C, O(grad_clip=-0.5), "grad_clip must be >= 0")


def test_as_dict_names_the_type_and_every_field(C):
    d = C.as_dict(C.LoraConfig(rank=4, alpha=2.0))
    assert d["type"] == "LoraConfig" and d["rank"] == 4 and d["alpha"] == 2.0 and d["dora"] is False
    assert set(d) == {"type", "algorithm", "rank", "alpha", "preset", "include", "exclude", "rank_dropout",
                      "module_dropout", "network_dropout", "init", "max_norm", "dora", "dora_axis"}
    assert C.as_dict(C.OptimizerConfig())["betas"] == (0.9, 0.999)
