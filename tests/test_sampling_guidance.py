"""FLUX-style guidance: used by a model with a guidance embedding (tiny FLUX.1 dev), equal to the stock
CLIPTextEncode -> FluxGuidance -> KSampler -> VAEDecode graph. (SD1.5 ignores it: test_sampling_preview
compares guidance-3.5 previews with stock renders that carry no guidance.)"""
from __future__ import annotations

import torch
from support.factories.lora import stock_render


def test_flux_dev_uses_guidance_like_stock_flux_guidance(comfy, family_bundle):
    model, clip, vae = family_bundle("flux1-dev")
    plans, render = comfy.engine("sampling.plans"), comfy.engine("sampling.render")

    def settings(g):
        return render.SampleSettings(steps=2, cfg=1.0, guidance=g, width=64, height=64, seed=3)

    _, low, _ = plans.preview_grid(model, clip, vae, ["a cat"], "", settings(1.0))
    _, high, _ = plans.preview_grid(model, clip, vae, ["a cat"], "", settings(6.0), release=True)
    assert not torch.equal(low, high)
    ref = stock_render(comfy.nodes, model, clip, vae, "a cat", "", 3, cfg=1.0, guidance=6.0)
    assert torch.allclose(high, ref, atol=1e-5)
