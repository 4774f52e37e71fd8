"""sampling/render.py pinned (issue #26) against ComfyUI's stock nodes on the same tiny weights: a clip of a Wan
video is EmptyHunyuanLatentVideo -> KSampler -> VAEDecode frame for frame (every frame returned, not the first); an
ancestral sampler gets the seed (its extra noise); the empty image latent is one sample; a video length on an
image model is refused; release takes exactly the given model out of ComfyUI's loaded set."""
from __future__ import annotations

import pytest
import torch

from support.factories import wan


@pytest.fixture(scope="module")
def R(comfy):
    return comfy.engine("sampling.render")


@pytest.fixture(scope="module")
def wan_bundle(comfy):
    return wan.build()


def test_video_clip_is_the_stock_video_graph_every_frame(comfy, R, wan_bundle):
    model, clip, vae = wan_bundle
    s = R.SampleSettings(steps=1, cfg=1.0, sampler="euler", scheduler="simple", width=32, height=32, seed=5,
                         frames=5)
    pos = R.encode(clip, "ohwx, a red circle", s.guidance)
    neg = R.encode(clip, "", s.guidance)
    lat = R.empty_latent(model, vae, s)
    assert tuple(lat.shape) == (1, 16, 2, 4, 4)
    import dataclasses

    import comfy_extras.nodes_hunyuan as nh

    for n in (4, 8, 9):  # lengths that are not 4k + 1 round down as the stock node's latent does
        stock = nh.EmptyHunyuanLatentVideo.execute(32, 32, n, 1).result[0]["samples"]
        assert R.empty_latent(model, vae, dataclasses.replace(s, frames=n)).shape == stock.shape, n
    got = R.sample(model, vae, pos, neg, s, 5)
    empty = nh.EmptyHunyuanLatentVideo.execute(32, 32, 5, 1).result[0]  # the stock node's latent
    (out,) = comfy.nodes.common_ksampler(model, 5, 1, 1.0, "euler", "simple", pos, neg, empty)
    (video,) = comfy.nodes.VAEDecode().decode(vae, out)
    assert tuple(got.shape) == (5, 32, 32, 3) == tuple(video.shape)
    torch.testing.assert_close(got, video.float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="frames = 5 needs a video model"):
        R.empty_latent(model, None, s)


def test_image_latent_ancestral_seed_and_release(comfy, R, sd15):
    import comfy.model_management as mm

    model, clip, vae = sd15
    s = R.SampleSettings(steps=2, cfg=2.0, sampler="euler_ancestral", scheduler="normal", width=64, height=48, seed=1)
    assert tuple(R.empty_latent(model, vae, s).shape) == (1, 4, 6, 8)
    pos, neg = R.encode(clip, "a red circle", s.guidance), R.encode(clip, "blurry", s.guidance)
    got = R.sample(model, vae, pos, neg, s, 11)
    lat = {"samples": torch.zeros(1, 4, 6, 8)}
    (out,) = comfy.nodes.common_ksampler(model, 11, 2, 2.0, "euler_ancestral", "normal", pos, neg, lat)
    (img,) = comfy.nodes.VAEDecode().decode(vae, out)
    assert got.shape == (1, 48, 64, 3)
    torch.testing.assert_close(got, img.float(), rtol=1e-5, atol=1e-5)
    other = R.sample(model, vae, pos, neg, s, 12)
    assert not torch.equal(other, got)  # the seed reaches the ancestral noise
    # release of a LoRA-patched clone: out of the loaded set and its patches taken out of the weights it shares
    from comfy.sd import load_lora_for_models
    from support.factories.lora import kohya_lora

    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    patched = load_lora_for_models(model, None, kohya_lora(model, seed=1), 1.0, 0.0)[0]
    mm.load_models_gpu([patched])
    assert any(not torch.equal(v, before[k]) for k, v in model.model.diffusion_model.state_dict().items())
    R.release(patched)
    assert not any(lm.model is patched for lm in mm.current_loaded_models)
    assert all(torch.equal(v, before[k]) for k, v in model.model.diffusion_model.state_dict().items())


def test_grid_frames_one_grid_per_frame_of_the_shortest_cell(R):
    """Cells of 3 and 2 frames: 2 grids, grid f is ``grid`` of every cell's frame f alone (frame 0 of a cell is not
    repeated, the third frame of the longer cell is left out); geometry of the first frame."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 16, 16, 3, generator=g), torch.rand(2, 16, 16, 3, generator=g)
    out, geo = R.grid_frames([[a, b]], ["row"], ["a", "b"])
    assert out.shape[0] == 2
    for f in range(2):
        want, want_geo = R.grid([[a[f:f + 1], b[f:f + 1]]], ["row"], ["a", "b"])
        assert torch.equal(out[f:f + 1], want), f
    assert geo == want_geo
