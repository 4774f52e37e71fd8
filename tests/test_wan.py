"""Tiny Wan 2.1 T2V from ComfyUI's own classes (support.factories.wan): the stock nodes encode, sample and decode
a short clip with it, and the trainer trains it on video latents."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from support.factories import te_wan, wan

FRAMES, SIZE = 5, 32  # 4k+1 frames -> k+1 latent frames; 32 px -> 4x4 latents


@pytest.fixture(scope="module")
def bundle(comfy):
    return wan.build()


def test_stock_nodes_run_on_tiny_wan(comfy, bundle):
    """CLIPTextEncode -> common_ksampler -> VAEDecode, and VAEEncode of a clip: shapes follow Wan's 4x temporal
    and 8x spatial compression; the model's sampling is ComfyUI's flow with the config's shift."""
    import importlib

    sm = importlib.import_module("comfy.supported_models")
    sampling = importlib.import_module("comfy.model_sampling")
    model, clip, vae = bundle
    assert isinstance(model.model.model_config, sm.WAN21_T2V)
    ms = model.get_model_object("model_sampling")
    assert isinstance(ms, sampling.CONST) and ms.shift == sm.WAN21_T2V.sampling_settings["shift"]
    n = comfy.nodes
    (pos,) = n.CLIPTextEncode().encode(clip, "ohwx, a red circle moving right")
    assert pos[0][0].shape[-1] == te_wan.UMT5_SHRINK["d_model"]
    k = (FRAMES - 1) // wan.TEMPORAL + 1
    lat = {"samples": torch.zeros(1, 16, k, SIZE // wan.SPATIAL, SIZE // wan.SPATIAL)}
    (out,) = n.common_ksampler(model, 1, 2, 1.0, "euler", "simple", pos, pos, lat)
    assert out["samples"].shape == lat["samples"].shape and torch.isfinite(out["samples"]).all()
    (video,) = n.VAEDecode().decode(vae, out)
    assert tuple(video.shape) == (FRAMES, SIZE, SIZE, 3) and torch.isfinite(video).all()
    (enc,) = n.VAEEncode().encode(vae, torch.rand(FRAMES, SIZE, SIZE, 3))
    assert tuple(enc["samples"].shape) == (1, 16, k, SIZE // wan.SPATIAL, SIZE // wan.SPATIAL)


@pytest.fixture(scope="module")
def video_set(comfy, bundle, tmp_path_factory):
    """Two 12-frame clips (16 fps) and a still image, sampled to 5 frames, latents through the tiny Wan VAE."""
    from PIL import Image

    from support.factories import clips

    V, caps, bk, cache = (comfy.engine(m) for m in ("data.video", "data.captions", "data.buckets", "data.cache"))
    base = tmp_path_factory.mktemp("wan_video")
    clips.write_clip(base / "data" / "walk.mp4", 12, 16, caption="ohwx walking")
    clips.write_clip(base / "data" / "turn", 12, 16, caption="ohwx turning")  # a folder of frames
    Image.fromarray(clips.frame(5, (SIZE, SIZE))).save(base / "data" / "still.png")
    cfg = V.VideoConfig(frames=FRAMES, fps=16.0)
    ds = V.from_video_folder(base / "data", caps.CaptionConfig(), bk.BucketConfig(resolution=SIZE, min_side=SIZE,
                             max_side=SIZE, step=SIZE), cfg)
    return {"V": V, "cache": cache, "ds": ds, "root": base / "cache", "base": base,
            "latents": cache.cache_latents(ds, bundle[2], base / "cache")}


def test_video_latents_through_wan_vae_are_cached_by_their_sampling(comfy, bundle, video_set):
    """Clips give (16, k+1, h, w) latents, the still image one latent frame; a second pass reads every entry from
    the cache (verified digests), and another fps samples other frames, so it misses."""
    lc, cache, ds = video_set["latents"], video_set["cache"], video_set["ds"]
    shapes = {i.source.rsplit("/", 1)[-1]: tuple(l.shape) for i, l in zip(ds.items, lc.latents)}
    k, s = (FRAMES - 1) // wan.TEMPORAL + 1, SIZE // wan.SPATIAL
    assert shapes == {"walk.mp4": (16, k, s, s), "turn": (16, k, s, s), "still.png": (16, 1, s, s)}
    assert lc.stats[1] == 3
    again = cache.cache_latents(ds, bundle[2], video_set["root"])
    assert again.stats[:2] == (3, 0) and all(torch.equal(a, b) for a, b in zip(again.latents, lc.latents))
    V = video_set["V"]
    slow = V.from_video_folder(video_set["base"] / "data", ds.caption_cfg, ds.bucket_cfg,
                               V.VideoConfig(frames=FRAMES, fps=8.0))
    other = cache.cache_latents(slow, bundle[2], video_set["root"])
    assert other.stats[:2] == (1, 2)  # the image is the same; both clips sample other frames


def test_wan_trains_on_video_with_its_shift_and_maps_in_comfyui(comfy, bundle, video_set, tmp_path):
    """The flow target on the model's own schedule (WAN21_T2V: shift 8), finite loss on video and image latents
    (batched by latent shape), and a LoRA ComfyUI's loader maps with 0 unmapped keys, named as musubi-tuner
    names Wan LoRAs (kohya form of the original module names: lora_unet_blocks_0_self_attn_q)."""
    import importlib

    sm = importlib.import_module("comfy.supported_models")
    model, clip, _ = bundle
    C, st, loop, export, ts_mod = (comfy.engine(m) for m in ("train.config", "train.state", "train.loop",
                                                               "train.export", "train.timesteps"))
    shift = sm.WAN21_T2V.sampling_settings["shift"]
    u = torch.tensor([0.1, 0.5, 0.9])
    sig = ts_mod.sigmas_for(C.TimestepConfig(shift="model"), model.get_model_object("model_sampling"), u, None)
    assert torch.allclose(sig, shift * u / (1 + (shift - 1) * u), atol=1e-4)
    align = comfy.engine("te.align")
    ts, _ = video_set["cache"].cache_text(video_set["latents"], align.align_clip(clip, "wan"), video_set["root"],
                                          unload=False)
    assert ts.te_spec_id == "wan" and ts.samples[0].captions[0].conditioning[0][0].shape[1] == 512
    run = loop.init_run(model, ts, C.LoraConfig(rank=4, alpha=4, preset="attention"), C.TimestepConfig(shift="model"),
                        C.OptimizerConfig(lr=1e-3), st.RunSettings(run_name="wan", val_count=0), runs_root=tmp_path)
    out = loop.train_steps(run, 2)
    losses = [h["loss"] for h in out.history]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses
    assert any(v.abs().sum() > 0 for k, v in out.state["adapters"].items() if "lora_up" in k)
    sd = export.kohya_state_dict(out)
    assert "lora_unet_blocks_0_self_attn_q.lora_down.weight" in sd
    assert "lora_unet_blocks_1_cross_attn_o.lora_up.weight" in sd
    assert export.unmapped_keys(model, sd) == []


@pytest.mark.parametrize("expert", ["high_noise", "low_noise"])
def test_wan22_expert_window_splits_the_shifted_schedule_where_diffusers_does(comfy, bundle, expert):
    """Wan 2.2 A14B experts: diffusers' WanPipeline runs the high-noise transformer while the scheduler's timestep
    t >= boundary_ratio * 1000 (t = 1000 * shifted sigma). The expert window keeps every training sigma on its
    side of 0.875 and covers that side whole: its share of uniform draws equals the share of diffusers' 1000
    training timesteps (FlowMatchEulerDiscreteScheduler with the model's shift) on that side."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    C, ts_mod = comfy.engine("train.config"), comfy.engine("train.timesteps")
    ms = bundle[0].get_model_object("model_sampling")
    cfg = C.TimestepConfig(shift="model", expert=expert, expert_boundary=0.875)
    cfg.validate()
    u = torch.linspace(1e-4, 1 - 1e-4, 401)
    sig = ts_mod.sigmas_for(cfg, ms, u, None)
    high = sig * 1000 >= 875 - 1e-3
    assert bool(high.all()) if expert == "high_noise" else not bool(high[:-1].any())
    assert abs(float(sig.min() if expert == "high_noise" else sig.max()) - 0.875) < 2e-3
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(ms.shift))
    share = float((sched.timesteps >= 875).float().mean())
    b = ts_mod.boundary_u(lambda x: ts_mod.sigmas_for(C.TimestepConfig(shift="model"), ms, x, None), 0.875)
    assert abs((1 - b) - share) < 2e-3
    with pytest.raises(C.ConfigError, match="expert_boundary"):
        C.TimestepConfig(expert=expert, expert_boundary=1.5).validate()


def test_pyramid_noise_on_video_latents_is_refused_by_name(comfy):
    """multires noise is built for 4-D image latents; on 5-D video latents it says so instead of a torch error."""
    C, ts_mod = comfy.engine("train.config"), comfy.engine("train.timesteps")
    cfg = C.TimestepConfig(multires_iterations=2)
    with pytest.raises(C.ConfigError, match="multires_iterations"):
        ts_mod.training_noise(cfg, torch.zeros(1, 16, 2, 4, 4), torch.Generator().manual_seed(0))
    assert ts_mod.training_noise(C.TimestepConfig(), torch.zeros(1, 16, 2, 4, 4),
                                 torch.Generator().manual_seed(0)).shape == (1, 16, 2, 4, 4)


def test_sample_preview_of_a_clip_is_an_animated_webp_of_the_stock_decode(comfy, bundle):
    """Sample Preview with frames > 1 on the tiny Wan 2.1 (run as the executor runs it, in inference mode): its UI
    shows one animated WebP from ComfyUI's output folder, shaped as SaveAnimatedWEBP's; PIL reads it as the clip's
    frames at the grid's size, each frame equal to the node's grid rounded to 8 bits, and the clip inside equals
    the stock path EmptyHunyuanLatentVideo -> KSampler -> VAEDecode on the same model, prompt and seed."""
    import folder_paths
    import numpy as np
    from PIL import Image

    model, clip, vae = bundle
    n = comfy.nodes
    size, frames = 16, 5  # 16 px: the engine's sampler, below the node widget's 64 px floor, to keep the test fast
    kw = dict(prompts="ohwx walking", negative="", seed=3, seed_mode="fixed", steps=2, cfg=1.0, guidance=3.5,
              sampler_name="euler", scheduler="simple", width=size, height=size, step=0)
    with torch.inference_mode():
        out = comfy.call_full("AlignedTrainer_SamplePreview", model=model, clip=clip, vae=vae, frames=frames,
                              fps=16.0, **kw)
        grid, cells = out.args
        (pos,) = n.CLIPTextEncode().encode(clip, "ohwx walking")
        latent = {"samples": torch.zeros(1, 16, (frames - 1) // wan.TEMPORAL + 1, size // 8, size // 8)}
        (sampled,) = n.common_ksampler(model, 3, 2, 1.0, "euler", "simple", pos, pos, latent)
        (stock,) = n.VAEDecode().decode(vae, sampled)
    assert tuple(stock.shape) == (frames, size, size, 3) and torch.allclose(cells, stock, atol=1e-5)
    ui = out.ui
    assert ui["animated"] == (True,) and len(ui["images"]) == 1 and ui["images"][0]["type"] == "output"
    ref = ui["images"][0]
    path = Path(folder_paths.get_output_directory()) / ref["subfolder"] / ref["filename"]
    assert path.suffix == ".webp" and not list(path.parent.glob("*.part"))
    with Image.open(path) as im:
        assert (im.format, im.n_frames, im.size, im.is_animated) == ("WEBP", frames, grid.shape[2:0:-1], True)
        pixels = []
        for f in range(im.n_frames):
            im.seek(f)
            pixels.append(np.asarray(im.convert("RGB"), dtype=np.int16))
    assert tuple(grid.shape) == (frames, *pixels[0].shape)
    expected = (grid.clamp(0, 1) * 255).round().to(torch.int16).numpy()
    assert all(np.array_equal(p, e) for p, e in zip(pixels, expected))  # lossless: the grid to 8 bits
    # the clip's cell in every frame is the stock decode rounded to 8 bits (cell box from the grid's layout)
    render = comfy.engine("sampling.render")
    _, geo = render.grid_frames([[stock]], ["step 0"], ["ohwx walking"], [["seed 3"]])
    x0, y0, x1, y1 = geo["cell_boxes"][0][0]
    cell = np.stack([p[y0:y1, x0:x1] for p in pixels]).astype(np.float32) / 255
    assert cell.shape == (frames, size, size, 3) and np.abs(cell - stock.numpy()).max() <= 0.5 / 255 + 1e-6


def test_frame_buckets_batch_clips_by_frame_count_and_size(comfy, bundle, tmp_path):
    """frame_buckets '5, 9' (and 12, rounded down to 9): a 6-frame clip trains at 5 frames, a 10-frame one at 9 (the
    longest bucket each covers, frames from the clip's start at 16 fps), a wide 10-frame clip at 9 frames in a wide
    bucket; a clip shorter than the smallest bucket is refused by name, a bad entry names itself. Latents through
    the tiny Wan VAE have three shapes; with batch size 2 every batch the trainer draws holds one shape (frame
    count and size), every shape is drawn, and a step on such batches has a finite loss."""
    from support.factories import clips

    V, caps, bk, cache = (comfy.engine(m) for m in ("data.video", "data.captions", "data.buckets", "data.cache"))
    C, st, loop, align = (comfy.engine(m) for m in ("train.config", "train.state", "train.loop", "te.align"))
    data = tmp_path / "data"
    clips.write_clip(data / "short.mp4", 6, 16, size=(16, 16), caption="ohwx short")
    clips.write_clip(data / "long.mp4", 10, 16, size=(16, 16), caption="ohwx long")
    clips.write_clip(data / "wide", 10, 16, size=(48, 16), caption="ohwx wide")  # a folder of frames, 3:1
    bcfg = bk.BucketConfig(resolution=16, min_side=16, max_side=48, step=16, max_area=768)  # 16x16 .. 48x16
    vcfg = V.VideoConfig(frames=5, fps=16.0, frame_buckets=V.parse_frame_buckets("5, 9 12"))
    assert vcfg.frame_counts == (9, 5)
    ds = V.from_video_folder(data, caps.CaptionConfig(), bcfg, vcfg)
    got = {i.source.rsplit("/", 1)[-1]: (i.bucket, ds.plan(i)[1]) for i in ds.items}
    assert got == {"short.mp4": ((16, 16), (0, 1, 2, 3, 4)), "long.mp4": ((16, 16), tuple(range(9))),
                   "wide": ((48, 16), tuple(range(9)))}, got
    rep = ds.report()
    assert rep["per_frame_count"] == {"5": 1, "9": 2} and rep["video"]["frame_buckets"] == [5, 9]
    with pytest.raises(V.DataError, match="frame_buckets: 'x9'"):
        V.parse_frame_buckets("5, x9")
    clips.write_clip(tmp_path / "tiny" / "blink.mp4", 3, 16, size=(16, 16))
    with pytest.raises(V.DataError, match=r"blink\.mp4 is too short.*5 frames"):
        V.from_video_folder(tmp_path / "tiny", caps.CaptionConfig(), bcfg, vcfg)

    lc = cache.cache_latents(ds, bundle[2], tmp_path / "cache")
    shapes = {tuple(lat.shape) for lat in lc.latents}
    assert shapes == {(16, 2, 2, 2), (16, 3, 2, 2), (16, 3, 2, 6)}, shapes
    ts, _ = cache.cache_text(lc, align.align_clip(bundle[1], "wan"), tmp_path / "cache", unload=False)
    run = loop.init_run(bundle[0], ts, C.LoraConfig(rank=4, alpha=4, preset="attention"),
                        C.TimestepConfig(shift="model"), C.OptimizerConfig(lr=1e-3),
                        st.RunSettings(run_name="buckets", batch_size=2, val_count=0), runs_root=tmp_path / "runs")
    trainer = loop.Trainer(run)
    drawn = [trainer.draw_batch() for _ in range(30)]
    assert all(len(b) == 2 and len({tuple(s.latent.shape) for s in b}) == 1 for b in drawn)
    assert {tuple(b[0].latent.shape) for b in drawn} == shapes
    out = loop.train_steps(run, 1)
    assert math.isfinite(out.history[-1]["loss"])


def test_resumed_video_run_equals_an_uninterrupted_one(comfy, bundle, video_set, tmp_path, monkeypatch):
    """Train Init + Train Steps as ComfyUI runs them (inference mode) on the tiny Wan's clips and image (fp32, no
    checkpointing: bf16 + checkpointing, the Wan workflow's, took about twice as long here): Train Init resuming
    the step-1 checkpoint of a 2-step run, and 1 more step, equals the 2 uninterrupted steps exactly (adapters,
    losses, and the cosine schedule's learning rates)."""
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    C, align = comfy.engine("train.config"), comfy.engine("te.align")
    ts, _ = video_set["cache"].cache_text(video_set["latents"], align.align_clip(bundle[1], "wan"), video_set["root"],
                                          unload=False)
    lcfg, tcfg = C.LoraConfig(rank=4, alpha=4, preset="attention"), C.TimestepConfig(shift="model")
    ocfg = C.OptimizerConfig(lr=1e-3, scheduler="cosine", total_steps=2)

    def init(name, resume):
        return comfy.call("AlignedTrainer_TrainInit", model=bundle[0], training_set=ts, lora_config=lcfg,
                          timesteps=tcfg, optimizer=ocfg, seed=5, batch_size=1, grad_accum=1, precision="fp32",
                          gradient_checkpointing=False, ema_decay=0.0, guidance=1.0, val_count=0, run_name=name,
                          resume=resume)[0]

    def steps(run, k):
        return comfy.call("AlignedTrainer_TrainSteps", run=run, steps=k, checkpoint_every=1, keep_last=2,
                          val_every=0)[0]

    with torch.inference_mode():
        full = steps(init("wan", "none"), 2)  # checkpoints at steps 1 and 2
        resumed = init("wan", "wan/checkpoints/step_0000001.safetensors")
        assert resumed.step == 1
        done = steps(resumed, 1)
    assert done.step == 2 and [(h["loss"], h["lr"]) for h in full.history] == [(h["loss"], h["lr"]) for h in done.history]
    assert full.state["adapters"].keys() == done.state["adapters"].keys()
    assert all(torch.equal(v, done.state["adapters"][k]) for k, v in full.state["adapters"].items())
    assert any(v.abs().sum() > 0 for k, v in done.state["adapters"].items() if "lora_up" in k)


def test_clip_previews_on_an_image_model_are_refused_by_name(comfy, sd15):
    """frames > 1 with an image model and VAE (tiny SD1.5) names the setting instead of a shape error."""
    render = comfy.engine("sampling.render")
    for n in (2, 5):
        with pytest.raises(ValueError, match=f"frames = {n} needs a video model"):
            render.empty_latent(sd15[0], sd15[2], render.SampleSettings(width=64, height=64, frames=n))
    assert tuple(render.empty_latent(sd15[0], sd15[2], render.SampleSettings(width=64, height=64)).shape) == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="frames must be >= 1"):
        render.SampleSettings(frames=0)
