"""Training on the base as the user loaded it (ComfyUI fp8 weight dtypes, scaled fp8), on a quantized base
(Train Init ``quantize``) and with block offload (``offload_blocks``): tiny FLUX.1 and SDXL train with finite,
falling validation loss, and the LoRA maps completely onto the full-precision base. With offload, the adapters
after 10 steps are bit-equal to a run without it (CPU fp32)."""
from __future__ import annotations

import pytest
import torch

from support.factories import families, lowmem

FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def setup(comfy, family_bundle):
    types = comfy.engine("data.types")
    out = {}
    for name in ("flux1-dev", "sdxl"):
        _, clip, vae = family_bundle(name)
        (cond,) = comfy.nodes.CLIPTextEncode().encode(clip, "ohwx, a red circle")
        ch = 16 if name.startswith("flux") else 4
        g = torch.Generator().manual_seed(0)
        samples = (types.Sample("s", torch.randn(ch, 8, 8, generator=g), (types.CaptionVariant("ohwx", cond),),
                                bucket=(64, 64)),)
        out[name] = types.TrainingSet(samples)
    return out


def _train(comfy, model, tset, tmp_path, steps, run_name, validate=True, **settings):
    C = comfy.engine("train.config")
    st = comfy.engine("train.state")
    loop = comfy.engine("train.loop")
    with torch.inference_mode():  # as ComfyUI runs Train Init and Train Steps
        run = loop.init_run(model, tset, C.LoraConfig(rank=4, alpha=4, preset="attention"), C.TimestepConfig(),
                            C.OptimizerConfig(lr=1e-2), st.RunSettings(run_name=run_name, val_timesteps=2, **settings),
                            runs_root=tmp_path)
        before = loop.validation_loss(run) if validate else None
        out = loop.train_steps(run, steps, val_every=steps if validate else 0)
    return before, out


def _check_trained(comfy, family_bundle, name, before, out):
    export = comfy.engine("train.export")
    losses = [h["loss"] for h in out.history]
    after = out.history[-1]["val_loss"]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert after < before, (before, after)
    full, _, _ = family_bundle(name)  # the full-precision base (fp32)
    assert export.unmapped_keys(full, export.kohya_state_dict(out)) == []


@pytest.mark.parametrize("name", ["flux1-dev", "sdxl"])
def test_fp8_e4m3fn_base_trains_as_loaded(comfy, family_bundle, setup, name, tmp_path):
    model = lowmem.build_model(name, FP8)
    dm = model.model.diffusion_model
    linears = [m for m in dm.modules() if isinstance(m, torch.nn.Linear)]
    assert {m.weight.dtype for m in linears} == {FP8}  # the base ComfyUI loaded in fp8 ...
    before, out = _train(comfy, model, setup[name], tmp_path, 4, "fp8")
    _check_trained(comfy, family_bundle, name, before, out)
    assert {m.weight.dtype for m in linears} == {FP8}  # ... stays fp8: nothing was upcast or replaced
    assert all(v.dtype == torch.float32 for v in out.state["adapters"].values())


def test_scaled_fp8_and_e5m2_flux(comfy, family_bundle, setup, tmp_path):
    for dtype, scaled in ((FP8, True), (torch.float8_e5m2, False)):
        model = lowmem.build_model("flux1-dev", dtype, scaled=scaled)
        before, out = _train(comfy, model, setup["flux1-dev"], tmp_path, 4, f"s{scaled}")
        _check_trained(comfy, family_bundle, "flux1-dev", before, out)


def test_weight_side_adapter_on_scaled_fp8_sees_the_real_weight(comfy, setup, tmp_path):
    """LoHa on a scaled-fp8 FLUX.1: a layer computes with ``adapter(W)`` where ``W`` = stored fp8 x scale_weight
    (ComfyUI's cast path would otherwise give the adapter ``W / s`` and scale its delta by ``s``)."""
    import torch.nn.functional as F

    C = comfy.engine("train.config")
    st = comfy.engine("train.state")
    loop = comfy.engine("train.loop")
    model = lowmem.build_model("flux1-dev", FP8, scaled=True)
    run = loop.init_run(model, setup["flux1-dev"], C.LoraConfig(algorithm="loha", rank=4, alpha=4, preset="attention"),
                        C.TimestepConfig(), C.OptimizerConfig(lr=1e-3), st.RunSettings(run_name="loha8"),
                        runs_root=tmp_path)
    with torch.inference_mode(False), torch.no_grad():
        tr = loop.Trainer(run)
        tr.load()
        try:
            dm = tr.patcher.model.diffusion_model
            name, a = next((n, a) for n, a in tr.adapters.items() if float(dm.get_submodule(n).scale_weight) != 1.0)
            g = torch.Generator().manual_seed(3)
            for p in a.inner.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            layer = dm.get_submodule(name)
            x = torch.randn(2, layer.in_features, generator=g)
            real = layer.weight.float() * layer.scale_weight.float()
            expected = F.linear(x, a(real), None if layer.bias is None else layer.bias.float())
            got = layer(x)
        finally:
            tr.release()
    assert not torch.allclose(a(real), real)  # a real delta
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,mode", [("flux1-dev", "int8"), ("flux1-dev", "int4"), ("sdxl", "int8")])
def test_quantized_base_trains_and_is_restored(comfy, family_bundle, setup, name, mode, tmp_path):
    model = families.build_model(name)
    dm = model.model.diffusion_model
    weights = {n: p.detach().clone() for n, p in dm.named_parameters()}
    seen = []
    quantize = comfy.engine("train.quantize")
    orig = quantize.quantize_weight

    def spy(w, m):  # the trainer really computes with quanto weights
        q = orig(w, m)
        seen.append(type(q).__name__)
        return q
    quantize.quantize_weight = spy
    try:
        before, out = _train(comfy, model, setup[name], tmp_path, 4, mode, quantize=mode)
    finally:
        quantize.quantize_weight = orig
    assert seen and set(seen) == {"WeightQBytesTensor" if mode == "int8" else "WeightQBitsTensor"}
    _check_trained(comfy, family_bundle, name, before, out)
    for n, p in dm.named_parameters():  # the shared model is as it was loaded
        assert type(p.data) is torch.Tensor and torch.equal(p, weights[n]), n


def test_quantize_changes_the_forward_but_not_much(comfy, family_bundle):
    """int8 vs int4 vs none on the same input: the quantized forward differs (it is really used), int8 by
    less than int4."""
    quantize = comfy.engine("train.quantize")
    model = families.build_model("flux1-dev")
    dm = model.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.5]), torch.randn(1, 16, 128, generator=g),
            torch.randn(1, 768, generator=g))
    with torch.no_grad():
        ref = dm(*args, guidance=torch.tensor([1.0]))
        err = {}
        for mode in ("int8", "int4"):
            swapped = quantize.Swapped(dm, mode)
            swapped.quantize()
            out = dm(*args, guidance=torch.tensor([1.0]))
            swapped.unquantize()
            swapped.restore()
            err[mode] = float((out - ref).norm() / ref.norm())
        assert torch.equal(dm(*args, guidance=torch.tensor([1.0])), ref)  # restored
    assert 0 < err["int8"] < 0.05 and err["int8"] < err["int4"] < 0.5, err


def test_offload_is_bit_equal_after_10_steps(comfy, family_bundle, setup, tmp_path):
    model = families.build_model("flux1-dev")
    offload = comfy.engine("train.offload")
    calls = []
    orig = offload._Streamer._copy

    def counting(self, i):
        calls.append(i)
        return orig(self, i)
    offload._Streamer._copy = counting
    try:
        _, plain = _train(comfy, model, setup["flux1-dev"], tmp_path, 10, "plain", False, gradient_checkpointing=True)
        assert not calls
        _, off = _train(comfy, model, setup["flux1-dev"], tmp_path, 10, "off", False, gradient_checkpointing=True,
                        offload_blocks=2)
    finally:
        offload._Streamer._copy = orig
    assert len(calls) >= 10 * 2 * 2  # two blocks, streamed in for forward and again for the recomputation
    assert not [n for n, m in model.model.diffusion_model.named_modules() if "forward" in m.__dict__]  # unwrapped
    for k, v in plain.state["adapters"].items():
        assert torch.equal(v, off.state["adapters"][k]), k
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in off.history]


def test_quantized_around_comfyuis_load_and_previews_see_the_full_base(comfy, setup, tmp_path, monkeypatch):
    """``quantize``: when ComfyUI's loader moves the model, the quantized layers' full weights are not in it (on a
    GPU they then never sit on the device together: the load peak is the quantized size); the training steps
    compute with quantized weights; a preview in between sees the base as the user loaded it, and training
    resumes quantized; afterwards ComfyUI no longer counts the model as loaded and the weights are the
    originals."""
    import comfy.model_management as mm

    C = comfy.engine("train.config")
    st = comfy.engine("train.state")
    loop = comfy.engine("train.loop")
    model = families.build_model("flux1-dev")
    dm = model.model.diffusion_model
    linears = [m for m in dm.modules() if isinstance(m, torch.nn.Linear)]
    originals = [m.weight for m in linears]

    def full():
        return sum(type(m.weight.data) is torch.Tensor and m.weight.numel() > 0 for m in linears)

    def quantized():
        return sum(type(m.weight.data).__name__ == "WeightQBytesTensor" for m in linears)

    seen = []
    orig = mm.load_models_gpu

    def spy(models, *a, **k):
        if any(getattr(m, "model", None) is model.model for m in models):
            seen.append(("load", full()))
        return orig(models, *a, **k)

    monkeypatch.setattr(mm, "load_models_gpu", spy)
    with torch.inference_mode():
        run = loop.init_run(model, setup["flux1-dev"], C.LoraConfig(rank=4, alpha=4, preset="attention"),
                            C.TimestepConfig(), C.OptimizerConfig(lr=1e-2), st.RunSettings(run_name="q", quantize="int8"),
                            runs_root=tmp_path)
        loop.train_steps(run, 2, on_step=lambda r, tr: seen.append(("step", quantized())),
                         preview=lambda tr, step: seen.append(("preview", full())), preview_every=1)
    n = len(linears)
    assert seen == [("load", 0), ("step", n), ("preview", n), ("load", 0), ("step", n), ("preview", n),
                    ("load", 0)], seen
    assert all(m.weight is w for m, w in zip(linears, originals))
    assert not any(getattr(lm.model, "model", None) is model.model for lm in mm.current_loaded_models)
    # Train Init's plan counts that load: on an accelerator (offload device elsewhere), the quantized model plus
    # one full layer in flight, not the full model
    memory = comfy.engine("train.memory")
    full = sum(p.numel() * p.element_size() for p in dm.parameters())
    biggest = max(m.weight.numel() * m.weight.element_size() for m in linears)
    q8 = memory.load_bytes(dm, "int8", same_device=False)
    assert memory.load_bytes(dm, "none", same_device=False) == full
    assert memory.weight_bytes(dm, "int8", 0, False) + biggest == q8 < 0.5 * full


def test_quantize_leaves_weight_side_adapter_layers_as_loaded_and_errors_propagate(comfy, setup, tmp_path):
    """With ``quantize``, the layers a weight-side adapter (LoHa) wraps keep their full weight (ComfyUI computes
    their weight per call from it), every other eligible layer is quantized; an error raised during the steps
    comes out of train_steps (the placement scope does not swallow it) and the base is as loaded afterwards."""
    C = comfy.engine("train.config")
    st = comfy.engine("train.state")
    loop = comfy.engine("train.loop")
    model = families.build_model("flux1-dev")
    dm = model.model.diffusion_model
    run = loop.init_run(model, setup["flux1-dev"], C.LoraConfig(algorithm="loha", rank=4, alpha=4, preset="attention"),
                        C.TimestepConfig(), C.OptimizerConfig(lr=1e-3), st.RunSettings(run_name="qloha", quantize="int8"),
                        runs_root=tmp_path)
    seen = {}

    def on_step(r, tr):
        for n, m in dm.named_modules():
            if isinstance(m, torch.nn.Linear):
                seen[n] = (n in tr.adapters, type(m.weight.data) is torch.Tensor and m.weight.numel() > 0)
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        loop.train_steps(run, 2, on_step=on_step)
    wrapped = {n for n, (adapted, _) in seen.items() if adapted}
    assert wrapped and all(seen[n][1] for n in wrapped)  # LoHa layers: full weights
    assert not any(full for n, (adapted, full) in seen.items() if not adapted)  # the rest: quantized
    assert all(type(p.data) is torch.Tensor for p in dm.parameters())
