"""FLUX.2 [dev] trains on a tiny model of ComfyUI's own ``supported_models.Flux2`` (DiT shrunk, 128-channel latents of
the FLUX.2 VAE, conditioning in the layout of its three stacked Mistral layers): finite loss, bit-exact resume; its
resolution shift is the official pipeline's (diffusers ``Flux2Pipeline``: ``compute_empirical_mu`` at the default 50
steps); the saved LoRA is in ai-toolkit's FLUX.2 layout (peft pairs under ``diffusion_model.<original module>``, no
alpha, ``ss_base_model_version flux2``), ComfyUI maps every key, and diffusers' ``Flux2Pipeline.load_lora_weights``
puts it on a diffusers transformer holding the same weights whose output then equals ComfyUI's within 1e-4."""
from __future__ import annotations

import inspect
import math
import types as pytypes

import pytest
import torch
from safetensors import safe_open

from support.factories import diffusers_ref as R
from support.factories import families
from test_interop_diffusers import comfy_unet_out


@pytest.fixture(scope="module")
def flux2(comfy):
    """(MODEL, VAE) of the tiny FLUX.2 [dev]."""
    return families.build_model("flux2-dev"), families.build_vae("flux2-dev")


def _set(T, vae, n=1):
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        with torch.no_grad():
            lat = vae.encode(torch.rand(1, 64, 64, 3, generator=g))[0]
        samples.append(T.types.Sample(f"s{i}", lat, (T.types.CaptionVariant("ohwx", families.flux2_cond(i)),),
                                      bucket=(64, 64)))
    return T.types.TrainingSet(tuple(samples))


def test_flux2_resolution_shift_is_the_pipelines(T, flux2):
    """Timestep Strategy ``flux_resolution`` on FLUX.2 uses FLUX.2's own rule (resolution_shift.json ``Flux2``): mu
    equals diffusers' ``compute_empirical_mu`` of the packed latent's length at ``Flux2Pipeline``'s default step count,
    and the drawn sigmas equal diffusers' exponential time shift, at 512 and 1024 px (ComfyUI's Flux2Scheduler node
    computes the same mu); at 1024 px mu is ComfyUI's own FLUX.2 shift (``supported_models.Flux2`` sampling_settings,
    2.02). FLUX.1 keeps its linear rule."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from comfy_extras.nodes_flux import compute_empirical_mu as comfy_mu
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    model, _ = flux2
    rule = T.ts.resolution_rule(model)
    steps = inspect.signature(Flux2Pipeline.__call__).parameters["num_inference_steps"].default
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    ms = model.get_model_object("model_sampling")
    u = torch.linspace(0.02, 0.98, 25)
    mus = {}
    for px in (512, 1024):
        shape = (1, model.model.latent_format.latent_channels, px // 16, px // 16)  # ComfyUI's FLUX.2 latent
        seq = Flux2Pipeline._pack_latents(torch.zeros(shape)).shape[1]
        mus[px] = T.ts.resolution_mu(rule, shape)
        assert mus[px] == pytest.approx(compute_empirical_mu(seq, steps), abs=1e-9), (px, seq)
        assert mus[px] == pytest.approx(comfy_mu(seq, steps), abs=1e-9)  # ComfyUI's Flux2Scheduler: the same fit
        ours = T.ts.sigmas_for(T.C.TimestepConfig(shift="flux_resolution"), ms, u, shape, rule)
        torch.testing.assert_close(ours, sched.time_shift(mus[px], 1.0, u).float(), atol=1e-6, rtol=0)
    assert mus[512] < mus[1024]
    assert mus[1024] == pytest.approx(model.model.model_config.sampling_settings["shift"], abs=5e-3)
    flux1 = pytypes.SimpleNamespace(model_config=families.model_config("flux1-dev"))
    assert T.ts.resolution_rule(flux1)["rule"] == "linear"


def test_flux2_trains_resumes_and_saves_ai_toolkits_lora(T, flux2, tmp_path, monkeypatch):
    model, vae = flux2
    tset = _set(T, vae)
    tcfg = T.C.TimestepConfig(density="logit_normal", shift="flux_resolution", weighting="sd3_sigma_sqrt")

    def init(name, resume="none"):
        return T.loop.init_run(model, tset, T.C.LoraConfig(rank=4, alpha=2, preset="attention+mlp"), tcfg,
                               T.C.OptimizerConfig(lr=1e-3), T.st.RunSettings(run_name=name, guidance=4.0),
                               runs_root=tmp_path, resume=resume)

    drawn = []  # the training draws' sigmas use FLUX.2's rule (spy on the engine's own function, not on ComfyUI)
    real = T.ts.sigmas_for
    monkeypatch.setattr(T.ts, "sigmas_for", lambda *a: drawn.append(a) or real(*a))
    out = T.loop.train_steps(init("f2"), 2, val_every=2)
    monkeypatch.setattr(T.ts, "sigmas_for", real)
    assert T.ts.resolution_rule(model)["rule"] == "empirical"
    assert len(drawn) >= 2 and all(len(a) == 5 and a[4] == T.ts.resolution_rule(model) for a in drawn), drawn
    losses = [h["loss"] for h in out.history] + [out.history[-1]["val_loss"]]
    assert all(math.isfinite(v) for v in losses), losses
    ups = {k: v for k, v in out.state["adapters"].items() if k.endswith("lora_up.weight")}
    assert any(v.abs().sum() > 0 for v in ups.values())
    # attention+mlp: both streams of the double blocks and the fused single blocks
    for m in ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_mlp.2", "single_blocks.0.linear1",
              "single_blocks.0.linear2"):
        assert f"{m}.lora_up.weight" in ups, (m, sorted(ups))
    assert T.export.unmapped_keys(model, T.export.kohya_state_dict(out)) == []

    path, report = T.export.save_lora(out, "f2", folder=tmp_path / "loras", dtype=torch.float32)
    assert report["unmapped"] == 0
    d = report["diffusers"]
    assert d["checked"] and d["pipeline"] == "Flux2Pipeline" and not d["dropped"] and not d["refused"], d
    with safe_open(str(path), framework="pt") as f:
        keys, md = set(f.keys()), f.metadata()
        sd = {k: f.get_tensor(k) for k in keys}
    # ai-toolkit's FLUX.2 layout: peft pairs under diffusion_model.<original module> (= ComfyUI's), no alpha
    assert all(k.startswith("diffusion_model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in keys
    assert {k.rsplit(".", 2)[0].removeprefix("diffusion_model.") for k in keys} == {k[:-len(".lora_up.weight")] for k in ups}
    assert md["ss_base_model_version"] == "flux2" and "modelspec.prediction_type" not in md
    assert T.export.unmapped_keys(model, sd) == []
    m = "double_blocks.0.img_attn.qkv"  # alpha/rank (2/4) folded into B
    assert torch.allclose(sd[f"diffusion_model.{m}.lora_B.weight"], out.state["adapters"][f"{m}.lora_up.weight"] * 0.5)

    # resume: 1 step, a checkpoint, a new Train Init from it, 1 more == 2 straight
    T.loop.train_steps(init("half"), 1, val_every=2, checkpoint_every=1)
    resumed = T.loop.train_steps(init("half", "latest"), 1, val_every=2)
    assert resumed.step == 2 and [h["loss"] for h in resumed.history] == [h["loss"] for h in out.history]
    for k, v in out.state["adapters"].items():
        assert torch.equal(v, resumed.state["adapters"][k]), k


def test_flux2_lora_loads_in_diffusers_as_in_comfyui(T, flux2, tmp_path):
    """The saved file through diffusers' own FLUX.2 loader (``Flux2Pipeline.load_lora_weights``) on a diffusers
    transformer converted from the same weights: every module of the file gets its adapter, and the output equals
    ComfyUI's with the same file through ComfyUI's stock loader (base outputs equal first)."""
    from diffusers import Flux2Pipeline

    from test_interop_diffusers import _run

    model, vae = flux2
    run = _run(T, model, _set(T, vae), tmp_path, T.C.LoraConfig(rank=4, alpha=2, preset="attention+mlp"), "f2dl")
    path, _ = T.export.save_lora(run, "f2dl", folder=tmp_path / "loras", dtype=torch.float32)
    with safe_open(str(path), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    modules = {k.rsplit(".", 2)[0] for k in sd}

    pipe = R.flux2_pipeline(model.model.diffusion_model.state_dict())
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, families.FLUX2_DIT["in_channels"], 4, 4, generator=g)
    ctx = torch.randn(1, 6, families.FLUX2_DIT["context_in_dim"], generator=g)
    sigma, guidance = torch.tensor([0.6]), torch.tensor([4.0])
    d_in = {"hidden_states": Flux2Pipeline._pack_latents(x), "encoder_hidden_states": ctx, "timestep": sigma,
            "img_ids": Flux2Pipeline._prepare_latent_ids(x), "txt_ids": Flux2Pipeline._prepare_text_ids(ctx),
            "guidance": guidance}
    c_in = {"x": x, "timestep": sigma, "context": ctx, "guidance": guidance}

    def unpack(out):
        return out.permute(0, 2, 1).reshape(x.shape)

    pipe.load_lora_weights(str(path), adapter_name="default_0")
    try:
        # fused qkv: one file module is three diffusers modules (to_q/to_k/to_v)
        loaded = R.lora_modules(pipe.transformer)
        assert len(loaded) >= len(modules) and "transformer_blocks.0.attn.to_q" in loaded, loaded
        with torch.no_grad():
            ours = unpack(pipe.transformer(**d_in).sample)
            pipe.transformer.disable_adapters()
            base = unpack(pipe.transformer(**d_in).sample)
            pipe.transformer.enable_adapters()
            comfy_base = model.model.diffusion_model(**c_in).float()
    finally:
        pipe.unload_lora_weights()
    assert float((base - comfy_base).abs().max()) < 1e-5, "the diffusers transformer must equal ComfyUI's first"
    comfy_out = comfy_unet_out(T, model, sd, **c_in)
    assert (ours - base).abs().max() > 1e-2, "the LoRA must visibly change the output"
    err = float((ours - comfy_out).abs().max())
    assert err < 1e-4, err
