"""LoRA Config options pinned to hand-built tensors (issue #26): alpha/rank scale on both sides, rank, module
and network dropout as kohya defines them, max norm (kohya scale_weight_norms), init, target presets and
include/exclude regexes, and which side an adapter runs on."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(scope="module")
def A(comfy):
    class NS:
        C = comfy.engine("train.config")
        ad = comfy.engine("train.adapters")
    return NS


def _linear_adapter(A, rank=2, alpha=1.0, side="activation", **kw):
    layer = torch.nn.Linear(6, 5)
    cfg = A.C.LoraConfig(rank=rank, alpha=alpha, **kw)
    a = A.ad.create(layer.weight.detach(), cfg, torch.Generator().manual_seed(0), layer=layer if side == "activation" else None)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking pair (up is zero at init)
        a.inner.lora_down.weight.copy_(torch.randn(a.inner.lora_down.weight.shape, generator=g))
        a.inner.lora_up.weight.copy_(torch.randn(a.inner.lora_up.weight.shape, generator=g))
    return layer, a


@pytest.mark.parametrize("rank,alpha,scale", [(2, 1.0, 0.5), (4, 8.0, 2.0), (3, None, 1.0)])
def test_alpha_over_rank_scales_both_sides(A, rank, alpha, scale):
    """Activation side: W x + alpha/rank * up(down(x)); weight side: W + alpha/rank * up @ down; alpha unset
    (0 in the node) means alpha = rank, scale 1."""
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    layer, a = _linear_adapter(A, rank, alpha)
    down, up = a.inner.lora_down.weight.detach(), a.inner.lora_up.weight.detach()
    with torch.no_grad():
        out = a.hook(layer, (x,), layer(x))
        torch.testing.assert_close(out, layer(x) + scale * (x @ down.T) @ up.T)
    assert a.kind == "linear"
    _, w = _linear_adapter(A, rank, alpha, side="weight")
    assert w.kind is None
    W = layer.weight.detach()
    with torch.no_grad():
        torch.testing.assert_close(w(W), W + scale * w.inner.lora_up.weight @ w.inner.lora_down.weight)


def test_disabled_adapter_is_the_base_layer(A):
    layer, a = _linear_adapter(A)
    a.enabled = False
    x = torch.randn(2, 6)
    assert a.hook(layer, (x,), layer(x)) is None
    assert torch.equal(a(layer.weight), layer.weight)


def test_rank_dropout_one_mask_per_sample_scaled(A):
    """kohya: mask ~ (rand(batch, rank) >= p), kept ranks scaled by 1/(1 - p); eval mode: no dropout."""
    p = 0.5
    layer, a = _linear_adapter(A, rank=4, alpha=4.0, rank_dropout=p)
    a.train()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    down, up = a.inner.lora_down.weight.detach(), a.inner.lora_up.weight.detach()
    torch.manual_seed(5)
    mask = (torch.rand((8, 4)) >= p).float()
    expected = layer(x) + ((x @ down.T) * mask) @ (up / (1 - p)).T
    torch.manual_seed(5)
    with torch.no_grad():
        torch.testing.assert_close(a.hook(layer, (x,), layer(x)), expected.detach())
    a.eval()
    with torch.no_grad():
        torch.testing.assert_close(a.hook(layer, (x,), layer(x)), layer(x) + (x @ down.T) @ up.T)


def test_weight_side_rank_dropout(A):
    p = 0.25
    _, a = _linear_adapter(A, rank=4, alpha=2.0, rank_dropout=p, side="weight")
    a.train()
    W = torch.randn(5, 6)
    down, up = a.inner.lora_down.weight.detach(), a.inner.lora_up.weight.detach()
    torch.manual_seed(0)
    keep = (torch.rand(4) >= p).float()
    assert 0 < keep.sum() < 4  # this seed drops some ranks and keeps others (seed 9 kept all four)
    expected = W + 0.5 * (up * keep / (1 - p)) @ down
    torch.manual_seed(0)
    with torch.no_grad():
        torch.testing.assert_close(a(W), expected)


def test_module_dropout_skips_whole_adapter_at_rate(A):
    """Each training forward draws one rand(); below p the adapter is skipped (layer output unchanged)."""
    p = 0.3
    layer, a = _linear_adapter(A, module_dropout=p)
    a.train()
    x = torch.randn(2, 6)
    torch.manual_seed(0)
    draws = [float(torch.rand(())) for _ in range(200)]
    torch.manual_seed(0)
    skipped = []
    with torch.no_grad():
        for _ in range(200):
            skipped.append(a.hook(layer, (x,), layer(x)) is None)
    assert skipped == [d < p for d in draws]
    _, w = _linear_adapter(A, module_dropout=p, side="weight")
    w.train()
    W = torch.randn(5, 6)
    torch.manual_seed(0)
    with torch.no_grad():
        same = [torch.equal(w(W), W) for _ in range(200)]
    assert same == [d < p for d in draws]
    a.eval()
    with torch.no_grad():
        assert a.hook(layer, (x,), layer(x)) is not None


def test_network_dropout_is_dropout_on_the_down_output(A):
    p = 0.4
    layer, a = _linear_adapter(A, rank=4, alpha=4.0, network_dropout=p)
    a.train()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    down, up = a.inner.lora_down.weight.detach(), a.inner.lora_up.weight.detach()
    torch.manual_seed(6)
    expected = layer(x) + F.dropout(x @ down.T, p=p) @ up.T
    torch.manual_seed(6)
    with torch.no_grad():
        torch.testing.assert_close(a.hook(layer, (x,), layer(x)), expected.detach())


def _pair(A, up, down, alpha, rank):
    class Inner(torch.nn.Module):
        pass

    inner = Inner()
    inner.lora_up = torch.nn.Linear(rank, up.shape[0], bias=False)
    inner.lora_down = torch.nn.Linear(down.shape[1], rank, bias=False)
    with torch.no_grad():
        inner.lora_up.weight.copy_(up)
        inner.lora_down.weight.copy_(down)
    inner.alpha, inner.rank = alpha, rank
    return type("Adapter", (), {"inner": inner})()


def test_max_norm_scales_only_pairs_above_it_to_exactly_max_norm(A):
    """kohya scale_weight_norms: a pair whose delta (alpha/rank * up @ down) has a norm above max_norm is scaled
    by sqrt(max_norm / norm) each, so the delta's norm becomes max_norm; pairs below stay as they are."""
    g = torch.Generator().manual_seed(0)
    big = _pair(A, torch.randn(5, 2, generator=g), torch.randn(2, 6, generator=g), alpha=1.0, rank=2)
    small = _pair(A, 1e-3 * torch.randn(5, 2, generator=g), torch.randn(2, 6, generator=g), alpha=1.0, rank=2)
    delta = lambda a: (a.inner.lora_up.weight @ a.inner.lora_down.weight) * a.inner.alpha / a.inner.rank  # noqa
    n_big, before_small = float(delta(big).detach().norm()), delta(small).detach().clone()
    max_norm = n_big / 3
    assert float(before_small.norm()) < max_norm
    assert A.ad.apply_max_norm({"a": big, "b": small}, max_norm) == 1
    assert float(delta(big).norm()) == pytest.approx(max_norm, rel=1e-5)
    assert torch.equal(delta(small), before_small)
    # both factors scaled equally (sqrt), not one of them by the whole ratio
    up_norm = float(big.inner.lora_up.weight.norm())
    assert A.ad.apply_max_norm({"a": big}, 0.0) == 0  # 0 = off
    assert float(big.inner.lora_up.weight.norm()) == up_norm
    g = torch.Generator().manual_seed(0)
    up0 = torch.randn(5, 2, generator=g)
    torch.testing.assert_close(big.inner.lora_up.weight.detach(), up0 * math.sqrt(1 / 3), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init,std", [("default", 1 / math.sqrt(256)), ("gaussian", 1 / 8)])
def test_init_down_std_and_zero_up(A, init, std):
    layer = torch.nn.Linear(256, 64)
    a = A.ad.create(layer.weight.detach(), A.C.LoraConfig(rank=8, alpha=8, init=init), torch.Generator().manual_seed(0),
                    layer=layer)
    down = a.inner.lora_down.weight.detach()
    assert float(down.std()) == pytest.approx(std, rel=0.05)
    assert torch.count_nonzero(a.inner.lora_up.weight) == 0
    assert down.shape == (8, 256) and a.inner.lora_up.weight.shape == (64, 8)


def _named_model(comfy):
    import comfy.ops

    ops = comfy.ops.disable_weight_init

    def lin():
        m = ops.Linear(4, 4)
        m.weight = torch.nn.Parameter(torch.zeros(4, 4))
        return m

    root = torch.nn.Module()
    block = torch.nn.Module()
    for attn in ("attn1", "attn2"):
        a = torch.nn.Module()
        for p in ("to_q", "to_k", "to_v"):
            setattr(a, p, lin())
        a.to_out = torch.nn.ModuleList([lin()])
        setattr(block, attn, a)
    block.ff = torch.nn.Module()
    block.ff.net = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Identity(), lin()])
    block.ff.net[0].proj = lin()
    block.proj_in = lin()
    conv = ops.Conv2d(4, 4, 3, padding=1)
    conv.weight = torch.nn.Parameter(torch.zeros(4, 4, 3, 3))
    block.conv = conv
    block.plain = torch.nn.Linear(4, 4)  # no weight_function: never a target
    root.block = block
    return root


def test_presets_include_exclude_select_exact_layers(comfy, A):
    m = _named_model(comfy)
    t = lambda **kw: set(A.ad.target_layers(m, A.C.LoraConfig(**kw)))  # noqa: E731
    attn = {f"block.{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")}
    mlp = {"block.ff.net.0.proj", "block.ff.net.2"}
    assert t(preset="attention") == attn
    assert t(preset="cross-attention") == {n for n in attn if "attn2" in n}
    assert t(preset="attention+mlp") == attn | mlp
    assert t(preset="all-linear") == attn | mlp | {"block.proj_in"}
    assert t(preset="all-linear+conv") == attn | mlp | {"block.proj_in", "block.conv"}
    assert t(algorithm="locon", preset="attention+mlp") == attn | mlp  # locon: convs of the preset only
    assert t(algorithm="locon", preset="all-linear") == attn | mlp | {"block.proj_in", "block.conv"}
    assert t(preset="cross-attention", include=r"proj_in$") == {n for n in attn if "attn2" in n} | {"block.proj_in"}
    assert t(preset="attention", exclude=r"to_k$") == {n for n in attn if not n.endswith("to_k")}
    with pytest.raises(A.C.ConfigError, match=re.escape("preset 'cross-attention' with include 'nothing' and "
                                                        "exclude 'block'")):
        t(preset="cross-attention", include="nothing", exclude="block")


def test_activation_kind_per_layer(A):
    lora = A.C.LoraConfig()
    assert A.ad.activation_kind(torch.nn.Linear(2, 2), lora) == "linear"
    assert A.ad.activation_kind(torch.nn.Conv2d(2, 2, 3, padding=1), lora) == "conv"
    assert A.ad.activation_kind(torch.nn.Conv2d(2, 2, 3, groups=2), lora) is None
    assert A.ad.activation_kind(torch.nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), lora) is None
    assert A.ad.activation_kind(torch.nn.Conv1d(2, 2, 3), lora) is None
    assert A.ad.activation_kind(torch.nn.Linear(2, 2), A.C.LoraConfig(dora=True)) is None
    assert A.ad.activation_kind(torch.nn.Linear(2, 2), A.C.LoraConfig(algorithm="loha")) is None
    assert A.ad.activation_kind(torch.nn.Linear(2, 2), A.C.LoraConfig(algorithm="locon")) == "linear"
    assert A.ad.activation_kind(torch.nn.Identity(), lora) is None


def test_conv_hook_uses_the_layers_geometry(A):
    """LoCon on the activation side: down is a conv with the layer's kernel/stride/padding/dilation, up a 1x1
    conv: equal to the merged weight's convolution."""
    layer = torch.nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2)
    cfg = A.C.LoraConfig(algorithm="locon", rank=2, alpha=1.0, preset="all-linear+conv")
    a = A.ad.create(layer.weight.detach(), cfg, torch.Generator().manual_seed(0), layer=layer)
    with torch.no_grad():
        a.inner.lora_up.weight.copy_(torch.randn(a.inner.lora_up.weight.shape))
    x = torch.randn(2, 3, 9, 9)
    down = a.inner.lora_down.weight.detach().reshape(2, 3, 3, 3)
    up = a.inner.lora_up.weight.detach().reshape(4, 2)
    merged = layer.weight + 0.5 * (up @ down.reshape(2, -1)).reshape(4, 3, 3, 3)
    with torch.no_grad():
        out = a.hook(layer, (x,), layer(x))
        ref = F.conv2d(x, merged, layer.bias, stride=2, padding=2, dilation=2)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_rank_dropout_mask_per_sample_for_tokens_and_convolutions(A):
    """Sequences (B, T, in): one mask per sample over the rank, shared by its tokens, shape (B, 1, r); convolutions
    (B, r, H, W): one per sample and rank channel, shape (B, r, 1, 1)."""
    p = 0.5
    layer, a = _linear_adapter(A, rank=4, alpha=4.0, rank_dropout=p)
    a.train()
    x = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(3))
    down, up = a.inner.lora_down.weight.detach(), a.inner.lora_up.weight.detach()
    torch.manual_seed(8)
    mask = (torch.rand((3, 1, 4)) >= p).float()
    expected = layer(x) + ((x @ down.T) * mask) @ (up / (1 - p)).T
    torch.manual_seed(8)
    with torch.no_grad():
        torch.testing.assert_close(a.hook(layer, (x,), layer(x)), expected.detach())
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    cfg = A.C.LoraConfig(algorithm="locon", rank=2, alpha=2.0, preset="all-linear+conv", rank_dropout=p)
    c = A.ad.create(conv.weight.detach(), cfg, torch.Generator().manual_seed(0), layer=conv)
    with torch.no_grad():
        c.inner.lora_up.weight.copy_(torch.randn(c.inner.lora_up.weight.shape, generator=torch.Generator().manual_seed(2)))
    c.train()
    xc = torch.randn(3, 3, 6, 6)  # batch 3 != rank 2, so a mask over the wrong axis has the wrong shape
    cd, cu = c.inner.lora_down.weight.detach().reshape(2, 3, 3, 3), c.inner.lora_up.weight.detach().reshape(4, 2, 1, 1)
    torch.manual_seed(8)
    cmask = (torch.rand((3, 2, 1, 1)) >= p).float()
    ref = conv(xc) + F.conv2d(F.conv2d(xc, cd, padding=1) * cmask, cu / (1 - p))
    torch.manual_seed(8)
    with torch.no_grad():
        torch.testing.assert_close(c.hook(conv, (xc,), conv(xc)), ref.detach(), rtol=1e-4, atol=1e-5)
