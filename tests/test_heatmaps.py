"""Token heatmaps (DAAM, issue #23 item 1) on the tiny SD1.5 through ComfyUI's own sampler: one finite map
per chosen word, normalised to [0, 1] at image size; the image equals sampling without the capture (bit for
bit); the captured maps are attention (over the text tokens they sum to one per pixel and layer call); words
are found at the tokenizer's positions; a word missing from the prompt and a model without readable text
attention (HunyuanImage 2.1) are refused by name; the joint attention of FLUX.1, SD3, Chroma, Qwen-Image, Z-Image,
Lumina 2, HiDream and HunyuanVideo 1.5 and Wan's cross-attention give maps too, with the sampling unchanged. The node's grid runs through the server and in the browser
test (workflows/token_heatmaps.json)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def H(comfy):
    return comfy.engine("sampling.heatmaps")


@pytest.fixture(scope="module")
def R(comfy):
    return comfy.engine("sampling.render")


PROMPT = "ohwx, a zebra standing on a red carpet"


def test_maps_are_finite_normalised_one_per_word_and_leave_the_image_unchanged(H, R, sd15):
    model, clip, vae = sd15
    s = R.SampleSettings(steps=3, cfg=2.0, width=64, height=64, seed=3)
    words = ["zebra", "carpet", "ohwx"]
    image, maps = H.heatmaps(model, clip, vae, PROMPT, "", words, s)
    assert maps.shape == (3, 64, 64) and torch.isfinite(maps).all()
    for m in maps:
        assert m.min() >= 0 and m.max() == pytest.approx(1.0)
    assert not torch.allclose(maps[0], maps[1], atol=1e-3)  # different tokens, different maps
    plain = R.sample(model, vae, R.encode(clip, PROMPT, s.guidance), R.encode(clip, "", s.guidance), s, s.seed)
    assert torch.equal(image, plain)  # the capture does not change the sampling
    grid = H.heatmap_grid(image, maps, words)
    assert grid.shape[0] == 1 and grid.shape[2] >= 4 * 64 and grid.shape[-1] == 3


def test_captured_maps_are_attention_over_the_text_tokens(H, R, sd15):
    model, clip, vae = sd15
    cap = H.Capture()
    s = R.SampleSettings(steps=2, cfg=2.0, width=64, height=64)
    pos, neg = R.encode(clip, PROMPT, 3.5), R.encode(clip, "", 3.5)
    import comfy.sample

    latent = torch.zeros([1, 4, 8, 8])
    noise = comfy.sample.prepare_noise(latent, 0, None)  # the sampler alone: no VAE decode needed here
    comfy.sample.sample(H.patched(model, cap), noise, s.steps, s.cfg, s.sampler, s.scheduler, pos, neg, latent,
                        disable_pbar=True, seed=0)
    layers = len(H.cross_attention_blocks(model))
    assert cap.calls == layers * s.steps  # every cross-attention layer, every step, conditional half only
    assert cap.total.shape == (77, 8, 8)
    # softmax over the tokens: at every latent pixel the maps of all tokens sum to one per layer call
    # (bicubic upsampling is linear; its overshoot clamped at 0 shifts the sum by well under 1 %)
    total = cap.total.sum(0)
    assert torch.allclose(total, torch.full_like(total, float(cap.calls)), rtol=0.01)


def test_word_positions_follow_the_tokenizer_and_bad_input_is_named(H, sd15, comfy):
    _, clip, _ = sd15
    ids = [t[0] for t in clip.tokenize(PROMPT)["l"][0]]
    pos = H.token_positions(clip, PROMPT, ["zebra", "red carpet"])
    zebra = [t[0] for t in clip.tokenize("zebra")["l"][0] if t[0] not in (49406, 49407)]
    assert [ids[p] for p in pos["zebra"]] == zebra
    assert len(pos["red carpet"]) >= 2 and pos["red carpet"] == sorted(pos["red carpet"])
    with pytest.raises(ValueError, match="'giraffe' is not in the prompt"):
        H.token_positions(clip, PROMPT, ["giraffe"])


def test_flux_joint_attention_maps_and_unchanged_image(H, R, family_bundle):
    """FLUX.1: the text-to-image part of joint attention, through ComfyUI's attention override hook."""
    model, clip, vae = family_bundle("flux1-dev")
    s = R.SampleSettings(steps=2, cfg=1.0, width=64, height=32, seed=1)
    prompt = "ohwx, a zebra on a red carpet"
    image, maps = H.heatmaps(model, clip, vae, prompt, "", ["ohwx", "zebra", "carpet"], s)
    assert maps.shape == (3, 32, 64) and torch.isfinite(maps).all()  # the trigger word placed too
    assert all(m.min() >= 0 and m.max() == pytest.approx(1.0) for m in maps)
    assert not torch.allclose(maps[0], maps[1], atol=1e-3)  # different tokens, different maps
    plain = R.sample(model, vae, R.encode(clip, prompt, s.guidance), R.encode(clip, "", s.guidance), s, s.seed)
    assert torch.equal(image, plain)
    cap = H.Capture()
    pos = R.encode(clip, prompt, s.guidance)
    hooked = H.patched(model, cap, text_len=pos[0][0].shape[1], latent_hw=(4, 8))
    R.sample(hooked, vae, pos, pos, s, 0)
    dm = model.model.diffusion_model
    assert cap.calls == (len(dm.double_blocks) + len(dm.single_blocks)) * s.steps  # one per joint block and step
    assert cap.total.shape == (pos[0][0].shape[1], 2, 4)  # text tokens x (32/16, 64/16) image patches
    assert (cap.total.sum(0) < cap.calls).all()  # image keys take the rest of each softmax row


JOINT_BLOCKS = {"sd3": ["joint_blocks"], "chroma": ["double_blocks", "single_blocks"],
                "qwen-image": ["transformer_blocks"], "z-image": ["layers"], "lumina2": ["layers"],
                "hidream": ["double_stream_blocks", "single_stream_blocks"],  # [image][T5][Llama layers]
                "hunyuan-video-1.5": ["double_blocks", "single_blocks"],  # [image][byT5][text]
                "wan": ["blocks"]}  # cross-attention: image queries over the text keys
# (height, width): not all square; Z-Image's 40 makes an odd latent width (5, padded to 3 patches) and 6 image
# tokens padded to 32 in its joint sequence
SIZES = {"z-image": (32, 40), "qwen-image": (48, 32), "hunyuan-video-1.5": (32, 48)}
# HunyuanVideo 1.5: quoted text also goes to byT5, whose glyph tokens sit between the image and the prompt's text
PROMPTS = {"hunyuan-video-1.5": 'ohwx, a zebra on a sign that says "OPEN"'}


# where the image-first layouts' text starts in a joint call, from how ComfyUI builds the sequence: HiDream's T5
# tokens right after the image (then the Llama layers); HunyuanVideo 1.5's after the image and the byT5 tokens
TEXT_START = {"hidream": lambda n_img, cond: n_img,
              "hunyuan-video-1.5": lambda n_img, cond: n_img + cond[0][1]["conditioning_byt5small"].shape[1],
              "wan": lambda n_img, cond: 0}


def _dit(family_bundle, family: str, R, s):
    """(MODEL, CLIP, empty latent) of a tiny DiT: the family bundles, the tiny Wan 2.1 T2V (support.factories.wan),
    and the tiny HunyuanVideo 1.5 transformer with the tiny Qwen2.5-VL + byT5 in ComfyUI's classes (no VAE is built
    for it: its one-frame latent is made at the VAE's 16x compression and 32 channels)."""
    if family == "wan":
        from support.factories import wan

        model, clip, vae = wan.build()
        return model, clip, R.empty_latent(model, vae, s)
    if family == "hunyuan-video-1.5":
        from support.factories import hunyuan_video15 as hv15
        from support.factories import te_hunyuan_video15 as hv15_te
        from support.factories import te_qwen_image

        model = hv15.build_model(context_in_dim=te_qwen_image.QWEN25VL_TINY["hidden_size"])
        clip = hv15_te.shared_hv15_clip(hv15_te.qwen25vl_tiny_file(), hv15_te.byt5_tiny_file())
        return model, clip, torch.zeros(1, 32, 1, s.height // 16, s.width // 16)
    model, clip, vae = family_bundle(family)
    return model, clip, R.empty_latent(model, vae, s)


@pytest.mark.parametrize("family", sorted(JOINT_BLOCKS))
def test_dit_joint_attention_maps_and_unchanged_sampling(H, R, family_bundle, family):
    """SD3's MMDiT and the newer DiTs: the text-to-image part of their attention, where joint_layouts.py says the
    text sits (SD3 after its registers, Z-Image padded to 32 tokens, HiDream's T5 after the image, HunyuanVideo
    1.5's text after the byT5 glyph tokens, Wan's cross-attention keys; the refiners' text-only and image-only calls
    are not read). One step at 32 x 32 (2 x 2 image tokens) or SIZES, compared on the latent (no VAE decode, for
    time)."""
    import comfy.sample

    h, w = SIZES.get(family, (32, 32))
    s = R.SampleSettings(steps=1, cfg=1.0, width=w, height=h, seed=1)
    model, clip, latent = _dit(family_bundle, family, R, s)
    prompt = PROMPTS.get(family, "ohwx, a zebra on a red carpet")
    pos = R.encode(clip, prompt, s.guidance)
    text_len = pos[0][0].shape[1]
    words = ["ohwx", "zebra"]
    positions = H.token_positions(clip, prompt, words, text_len, H.joint_layouts.tokenizer(model))
    assert positions["ohwx"] and max(positions["zebra"]) < text_len  # the trigger word placed, inside the text
    if family == "hidream":  # T5's tokens, not Llama's (both pad to 128)
        t5 = [int(t[0]) for chunk in clip.tokenize(prompt)["t5xxl"] for t in chunk]
        zebra = [int(t[0]) for t in clip.tokenize("zebra")["t5xxl"][0] if t[0] not in (0, 1)]
        assert [t5[p] for p in positions["zebra"]] == zebra
    noise = comfy.sample.prepare_noise(latent, 0, None)

    def run(m):  # cfg 1: ComfyUI runs the conditional batch only
        return comfy.sample.sample(m, noise, s.steps, s.cfg, s.sampler, s.scheduler, pos, pos, latent,
                                   disable_pbar=True, seed=0)

    seen = []  # (query, key) lengths of every attention call, recorded by an override the capture keeps
    recorder = model.clone()

    def record(func, *args, **kwargs):
        axis = -2 if kwargs.get("skip_reshape") else 1
        seen.append((args[0].shape[axis], args[1].shape[axis]))
        return func(*args, **kwargs)

    recorder.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = record
    cap = H.Capture()
    latent_hw = tuple(latent.shape[-2:])
    hooked = run(H.patched(recorder, cap, text_len=text_len, latent_hw=latent_hw))
    assert torch.equal(hooked, run(model))  # the capture does not change the sampling
    dm = model.model.diffusion_model
    assert cap.calls == sum(len(getattr(dm, b)) for b in JOINT_BLOCKS[family]) * s.steps  # each joint block, step
    span = H.joint_layouts.span(model, text_len, latent_hw)
    read = [here for q, k in seen if (here := span.locate(q, k)) is not None]
    assert len(read) == cap.calls
    if family in TEXT_START:  # the text columns read are where the model puts the conditioning's tokens
        n_img = span.grid[0] * span.grid[1]
        assert {(here.text.start, here.text.stop) for here in read} == {(TEXT_START[family](n_img, pos),
                                                                         TEXT_START[family](n_img, pos) + text_len)}
    assert cap.total.shape == (text_len, -(-h // 16), -(-w // 16)) and torch.isfinite(cap.total).all()
    assert (cap.total >= 0).all() and (cap.total.sum(0) <= cap.calls * (1 + 1e-5)).all()  # part of each softmax row
    if family == "wan":  # cross-attention: the softmax runs over the text keys alone, so they take all of each row
        assert torch.allclose(cap.total.sum(0), torch.full(cap.total.shape[1:], float(cap.calls)), rtol=1e-4)
    maps = H.word_maps(cap, positions, words, (h, w))
    assert maps.shape == (2, h, w) and torch.isfinite(maps).all()  # one per word, normalised
    assert all(m.min() >= 0 and m.max() == pytest.approx(1.0) for m in maps)
    assert not torch.allclose(maps[0], maps[1], atol=1e-3)  # different tokens, different maps


def test_models_without_readable_attention_are_refused_by_name(H, comfy):
    """HunyuanImage 2.1 runs the DiT class of HunyuanVideo 1.5 (supported) but appends its byT5 glyph tokens after
    the text: its text is not where joint_layouts.py reads HunyuanVideo 1.5's, so it is refused, naming the family
    (weights are not needed: the refusal comes before sampling)."""
    import comfy.model_patcher
    import comfy.supported_models

    from support.factories import hunyuan_video15 as hv15

    cfg = comfy.supported_models.HunyuanImage21(dict(hv15.HV15_DIT, patch_size=[1, 1], use_cond_type_embedding=False,
                                                     vision_in_dim=None, in_channels=64, out_channels=64))
    cfg.set_inference_dtype(torch.float32, None)
    model = comfy.model_patcher.ModelPatcher(cfg.get_model({}, "", device="cpu"), load_device="cpu",
                                             offload_device="cpu")
    assert type(model.model.diffusion_model).__name__ == "HunyuanVideo"
    with pytest.raises(ValueError, match="HunyuanImage21 \\(HunyuanVideo\\): not supported yet"):
        H.refuse_unreadable(model)


def test_a_models_own_attention_override_still_runs_under_the_capture(H, R, family_bundle):
    """A model that already carries an ``optimized_attention_override`` (an attention-swapping patch) samples the
    same with the capture as without it: the capture wraps the user's override instead of replacing it."""
    import comfy.sample

    model, clip, vae = family_bundle("chroma")
    own = model.clone()
    calls = []

    def halve(func, *args, **kwargs):  # a stand-in for a user's attention patch that changes the output
        calls.append(1)
        return func(*args, **kwargs) * 0.5

    own.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = halve
    s = R.SampleSettings(steps=1, cfg=1.0, width=32, height=32, seed=1)
    pos = R.encode(clip, "ohwx, a zebra", s.guidance)
    latent = R.empty_latent(model, vae, s)
    noise = comfy.sample.prepare_noise(latent, 0, None)

    def run(m):
        return comfy.sample.sample(m, noise, s.steps, s.cfg, s.sampler, s.scheduler, pos, pos, latent,
                                   disable_pbar=True, seed=0)

    expected = run(own)
    n = len(calls)
    cap = H.Capture()
    hooked = run(H.patched(own, cap, text_len=pos[0][0].shape[1], latent_hw=tuple(latent.shape[-2:])))
    assert torch.equal(hooked, expected) and not torch.equal(expected, run(model))
    assert len(calls) == 2 * n and cap.calls > 0


def test_heatmaps_of_a_video_model_place_the_image_by_the_latents_height_and_width(H, R):
    """Wan 2.1's latent is (batch, channels, frames, height, width): ``heatmaps`` reads the image grid from its last
    two axes, so the cross-attention calls are found and the one-frame sample gets a map at image size, the image
    unchanged by the capture (one step, 32 x 32)."""
    from support.factories import wan

    model, clip, vae = wan.build()
    s = R.SampleSettings(steps=1, cfg=1.0, width=32, height=32, seed=1)
    prompt = "ohwx, a zebra on a red carpet"
    image, maps = H.heatmaps(model, clip, vae, prompt, "", ["zebra"], s)
    assert R.empty_latent(model, vae, s).ndim == 5
    assert maps.shape == (1, *image.shape[1:3]) and maps.max() == pytest.approx(1.0) and maps.min() >= 0
    plain = R.sample(model, vae, R.encode(clip, prompt, s.guidance), R.encode(clip, "", s.guidance), s, s.seed)
    assert torch.equal(image, plain)
