"""Tiny FLUX.1 bundles from ComfyUI's own classes: stock encode/sample/decode work, and the trainer trains
them (flow-matching target, guidance embedding) with finite loss."""
from __future__ import annotations

import pytest
import torch

from support.factories import families


FLUX_NAMES = [n for n in families.NAMES if n.startswith("flux1")]  # SDXL/SD3: test_factories, test_train_families


@pytest.fixture(scope="module", params=FLUX_NAMES)
def bundle(request, family_bundle):
    return request.param, family_bundle(request.param)


def test_stock_nodes_run_on_bundle(comfy, bundle):
    import comfy.supported_models as sm

    name, (model, clip, vae) = bundle
    assert isinstance(model.model.model_config, sm.Flux)
    assert (model.model.diffusion_model.params.guidance_embed) == (name == "flux1-dev")
    n = comfy.nodes
    (pos,) = n.CLIPTextEncode().encode(clip, "ohwx, a red circle")
    assert pos[0][0].shape[-1] == families.FLUX_TINY["context_in_dim"] and pos[0][1]["pooled_output"].shape[-1] == 768
    (lat,) = n.EmptyLatentImage().generate(64, 64, 1)
    (out,) = n.common_ksampler(model, 1, 2, 1.0, "euler", "simple", pos, pos, lat)
    assert out["samples"].shape[1] == 16 and torch.isfinite(out["samples"]).all()
    (img,) = n.VAEDecode().decode(vae, out)
    assert img.shape[1:] == (64, 64, 3)


def test_trains_with_finite_loss(comfy, bundle, tmp_path):
    name, (model, clip, vae) = bundle
    align = comfy.engine("te.align")
    types = comfy.engine("data.types")
    C = comfy.engine("train.config")
    st = comfy.engine("train.state")
    loop = comfy.engine("train.loop")
    aligned = align.align_clip(clip, name)
    cond = aligned.encode_from_tokens_scheduled(aligned.tokenize("ohwx, a red circle"))
    assert cond[0][0].shape[1] == (512 if name == "flux1-dev" else 256)
    with torch.no_grad():
        lat = vae.encode(torch.rand(1, 64, 64, 3))[0]
    ts = types.TrainingSet((types.Sample("a", lat, (types.CaptionVariant("ohwx", cond),)),))
    run = loop.init_run(model, ts, C.LoraConfig(rank=4, alpha=4, preset="attention"),
                        C.TimestepConfig(density="logit_normal", shift="flux_resolution"),
                        C.OptimizerConfig(lr=1e-3), st.RunSettings(run_name=name, val_count=0),
                        runs_root=tmp_path)
    out = loop.train_steps(run, 3, val_every=3)
    losses = [h["loss"] for h in out.history]
    assert all(torch.isfinite(torch.tensor(losses))) and "val_loss" in out.history[-1]
    assert any(v.abs().sum() > 0 for k, v in out.state["adapters"].items() if "lora_up" in k)
