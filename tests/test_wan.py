"""Tiny Wan 2.1 T2V from ComfyUI's own classes (support.factories.wan): the stock nodes encode, sample and decode
a short clip with it, and the trainer trains it on video latents."""
from __future__ import annotations

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
