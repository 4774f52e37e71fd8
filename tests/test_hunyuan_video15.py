"""HunyuanVideo 1.5 (issue #21's optional family): the tiny transformer of ComfyUI's HunyuanVideo15 config
(support.factories.hunyuan_video15) trains on 32-channel video latents with the flow target on its shift, and the
LoRA maps completely in ComfyUI's loader, with musubi-tuner's metadata for the family."""
from __future__ import annotations

import importlib
import math
from pathlib import Path

import torch
from safetensors import safe_open

from support.factories import hunyuan_video15 as hv15
from support.factories import te_hunyuan_video15 as hv15_te
from support.factories import te_qwen_image


def test_hunyuan_video15_trains_and_its_lora_maps(comfy, tmp_path):
    """The caption encoded by the aligned text encoders (spec hunyuan-video-1.5, default variant: tiny Qwen2.5-VL
    and byT5 in ComfyUI's classes; the caption has quoted text, so both streams), one 2-frame latent clip: 2 steps
    with finite loss through the model's own forward (concat of the empty image latent and mask, byT5 states read
    by the model's byT5 mapper, no vision input, as in text-to-video); LoRA on attention and MLP of both streams,
    0 unmapped keys; 1 step + checkpoint + resumed Train Init + 1 step equals the 2 straight steps bit for bit."""
    sm = importlib.import_module("comfy.supported_models")
    types, C, st, loop, export = (comfy.engine(m) for m in ("data.types", "train.config", "train.state",
                                                             "train.loop", "train.export"))
    model = hv15.build_model(context_in_dim=te_qwen_image.QWEN25VL_TINY["hidden_size"])
    assert isinstance(model.model.model_config, sm.HunyuanVideo15)
    assert float(model.get_model_object("model_sampling").shift) == sm.HunyuanVideo15.sampling_settings["shift"]
    g = torch.Generator().manual_seed(0)
    clip = comfy.engine("te.align").align_clip(
        hv15_te.shared_hv15_clip(hv15_te.qwen25vl_tiny_file(), hv15_te.byt5_tiny_file()), "hunyuan-video-1.5")
    with torch.no_grad():
        cond = clip.encode_from_tokens_scheduled(clip.tokenize('ohwx, a shop sign that says "OPEN"'))
    assert cond[0][0].shape[-1] == te_qwen_image.QWEN25VL_TINY["hidden_size"] and "attention_mask" not in cond[0][1]
    assert cond[0][1]["conditioning_byt5small"].shape[1] == len(b'Text "OPEN". ') + 1  # the glyph text and </s>
    byt5_calls = []
    hook = model.model.diffusion_model.byt5_in.register_forward_hook(lambda m, a, o: byt5_calls.append(a[0].shape))
    lat = torch.randn(32, 2, 4, 4, generator=g)
    ts = types.TrainingSet((types.Sample("a", lat, (types.CaptionVariant("ohwx", cond),), bucket=(64, 64)),))

    def init(name, resume="none"):
        return loop.init_run(model, ts, C.LoraConfig(rank=4, alpha=4, preset="attention+mlp"), C.TimestepConfig(),
                             C.OptimizerConfig(lr=1e-3), st.RunSettings(run_name=name, val_count=0),
                             runs_root=tmp_path, resume=resume)

    out = loop.train_steps(init("hv15"), 2)
    hook.remove()
    # resume is exact: 1 step, a checkpoint, a new Train Init from it, 1 more == the 2 straight steps bit for bit
    loop.train_steps(init("half"), 1, checkpoint_every=1)
    resumed = loop.train_steps(init("half", "latest"), 1)
    assert resumed.step == 2 and [h["loss"] for h in resumed.history] == [h["loss"] for h in out.history]
    assert all(torch.equal(v, resumed.state["adapters"][k]) for k, v in out.state["adapters"].items())
    assert byt5_calls and all(c[1:] == cond[0][1]["conditioning_byt5small"].shape[1:] for c in byt5_calls)
    assert len(out.history) == 2 and all(math.isfinite(h["loss"]) for h in out.history)
    ups = {k: v for k, v in out.state["adapters"].items() if "lora_up" in k}
    for part in ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_mlp.2", "single_blocks.0.linear1"):
        assert any(part in k for k in ups), (part, list(ups))
    sd = export.kohya_state_dict(out)
    assert "lora_unet_double_blocks_0_img_mlp_0.lora_down.weight" in sd and export.unmapped_keys(model, sd) == []
    path, _ = export.save_lora(out, "hv15", folder=tmp_path / "loras")
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
    assert (md["ss_base_model_version"], md["ss_network_module"]) == ("hunyuan_video_1_5", "networks.lora_hv_1_5")
    assert md["modelspec.architecture"] == "hunyuan-video-1.5/lora" and "modelspec.prediction_type" not in md


def test_quoted_and_plain_captions_in_one_batch_predict_as_alone(comfy, tmp_path):
    """A caption with quoted text (byT5 states) and one without (no byT5 key) in one batch, and two quoted captions of
    different byT5 lengths: each sample's prediction in the batch equals its prediction alone (the trainer runs
    conditionings that ComfyUI's conds cannot batch in separate forwards, as ComfyUI's sampler does); joining them
    would drop the byT5 states of one or fail on the lengths."""
    types, C, st, loop = (comfy.engine(m) for m in ("data.types", "train.config", "train.state", "train.loop"))
    model = hv15.build_model(context_in_dim=te_qwen_image.QWEN25VL_TINY["hidden_size"])
    clip = comfy.engine("te.align").align_clip(
        hv15_te.shared_hv15_clip(hv15_te.qwen25vl_tiny_file(), hv15_te.byt5_tiny_file()), "hunyuan-video-1.5")
    caps = ['ohwx, a sign that says "OPEN"', "ohwx, a quiet street", 'ohwx, a sign that says "CLOSED FOR LUNCH"']
    with torch.no_grad():
        conds = [clip.encode_from_tokens_scheduled(clip.tokenize(c)) for c in caps]
    assert [("conditioning_byt5small" in c[0][1]) for c in conds] == [True, False, True]
    g = torch.Generator().manual_seed(0)
    lats = [torch.randn(32, 2, 4, 4, generator=g) for _ in caps]
    ts = types.TrainingSet(tuple(types.Sample(f"s{i}", lat, (types.CaptionVariant(c, cond),), bucket=(64, 64))
                                 for i, (lat, c, cond) in enumerate(zip(lats, caps, conds))))
    run = loop.init_run(model, ts, C.LoraConfig(rank=4, alpha=4, preset="attention"), C.TimestepConfig(),
                        C.OptimizerConfig(lr=1e-3), st.RunSettings(run_name="hv15b", val_count=0), runs_root=tmp_path)
    with torch.inference_mode(False), torch.no_grad():
        tr = loop.Trainer(run)
        tr.load()
        try:
            for pair in ((0, 1), (1, 0), (0, 2)):
                x = torch.stack([lats[i] for i in pair]) + torch.randn(2, 32, 2, 4, 4, generator=g)
                sigma = torch.tensor([0.8, 0.4])
                pc = [conds[i] for i in pair]
                both = tr.predict_at(x, sigma, pc)
                alone = torch.cat([tr.predict_at(x[j:j + 1], sigma[j:j + 1], pc[j:j + 1]) for j in range(2)])
                assert torch.allclose(both, alone, atol=1e-5), (pair, float((both - alone).abs().max()))
        finally:
            tr.release()


def test_hv15_vae_caches_clips_the_transformer_trains_on_and_previews_decode(comfy, tmp_path):
    """The HunyuanVideo 1.5 VAE as ComfyUI detects it (support.factories.hunyuan_video15.comfy_vae: 32 channels,
    16x spatial, 4x temporal, the vae_refiner classes built small): a video Dataset (a 6-frame clip, a folder of
    frames, a still image; 5 frames at 16 fps, 32 px) caches through it as (32, 2, 2, 2) per clip and (32, 1, 2, 2)
    for the image, each clip's latent equal to the stock VAEEncode of its frames, and a latent decodes back to 5
    frames of 32 x 32. The tiny transformer (65 input channels: ComfyUI's HunyuanVideo15.concat_cond adds the zero
    image latent and mask, as text-to-video does, in training and in sampling: seen at the patch embedding) trains 2
    steps on those latents with the aligned captions, finite loss. Sample Preview
    (5 frames) writes an animated WebP whose clip equals the stock EmptyHunyuanVideo15Latent -> KSampler ->
    VAEDecode on the same model, prompt and seed."""
    import comfy_extras.nodes_hunyuan as nh
    import folder_paths
    import numpy as np
    from PIL import Image

    from support.factories import clips

    V, caps, bk, cache, render, C, st, loop = (comfy.engine(m) for m in (
        "data.video", "data.captions", "data.buckets", "data.cache", "sampling.render", "train.config",
        "train.state", "train.loop"))
    vae = hv15.comfy_vae()
    assert render.latent_geometry(vae) == (hv15.LATENT_CHANNELS, hv15.SPATIAL, hv15.TEMPORAL) == (32, 16, 4)
    size, frames = 32, 5
    clips.write_clip(tmp_path / "data" / "walk.mp4", 6, 16, size=(size, size), caption="ohwx walking")
    clips.write_clip(tmp_path / "data" / "turn", 6, 16, size=(size, size), caption="ohwx turning")
    Image.fromarray(clips.frame(3, (size, size))).save(tmp_path / "data" / "still.png")
    (tmp_path / "data" / "still.txt").write_text("ohwx standing", encoding="utf-8")
    ds = V.from_video_folder(tmp_path / "data", caps.CaptionConfig(), bk.BucketConfig(
        resolution=size, min_side=size, max_side=size, step=size), V.VideoConfig(frames=frames, fps=16.0))
    lc = cache.cache_latents(ds, vae, tmp_path / "cache")
    shapes = {i.source.rsplit("/", 1)[-1]: tuple(lat.shape) for i, lat in zip(ds.items, lc.latents)}
    k, s = (frames - 1) // hv15.TEMPORAL + 1, size // hv15.SPATIAL
    assert shapes == {"walk.mp4": (32, k, s, s), "turn": (32, k, s, s), "still.png": (32, 1, s, s)}, shapes
    # the folder clip's frames are lossless PNGs: its latent is the stock VAEEncode of those frames
    turn = next(lat for i, lat in zip(ds.items, lc.latents) if i.source.endswith("turn"))
    pixels = torch.stack([torch.from_numpy(clips.frame(i, (size, size))).float() / 255 for i in range(frames)])
    with torch.no_grad():
        (stock,) = comfy.nodes.VAEEncode().encode(vae, pixels)
        assert torch.allclose(stock["samples"][0].float(), turn.float(), atol=1e-4)
        (back,) = comfy.nodes.VAEDecode().decode(vae, {"samples": turn[None]})
    assert tuple(back.shape[-4:]) == (frames, size, size, 3) and torch.isfinite(back).all()

    model = hv15.Bundle.build_model()
    clip = comfy.engine("te.align").align_clip(
        hv15_te.shared_hv15_clip(hv15_te.qwen25vl_tiny_file(), hv15_te.byt5_tiny_file()), "hunyuan-video-1.5")
    ts, _ = cache.cache_text(lc, clip, tmp_path / "cache", unload=False)
    assert ts.te_spec_id.split(":")[0] == "hunyuan-video-1.5"
    run = loop.init_run(model, ts, C.LoraConfig(rank=4, alpha=4, preset="attention"), C.TimestepConfig(shift="model"),
                        C.OptimizerConfig(lr=1e-3), st.RunSettings(run_name="hv15vae", val_count=0),
                        runs_root=tmp_path / "runs")
    seen = []  # what the patch embedding receives: noise 32 + ComfyUI's concat_cond (zero image latent 32 + mask 1)
    hook = model.model.diffusion_model.img_in.register_forward_hook(lambda m, a, o: seen.append(a[0].detach().clone()))
    out = loop.train_steps(run, 2)
    assert len(out.history) == 2 and all(math.isfinite(h["loss"]) for h in out.history), out.history
    assert seen and all(x.shape[1] == 65 and not x[:, 32:].any() and x[:, :32].abs().sum() > 0 for x in seen)
    n_train = len(seen)

    kw = dict(prompts="ohwx walking", negative="", seed=3, seed_mode="fixed", steps=2, cfg=1.0, guidance=3.5,
              sampler_name="euler", scheduler="simple", width=size, height=size, step=0)
    with torch.inference_mode():
        res = comfy.call_full("AlignedTrainer_SamplePreview", model=model, clip=clip, vae=vae, frames=frames,
                              fps=16.0, **kw)
        grid, cells = res.args
        (pos,) = comfy.nodes.CLIPTextEncode().encode(clip, "ohwx walking")
        latent = nh.EmptyHunyuanVideo15Latent.execute(size, size, frames, 1).result[0]
        (sampled,) = comfy.nodes.common_ksampler(model, 3, 2, 1.0, "euler", "simple", pos, pos, latent)
        (video,) = comfy.nodes.VAEDecode().decode(vae, sampled)
    hook.remove()
    assert len(seen) > n_train and all(x.shape[1] == 65 and not x[:, 32:].any() for x in seen[n_train:])
    video = video.reshape(-1, size, size, 3)
    assert tuple(video.shape) == (frames, size, size, 3) and torch.allclose(cells, video, atol=1e-5)
    ui = res.ui
    assert ui["animated"] == (True,) and len(ui["images"]) == 1
    ref = ui["images"][0]
    path = Path(folder_paths.get_output_directory()) / ref["subfolder"] / ref["filename"]
    with Image.open(path) as im:
        assert (im.format, im.n_frames, im.is_animated) == ("WEBP", frames, True)
        im.seek(frames - 1)
        last = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert np.array_equal(last, (grid[-1].clamp(0, 1) * 255).round().to(torch.int16).numpy())
