"""Wan 2.2 on tiny models from ComfyUI's own classes (support.factories.wan22): the A14B expert pair, each expert
trained inside its part of the schedule at the official boundary; the TI2V 5B with 48-channel latents of the
Wan 2.2 VAE; musubi-tuner's metadata on Wan LoRAs; the memory plan on video latents."""
from __future__ import annotations

import importlib
import math

import pytest
import torch
from safetensors import safe_open

from support.factories import te_wan, wan, wan22
from test_memory_plan import measured_peak

RANK = dict(rank=4, alpha=4, preset="attention")


@pytest.fixture(scope="module")
def clip(comfy):
    return te_wan.wan_clip()


def _training_set(comfy, clip, latents):
    types = comfy.engine("data.types")
    samples = []
    for i, lat in enumerate(latents):
        cap = f"ohwx clip {i}"
        (cond,) = comfy.nodes.CLIPTextEncode().encode(clip, cap)
        samples.append(types.Sample(f"c{i}", lat, (types.CaptionVariant(cap, cond),), bucket=(32, 32)))
    report = {"images": len(samples), "resolution": 32, "dataset_dirs": {"clips": {"n_repeats": 1, "img_count": 2}},
              "tag_frequency_by_dir": {"clips": {"ohwx": 2}}}
    return types.TrainingSet(tuple(samples), meta={"report": report})


@pytest.fixture(scope="module")
def clips_a14b(comfy, clip):
    """Two 5-frame 32 px clips through the tiny Wan 2.1 VAE (the A14B experts share Wan 2.1's VAE)."""
    vae, g = wan.build_vae(), torch.Generator().manual_seed(0)
    with torch.no_grad():
        lats = [vae.encode(torch.rand(5, 32, 32, 3, generator=g))[0] for _ in range(2)]
    return _training_set(comfy, clip, lats)


def _reference_high(sigma: torch.Tensor, boundary_ratio: float, shift: float) -> torch.Tensor:
    """diffusers WanPipeline.__call__: transformer (high noise) runs while t >= boundary_ratio *
    num_train_timesteps, t being the flow scheduler's timestep (sigma * num_train_timesteps) on the shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    return sigma * sched.config.num_train_timesteps >= boundary_ratio * sched.config.num_train_timesteps


@pytest.mark.parametrize("expert,shift", [("high_noise", None), ("low_noise", 12.0)])
def test_wan22_expert_trains_in_its_window_and_resumes_exactly(comfy, clip, clips_a14b, expert, shift, tmp_path):
    """Each expert of the tiny A14B pair (WAN21_T2V, as ComfyUI loads the real files) with Timestep Strategy's
    default boundary (0: the model's official one, experts.json -> 0.875): every sigma the trainer draws is on the
    expert's side as diffusers' WanPipeline decides it (t >= boundary_ratio * 1000 on the model's own shift: the
    config's 8, or 12 set by the stock ModelSamplingSD3 node), and the window covers that side whole (the share of
    the scheduler's 1000 training timesteps there). 2 steps have finite loss, the LoRA maps with 0 unmapped keys,
    and Train Init resuming the step-1 checkpoint + 1 step equals the 2 straight steps bit for bit."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sm = importlib.import_module("comfy.supported_models")
    C, st, loop, export, ts_mod = (comfy.engine(m) for m in ("train.config", "train.state", "train.loop",
                                                               "train.export", "train.timesteps"))
    model = (wan22.HIGH if expert == "high_noise" else wan22.LOW).build_model()  # one expert of the pair
    if shift is not None:
        (model,) = importlib.import_module("comfy_extras.nodes_model_advanced").ModelSamplingSD3().patch(model, shift)
    assert isinstance(model.model.model_config, sm.WAN21_T2V)
    ms = model.get_model_object("model_sampling")
    assert float(ms.shift) == (shift or sm.WAN21_T2V.sampling_settings["shift"])
    tcfg = C.TimestepConfig(shift="model", expert=expert)
    assert tcfg.expert_boundary == 0

    def init(resume="none"):
        return loop.init_run(model, clips_a14b, C.LoraConfig(**RANK), tcfg,
                             C.OptimizerConfig(lr=1e-3, scheduler="cosine", total_steps=2),
                             st.RunSettings(run_name=expert, val_count=0), runs_root=tmp_path, resume=resume)

    run = init()
    assert run.timesteps.expert_boundary == 0.875
    trainer = loop.Trainer(run)
    sig = torch.cat([trainer.draw_micro_batch().sigma for _ in range(48)])
    on_high = _reference_high(sig, 0.875, float(ms.shift))
    assert bool(on_high.all()) if expert == "high_noise" else not bool(on_high.any()), sig
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(ms.shift))
    share = float((sched.timesteps >= 875).float().mean())
    b = ts_mod.boundary_u(lambda x: ts_mod.sigmas_for(C.TimestepConfig(shift="model"), ms, x, None), 0.875)
    assert abs((1 - b if expert == "high_noise" else b) - (share if expert == "high_noise" else 1 - share)) < 2e-3

    full = loop.train_steps(run, 2, checkpoint_every=1, keep_last=2)
    losses = [h["loss"] for h in full.history]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
    assert any(v.abs().sum() > 0 for k, v in full.state["adapters"].items() if "lora_up" in k)
    sd = export.kohya_state_dict(full)
    assert "lora_unet_blocks_0_self_attn_q.lora_down.weight" in sd and export.unmapped_keys(model, sd) == []
    resumed = init(f"{expert}/checkpoints/step_0000001.safetensors")
    assert resumed.step == 1 and resumed.timesteps.expert_boundary == 0.875
    done = loop.train_steps(resumed, 1)
    assert [(h["loss"], h["lr"]) for h in done.history] == [(h["loss"], h["lr"]) for h in full.history]
    assert all(torch.equal(v, done.state["adapters"][k]) for k, v in full.state["adapters"].items())


def test_expert_boundary_comes_from_the_model_and_is_refused_where_there_is_none(comfy, sd15):
    """experts.json: I2V A14B (WAN21_I2V) splits at 0.9; a value set by hand is kept; the TI2V 5B (WAN22_T2V, one
    model) and an eps model (SD1.5) refuse an expert with a message naming the model and the fix."""
    sm = importlib.import_module("comfy.supported_models")
    C, experts = comfy.engine("train.config"), comfy.engine("train.experts")
    high = C.TimestepConfig(shift="model", expert="high_noise")
    i2v = sm.WAN21_I2V(dict(wan.WAN21_DIT, in_dim=36, model_type="i2v")).get_model({}, "", device="cpu")  # no weights
    assert experts.resolve(high, i2v).expert_boundary == 0.9 and experts.facts(i2v)["config_class"] == "WAN21_I2V"
    model = wan22.HIGH.build_model()
    assert experts.resolve(C.TimestepConfig(expert="low_noise", expert_boundary=0.8), model).expert_boundary == 0.8
    assert experts.resolve(C.TimestepConfig(), model).expert_boundary == 0  # no expert: untouched
    with pytest.raises(C.ConfigError, match=r"WAN22_T2V \(Wan 2\.2 TI2V 5B.*set expert to none"):
        experts.resolve(high, wan22.ti2v_model())
    with pytest.raises(C.ConfigError, match=r"\(SD15\) is not a flow model: set expert to none"):
        experts.resolve(high, sd15[0])


def test_wan22_ti2v_5b_trains_on_48_channel_latents_and_maps(comfy, clip, tmp_path):
    """The tiny TI2V 5B (WAN22_T2V, model_base.WAN22) on latents of ComfyUI's Wan 2.2 VAE (48 channels, 16x):
    text-to-video training (flow target on the model's shift 8) with finite loss; its LoRA maps with 0 unmapped
    keys and carries musubi-tuner's Wan metadata; 1 step + checkpoint + resumed Train Init + 1 step equals the 2
    straight steps bit for bit; the memory plan names the clips' pixel size."""
    sm = importlib.import_module("comfy.supported_models")
    C, st, loop, export = (comfy.engine(m) for m in ("train.config", "train.state", "train.loop", "train.export"))
    model = wan22.ti2v_model()
    assert isinstance(model.model.model_config, sm.WAN22_T2V)
    assert type(model.model).__name__ == "WAN22" and model.model.latent_format.latent_channels == 48
    with torch.no_grad():  # one 5-frame 32 px clip, pixels in [-1, 1] as comfy.sd.VAE.encode hands them over
        pixels = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
        lat = wan22.ti2v_vae().encode(pixels)[0]
    assert tuple(lat.shape) == (48, 2, 32 // wan22.SPATIAL, 32 // wan22.SPATIAL)
    tset = _training_set(comfy, clip, [lat])

    def init(name, resume="none"):
        return loop.init_run(model, tset, C.LoraConfig(rank=4, alpha=4, preset="attention+mlp"),
                             C.TimestepConfig(shift="model"), C.OptimizerConfig(lr=1e-3),
                             st.RunSettings(run_name=name, val_count=0), runs_root=tmp_path, resume=resume)

    run = init("ti2v")
    # the memory plan names the clip's pixel size (its bucket, 32 px), not the latents' 2 px times an assumed 8
    assert "resolution 32x32" in run.meta["memory_plan"], run.meta["memory_plan"]
    out = loop.train_steps(run, 2)
    # resume is exact: 1 step, a checkpoint, a new Train Init from it, 1 more == the 2 straight steps bit for bit
    loop.train_steps(init("half"), 1, checkpoint_every=1)
    resumed = loop.train_steps(init("half", "latest"), 1)
    assert resumed.step == 2 and [h["loss"] for h in resumed.history] == [h["loss"] for h in out.history]
    assert all(torch.equal(v, resumed.state["adapters"][k]) for k, v in out.state["adapters"].items())
    assert all(math.isfinite(h["loss"]) for h in out.history) and len(out.history) == 2
    assert any(v.abs().sum() > 0 for k, v in out.state["adapters"].items() if "lora_up" in k)
    sd = export.kohya_state_dict(out)
    assert "lora_unet_blocks_1_ffn_2.lora_up.weight" in sd and export.unmapped_keys(model, sd) == []
    path, _ = export.save_lora(out, "wan22_5b", folder=tmp_path / "loras")
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
    assert (md["ss_base_model_version"], md["ss_network_module"]) == ("wan", "networks.lora_wan")
    assert (md["modelspec.architecture"], md["modelspec.implementation"]) == (
        "wan2.1/lora", "https://github.com/Wan-Video/Wan2.1")
    assert "modelspec.prediction_type" not in md and md["modelspec.resolution"] == "32x32"


def test_memory_plan_counts_the_frames_of_video_latents(comfy, clip, tmp_path):
    """The memory plan (what Train Init computes with a budget set: probe, then plan) on the tiny Wan 2.1 T2V with a
    13-frame clip (4 latent frames) at a latent area larger than the probes': the probes keep the frame count, so
    the estimate is within 15 % of the peak measured on the CPU during a real first step on that clip (weights +
    live bytes). A probe that dropped the frames would count about a quarter of the activations (a one-frame
    probe gave 0.37 of the measured peak, 2026-12-01)."""
    C, st, loop, memory = (comfy.engine(m) for m in ("train.config", "train.state", "train.loop", "train.memory"))
    shape = (16, 4, 20, 20)
    tset = _training_set(comfy, clip, [torch.randn(shape, generator=torch.Generator().manual_seed(3))])
    run = loop.init_run(wan.build_model(), tset, C.LoraConfig(**RANK), C.TimestepConfig(shift="model"),
                        C.OptimizerConfig(lr=1e-3), st.RunSettings(run_name="mem", val_count=0), runs_root=tmp_path)
    assert all(s[1] == 4 and s[-1] * s[-2] < 400 for s in memory._probe_shapes(shape))
    with torch.inference_mode(False):
        tr = loop.Trainer(run)
        tr.load()
        dm = tr.patcher.model.diffusion_model
        plan, acts = memory.plan(tr, acts=memory.probe(tr, shape))
        assert acts.probed
        measured = measured_peak(memory, tr)
    assert plan.weights == sum(t.numel() * t.element_size() for t in [*dm.parameters(), *dm.buffers()])
    assert abs(plan.total - measured) / measured < 0.15, (plan.text(), measured)


def test_ti2v_5b_preview_decodes_at_the_size_asked(comfy, clip):
    """A Wan 2.2 ``comfy.sd.VAE`` (ComfyUI's detection: 48 channels, 16x spatial, 4x temporal;
    support.factories.wan22.ti2v_comfy_vae) with the tiny TI2V 5B: the empty latent at 64x32 is the stock
    Wan22ImageToVideoLatent's (no start image) for lengths 1, 4, 5, 9, and Sample Preview (frames 5, 32x32) decodes
    exactly 5 x 32 x 32 (an 8x latent decodes at 64x64). The Wan 2.2 VAE on a 16-channel Wan 2.1 model is refused naming both counts, a size
    below one latent pixel and a missing VAE by name."""
    import comfy_extras.nodes_wan as nw

    render = comfy.engine("sampling.render")
    model, vae = wan22.ti2v_model(), wan22.ti2v_comfy_vae()
    assert render.latent_geometry(vae) == (48, 16, 4)
    w, h, frames = 64, 32, 5
    for n in (1, 4, 5, 9):
        stock = nw.Wan22ImageToVideoLatent.execute(vae, w, h, n, 1).result[0]["samples"]
        got = render.empty_latent(model, vae, render.SampleSettings(width=w, height=h, frames=n))
        assert got.shape == stock.shape and not got.any(), n
    kw = dict(prompts="ohwx walking", negative="", seed=3, seed_mode="fixed", steps=1, cfg=1.0, guidance=3.5,
              sampler_name="euler", scheduler="simple", width=32, height=32, step=0)  # 32 px: a decode costs seconds
    with torch.inference_mode():
        _, cells = comfy.call_full("AlignedTrainer_SamplePreview", model=model, clip=clip, vae=vae, frames=frames,
                                   fps=16.0, **kw).args
    assert tuple(cells.shape) == (frames, 32, 32, 3) and torch.isfinite(cells).all()
    with pytest.raises(ValueError, match="VAE makes 48-channel latents but the model .* takes 16"):
        render.empty_latent(wan.build_model(), vae, render.SampleSettings(width=w, height=h, frames=frames))
    assert tuple(render.empty_latent(model, vae, render.SampleSettings(width=16, height=16, frames=5)).shape) == (
        1, 48, 2, 1, 1)  # one latent pixel is enough
    with pytest.raises(ValueError, match=r"width x height 8x32 is below one latent pixel of this VAE \(16 px\)"):
        render.empty_latent(model, vae, render.SampleSettings(width=8, height=32))
    with pytest.raises(ValueError, match=r"the VAE \(NoneType\) gives no latent size"):
        render.empty_latent(model, None, render.SampleSettings(width=w, height=h))


def test_wan_block_offload_and_fp8_base_train_as_on_image_models(comfy, clip, clips_a14b, tmp_path):
    """Issue #21 item 4 ("memory plan and offload as in #19"): on the tiny Wan 2.1 T2V, Train Init's offload_blocks
    streams the last blocks in for each forward and recomputation and gives the same adapters and losses bit for
    bit (CPU fp32, 4 steps, gradient checkpointing); an fp8 (e4m3fn) copy of the base trains with finite loss and
    its LoRA maps completely onto the full-precision model."""
    C, st, loop, offload, export = (comfy.engine(m) for m in ("train.config", "train.state", "train.loop",
                                                              "train.offload", "train.export"))
    model = wan.build_model()

    def train(name, m, **settings):
        with torch.inference_mode():  # as ComfyUI runs Train Init and Train Steps
            run = loop.init_run(m, clips_a14b, C.LoraConfig(**RANK), C.TimestepConfig(shift="model"),
                                C.OptimizerConfig(lr=1e-2), st.RunSettings(run_name=name, val_count=0, seed=5,
                                                                           gradient_checkpointing=True, **settings),
                                runs_root=tmp_path)
            return loop.train_steps(run, 4)

    calls = []
    orig = offload._Streamer._copy

    def counting(self, i):
        calls.append(i)
        return orig(self, i)

    plain = train("plain", model)
    offload._Streamer._copy = counting
    try:
        off = train("off", model, offload_blocks=1)
    finally:
        offload._Streamer._copy = orig
    assert len(calls) >= 4 * 2  # one block, streamed in for the forward and again for the recomputation
    assert plain.state["adapters"].keys() == off.state["adapters"].keys()
    for k, v in plain.state["adapters"].items():
        assert torch.equal(v, off.state["adapters"][k]), k
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in off.history]
    fp8 = wan.build_model(weight_dtype=torch.float8_e4m3fn)  # as UNETLoader's weight_dtype loads it
    assert any(p.dtype == torch.float8_e4m3fn for p in fp8.model.diffusion_model.parameters())
    out = train("fp8", fp8)
    assert all(math.isfinite(h["loss"]) for h in out.history)
    assert export.unmapped_keys(model, export.kohya_state_dict(out)) == []
