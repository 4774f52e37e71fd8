"""sampling/plans.py: Train Steps' preview plan pinned (issue #26): every_n = 1 (every step) is a valid plan,
and the plan holds the conditionings ComfyUI's CLIPTextEncode gives (with the guidance value set) for its prompts, encoded once
when it is made."""
from __future__ import annotations

import torch


def test_plan_every_step_holds_the_stock_conditionings(comfy, sd15):
    plans = comfy.engine("sampling.plans")
    render = comfy.engine("sampling.render")
    clip = sd15[1]
    s = render.SampleSettings(steps=1, width=64, height=64, guidance=2.5)
    plan = plans.make_plan(clip, None, ["a red circle", "a blue square"], "blurry", s, 1, fps=8)
    assert plan.every_n == 1 and [k for k in range(3) if plan.due(k)] == [1, 2]
    assert plan.prompts == ("a red circle", "a blue square") and plan.fps == 8.0 and plan.settings is s
    (cond,) = comfy.nodes.CLIPTextEncode().encode(clip, "a blue square")
    got = plan.positives[1]
    assert torch.equal(got[0][0], cond[0][0]) and got[0][1]["guidance"] == 2.5  # FluxGuidance's value
    assert torch.equal(got[0][1]["pooled_output"], cond[0][1]["pooled_output"])
    (neg,) = comfy.nodes.CLIPTextEncode().encode(clip, "blurry")
    assert torch.equal(plan.negative[0][0], neg[0][0])


def test_preview_releases_the_sampling_model_when_asked(comfy, sd15):
    """PreviewPlan.render and preview_grid(release=True) leave the sampled model out of ComfyUI's loaded set (training
    resumes without sampling memory held)."""
    import comfy.model_management as mm

    plans = comfy.engine("sampling.plans")
    render = comfy.engine("sampling.render")
    model, clip, vae = sd15
    s = render.SampleSettings(steps=1, cfg=1.0, width=64, height=64)

    def loaded():
        return any(lm.model is model for lm in mm.current_loaded_models)

    mm.load_models_gpu([model])
    plans.preview_grid(model, clip, vae, ["a red circle"], "", s, release=True)
    assert not loaded()
    plan = plans.make_plan(clip, vae, ["a red circle"], "", s, 1)
    mm.load_models_gpu([model])
    plan.render(model, 1)
    assert not loaded()
