"""The trainer trains the tiny SDXL / SD3 / FLUX.1 bundles (each family's own target: eps, flow velocity;
pooled and size conditioning; guidance embedding) with finite loss, and the saved LoRA maps completely in
ComfyUI's stock loader."""
from __future__ import annotations

import pytest
import torch

from support.factories import families


@pytest.mark.parametrize("name", families.NAMES)
def test_family_trains_with_finite_loss(comfy, family_bundle, name, tmp_path):
    model, clip, vae = family_bundle(name)
    types = comfy.engine("data.types")
    C = comfy.engine("train.config")
    st = comfy.engine("train.state")
    loop = comfy.engine("train.loop")
    export = comfy.engine("train.export")
    (cond,) = comfy.nodes.CLIPTextEncode().encode(clip, "ohwx, a red circle")
    with torch.no_grad():
        lat = vae.encode(torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0)))[0]
    ts = types.TrainingSet((types.Sample("a", lat, (types.CaptionVariant("ohwx", cond),), bucket=(64, 64)),))
    flow = comfy.engine("train.timesteps").is_flow(model.model.model_sampling)
    tcfg = C.TimestepConfig(density="logit_normal", shift="flux_resolution" if name.startswith("flux") else "model",
                            weighting="sd3_sigma_sqrt" if flow else "min_snr")
    run = loop.init_run(model, ts, C.LoraConfig(rank=4, alpha=4, preset="attention"), tcfg,
                        C.OptimizerConfig(lr=1e-3), st.RunSettings(run_name=name, batch_size=1),
                        runs_root=tmp_path)
    out = loop.train_steps(run, 2, val_every=2)
    losses = [h["loss"] for h in out.history] + [out.history[-1]["val_loss"]]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert any(v.abs().sum() > 0 for k, v in out.state["adapters"].items() if "lora_up" in k)
    assert export.unmapped_keys(model, export.kohya_state_dict(out)) == []
