"""Chroma trains on what the official pipeline feeds its denoiser: the aligned T5 prompt (512 tokens) with the
text mask showing the content and one pad token (te_specs/chroma.json ``visible_pad_tokens``). ComfyUI's Chroma
model (``model_base.Flux.extra_conds``) drops a per-token text mask, so without the trainer's help the denoiser
would attend all 512 tokens.

The reference needs no mask at all: with text position ids all zero (Chroma's ``txt_ids``), attending only the
visible tokens is the same computation as giving the model just those tokens. So the trainer's prediction on the
masked 512-token conditioning must equal ComfyUI's own prediction on the conditioning cut to the visible tokens,
and differ from the unmasked 512-token one."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def chroma(comfy, family_bundle):
    model, clip, vae = family_bundle("chroma")
    align = comfy.engine("te.align")
    (cond,) = comfy.nodes.CLIPTextEncode().encode(align.align_clip(clip, "chroma"), "ohwx, a red circle")
    return model, cond


def _run(comfy, model, cond, tmp_path):
    types = comfy.engine("data.types")
    C = comfy.engine("train.config")
    st = comfy.engine("train.state")
    loop = comfy.engine("train.loop")
    lat = torch.randn(16, 8, 8, generator=torch.Generator().manual_seed(0))
    ts = types.TrainingSet((types.Sample("a", lat, (types.CaptionVariant("ohwx", cond),), bucket=(64, 64)),))
    return loop.init_run(model, ts, C.LoraConfig(rank=4, alpha=4, preset="attention"),
                         C.TimestepConfig(density="logit_normal", shift="model", weighting="sd3_sigma_sqrt"),
                         C.OptimizerConfig(lr=1e-3), st.RunSettings(run_name="chroma-mask", precision="fp32"),
                         runs_root=tmp_path)


def test_chroma_denoiser_sees_the_aligned_mask(comfy, chroma, tmp_path):
    model, cond = chroma
    loop = comfy.engine("train.loop")
    emb, extras = cond[0]
    mask = extras["attention_mask"]
    visible = int(mask.sum())
    assert emb.shape[1] == 512 and mask.shape == (1, 512)
    assert visible < 512 and bool(mask[0, :visible].all())  # content + the one visible pad token, then masked

    trainer = loop.Trainer(_run(comfy, model, cond, tmp_path))
    try:
        g = torch.Generator().manual_seed(1)
        x0, noise = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
        sigma = model.model.model_sampling.percent_to_sigma(0.4) * torch.ones(1)
        with torch.no_grad():
            got, _ = trainer.predict(x0, noise, sigma, [cond])  # adapters start at zero: the base model's output

            base, ms = model.model, model.model.model_sampling
            xt = ms.noise_scaling(sigma, noise, x0)

            def comfy_pred(context):
                kw = {k: v.cond for k, v in base.extra_conds(cross_attn=context, pooled_output=None, noise=xt,
                                                             device="cpu",
                                                             guidance=trainer.run.settings.guidance).items()}
                return loop.native(ms, sigma.view(1, 1, 1, 1), xt, base.apply_model(xt, sigma, **kw))

            cut, unmasked = comfy_pred(emb[:, :visible].clone()), comfy_pred(emb.clone())
    finally:
        trainer.release()
    assert torch.allclose(got, cut, atol=1e-5), (got - cut).abs().max()
    assert (got - unmasked).abs().max() > 1e-3  # the mask changes the result: without it this test fails


def test_chroma_trains_on_the_aligned_prompt(comfy, chroma, tmp_path):
    model, cond = chroma
    loop, export = comfy.engine("train.loop"), comfy.engine("train.export")
    out = loop.train_steps(_run(comfy, model, cond, tmp_path), 2)
    assert all(torch.isfinite(torch.tensor([h["loss"] for h in out.history])))
    assert any(v.abs().sum() > 0 for k, v in out.state["adapters"].items() if "lora_up" in k)
    assert export.unmapped_keys(model, export.kohya_state_dict(out)) == []
