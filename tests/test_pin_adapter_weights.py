"""Weight-side adapter details pinned to hand-built tensors (issue #26): DoRA (the updated weight's input columns
normalised, times the trained magnitude; no change at step 0), the column norm for linear and conv weights,
where adapters are placed and how many bytes they report, seeding from the run's generator only, which layers
the network-dropout refusal names, which dropouts apply on which side, and max-norm's count."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def A(comfy):
    class NS:
        C = comfy.engine("train.config")
        ad = comfy.engine("train.adapters")
    return NS


def _trained(a, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (a.inner.lora_down.weight, a.inner.lora_up.weight):
            p.copy_(torch.randn(p.shape, generator=g))
    return a


def test_input_axis_norm_linear_and_conv(A):
    w = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    n = A.ad.input_axis_norm(w)
    assert n.shape == (1, 3)
    torch.testing.assert_close(n, torch.linalg.vector_norm(w, dim=0, keepdim=True))
    c = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    nc = A.ad.input_axis_norm(c)
    assert nc.shape == (1, 3, 1, 1)
    torch.testing.assert_close(nc, torch.linalg.vector_norm(c, dim=(0, 2, 3), keepdim=True))


@pytest.mark.parametrize("conv", [False, True])
def test_dora_normalises_input_columns_times_magnitude(A, conv):
    W = torch.randn(*((4, 3, 3, 3) if conv else (5, 6)), generator=torch.Generator().manual_seed(2))
    cfg = A.C.LoraConfig(rank=2, alpha=1.0, dora=True, algorithm="locon" if conv else "lora",
                         preset="all-linear+conv" if conv else "attention")
    a = A.ad.create(W, cfg, torch.Generator().manual_seed(0))
    assert a.kind is None  # DoRA runs on the weight side
    dims = (0, 2, 3) if conv else (0,)
    torch.testing.assert_close(a.inner.dora_scale.detach(), torch.linalg.vector_norm(W, dim=dims, keepdim=True))
    with torch.no_grad():
        torch.testing.assert_close(a(W), W)  # step 0: magnitude = column norms, up = 0
    _trained(a)
    with torch.no_grad():
        a.inner.dora_scale.mul_(torch.linspace(0.5, 2.0, W.shape[1]).view(a.inner.dora_scale.shape))
        m = a.inner.dora_scale.detach()
        down, up = a.inner.lora_down.weight.detach(), a.inner.lora_up.weight.detach()
        merged = W + 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(W.shape)
        expected = merged * m / (torch.linalg.vector_norm(merged, dim=dims, keepdim=True) + torch.finfo(W.dtype).eps)
        torch.testing.assert_close(a(W), expected)


@pytest.mark.parametrize("conv", [False, True])
def test_output_axis_dora_is_peft_dora(A, conv):
    """dora_axis 'output' merges the weight exactly as peft's DoRA layer does (the reference implementation that
    diffusers loads): peft's layer is built around the same W, given our down/up and a magnitude away from the
    row norms, and merged; no change at step 0 (magnitude = the base weight's row norms, up = 0)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    g = torch.Generator().manual_seed(4)
    layer = torch.nn.Conv2d(3, 4, 3, bias=False) if conv else torch.nn.Linear(6, 5, bias=False)
    torch.nn.init.normal_(layer.weight, generator=g)
    W = layer.weight.detach().clone()
    cfg = A.C.LoraConfig(rank=2, alpha=1.0, dora=True, dora_axis="output", algorithm="locon" if conv else "lora",
                         preset="all-linear+conv" if conv else "attention")
    plain = A.ad.create(W, A.C.LoraConfig(rank=2, alpha=1.0, dora=False, dora_axis="output", algorithm=cfg.algorithm,
                                          preset=cfg.preset), torch.Generator().manual_seed(0))
    assert not hasattr(plain.inner, "dora_magnitude"), "dora_axis alone must not train a magnitude"
    a = A.ad.create(W, cfg, torch.Generator().manual_seed(0))
    assert a.kind is None and not hasattr(a.inner, "dora_scale")
    torch.testing.assert_close(a.inner.dora_magnitude.detach(), W.flatten(1).norm(dim=1))
    with torch.no_grad():
        torch.testing.assert_close(a(W), W)
    _trained(a)
    with torch.no_grad():
        a.inner.dora_magnitude.mul_(torch.linspace(0.5, 2.0, W.shape[0]))
    model = inject_adapter_in_model(PeftLoraConfig(r=2, lora_alpha=1, use_dora=True, target_modules=["0"]),
                                    torch.nn.Sequential(layer))
    peft_layer = model[0]
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(a.inner.lora_down.weight.reshape(
            peft_layer.lora_A["default"].weight.shape))
        peft_layer.lora_B["default"].weight.copy_(a.inner.lora_up.weight.reshape(
            peft_layer.lora_B["default"].weight.shape))
        peft_layer.lora_magnitude_vector["default"].weight.copy_(a.inner.dora_magnitude.reshape(
            peft_layer.lora_magnitude_vector["default"].weight.shape))
        peft_layer.merge()
        torch.testing.assert_close(a(W), peft_layer.base_layer.weight.detach(), atol=1e-5, rtol=1e-5)
        assert float((a(W) - W).abs().max()) > 1e-2


def test_dora_eps_guards_a_vanishing_column(A):
    """A column whose norm is far below float eps: w * m / (norm + eps), finite and of the column's sign."""
    W = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
    W[:, 1] = 1e-9
    a = A.ad.create(W, A.C.LoraConfig(rank=2, alpha=2.0, dora=True), torch.Generator().manual_seed(0))
    with torch.no_grad():
        a.inner.dora_scale.fill_(1.0)
        out = a(W)
    eps = torch.finfo(torch.float32).eps
    norm = float(torch.linalg.vector_norm(W[:, 1]))
    torch.testing.assert_close(out[:, 1], W[:, 1] / (norm + eps))
    assert (out[:, 1] > 0).all()


def test_move_to_places_parameters_in_place_and_counts_bytes(A):
    a = A.ad.create(torch.zeros(5, 6), A.C.LoraConfig(rank=2), torch.Generator().manual_seed(0))
    params = list(a.inner.parameters())
    size = sum(p.numel() * 4 for p in params)  # float32
    assert size >= (2 * 6 + 5 * 2) * 4
    assert a.move_to("meta") == size
    assert all(p.device.type == "meta" for p in a.inner.parameters())
    b = A.ad.create(torch.zeros(5, 6), A.C.LoraConfig(rank=2), torch.Generator().manual_seed(0), device="meta")
    assert all(p.device.type == "meta" for p in b.inner.parameters())
    c = A.ad.create(torch.zeros(5, 6), A.C.LoraConfig(rank=2), torch.Generator().manual_seed(0))
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in c.inner.parameters())


@pytest.mark.parametrize("algorithm", ["lora", "loha", "lokr"])
def test_init_follows_the_run_generator_only(A, algorithm):
    """The same generator seed gives the same adapter whatever the global RNG holds; another seed another
    adapter; the global RNG is left as it was."""
    cfg = A.C.LoraConfig(algorithm=algorithm, rank=2, alpha=1.0)

    def make(seed, global_seed):
        torch.manual_seed(global_seed)
        a = A.ad.create(torch.zeros(6, 8), cfg, torch.Generator().manual_seed(seed))
        return [p.detach().clone() for p in a.inner.parameters()], torch.rand(3)

    (a1, after1), (a2, after2), (b, _) = make(1, 100), make(1, 200), make(2, 100)
    assert all(torch.equal(x, y) for x, y in zip(a1, a2))
    assert any(not torch.equal(x, y) for x, y in zip(a1, b))
    torch.manual_seed(100)
    assert torch.equal(after1, torch.rand(3))  # the global stream continues as if create had not run


def test_network_dropout_refusal_names_the_weight_side_layers(A):
    cfg = A.C.LoraConfig(network_dropout=0.1)
    with pytest.raises(A.C.ConfigError, match=r"but 1 target layer\(s\) \(e.g. 'b.conv'\)"):
        A.ad.refuse_network_dropout_on_weights(cfg, {"a.lin": "linear", "b.conv": None, "c.lin": "linear"})
    A.ad.refuse_network_dropout_on_weights(cfg, {"a.lin": "linear", "c": "conv"})
    A.ad.refuse_network_dropout_on_weights(A.C.LoraConfig(), {"a.lin": "linear", "b.conv": None})


def test_dropouts_that_do_not_apply_on_a_side_are_off(A):
    """LoHa/LoKr have no rank dropout; network dropout only exists on the activation side."""
    W = torch.randn(5, 6, generator=torch.Generator().manual_seed(4))
    loha = A.ad.create(W, A.C.LoraConfig(algorithm="loha", rank=2, rank_dropout=0.5), torch.Generator().manual_seed(0))
    weight_lora = A.ad.create(W, A.C.LoraConfig(rank=2, network_dropout=0.5), torch.Generator().manual_seed(0))
    assert (loha.rank_dropout, loha.network_dropout, weight_lora.network_dropout) == (0.0, 0.0, 0.0)
    loha.train()
    with torch.no_grad():
        for p in loha.inner.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
        torch.testing.assert_close(loha(W), loha.inner(W))  # training forward = the plain LoHa merge
    layer = torch.nn.Linear(6, 5)
    act = A.ad.create(layer.weight.detach(), A.C.LoraConfig(rank=2, network_dropout=0.5), torch.Generator().manual_seed(0),
                      layer=layer)
    assert act.network_dropout == 0.5 and act.rank_dropout == 0.0
    assert A.ad.activation_kind(torch.nn.Embedding(4, 3), A.C.LoraConfig()) is None  # 2-D weight, not a Linear


def test_max_norm_skips_non_lora_adapters_and_counts(A):
    W = torch.zeros(5, 6)
    loha = A.ad.create(W, A.C.LoraConfig(algorithm="loha", rank=2), torch.Generator().manual_seed(0))
    pairs = [_trained(A.ad.create(W, A.C.LoraConfig(rank=2, alpha=2.0), torch.Generator().manual_seed(i)), i)
             for i in range(3)]
    adapters = {"a_loha": loha, **{f"lora{i}": p for i, p in enumerate(pairs)}}
    norms = [float((p.inner.lora_up.weight @ p.inner.lora_down.weight).norm()) for p in pairs]
    limit = sorted(norms)[0] * 1.01  # all but the smallest are above it
    assert A.ad.apply_max_norm(adapters, limit) == 2
    after = [float((p.inner.lora_up.weight @ p.inner.lora_down.weight).norm()) for p in pairs]
    assert max(after) == pytest.approx(limit, rel=1e-5) and min(after) == pytest.approx(min(norms), rel=1e-6)
    assert A.ad.apply_max_norm(adapters, 0.0) == 0
    assert A.ad.apply_max_norm({"a_loha": loha}, 1e-9) == 0  # no LoRA pair: nothing to scale, none counted


def test_conv1d_layers_are_targets_with_conv(comfy, A):
    import comfy.ops

    ops = comfy.ops.disable_weight_init
    net = torch.nn.Module()
    net.lin = ops.Linear(4, 4)
    net.c1 = ops.Conv1d(4, 4, 3)
    net.c2 = ops.Conv2d(4, 4, 3)
    assert A.ad.target_layers(net, A.C.LoraConfig(preset="all-linear")) == ["lin"]
    assert A.ad.target_layers(net, A.C.LoraConfig(preset="all-linear+conv", algorithm="locon")) == ["lin", "c1", "c2"]
