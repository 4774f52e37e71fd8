"""The trainer trains the tiny SDXL / SD3 / FLUX.1 / Z-Image / Chroma / Qwen-Image / Lumina 2 / HiDream bundles (each family's own target: eps, flow velocity;
pooled and size conditioning; guidance embedding) with finite loss, and the saved LoRA maps completely in
ComfyUI's stock loader."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from support.factories import families


# family -> (a key of its LoRA as the reference trainer names it, metadata as that trainer writes it; None = absent).
# Lumina 2: kohya sd-scripts (networks/lora_lumina.py, library/lumina_util.py, library/sai_model_spec.py: epsilon
# for every non-FLUX model); Z-Image: musubi-tuner in ComfyUI's names (networks/convert_z_image_lora_to_comfy.py),
# no prediction type; Qwen-Image: musubi-tuner (networks/lora_qwen_image.py).
REFERENCE_METADATA = {
    "lumina2": ("lora_unet_layers_0_attention_qkv.lora_up.weight",
                {"ss_base_model_version": "lumina2", "ss_network_module": "networks.lora_lumina",
                 "modelspec.architecture": "lumina-2/lora",
                 "modelspec.implementation": "https://github.com/Alpha-VLLM/Lumina-Image-2.0",
                 "modelspec.prediction_type": "epsilon"}),
    "z-image": ("lora_unet_layers_0_attention_out.lora_up.weight",
                {"ss_base_model_version": "z_image", "ss_network_module": "networks.lora_zimage",
                 "modelspec.architecture": "Z-Image/lora", "modelspec.implementation": "https://github.com/Tongyi-MAI/Z-Image",
                 "modelspec.prediction_type": None}),
    "qwen-image": ("lora_unet_transformer_blocks_0_attn_add_q_proj.lora_up.weight",
                   {"ss_base_model_version": "qwen_image", "ss_network_module": "networks.lora_qwen_image",
                    "modelspec.architecture": "Qwen-Image/lora",
                    "modelspec.implementation": "https://github.com/QwenLM/Qwen-Image", "modelspec.prediction_type": None}),
}


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

    def init(run_name, resume="none"):
        return loop.init_run(model, ts, C.LoraConfig(rank=4, alpha=4, preset="attention"), tcfg,
                             C.OptimizerConfig(lr=1e-3), st.RunSettings(run_name=run_name, batch_size=1),
                             runs_root=tmp_path, resume=resume)

    out = loop.train_steps(init(name), 2, val_every=2)
    losses = [h["loss"] for h in out.history] + [out.history[-1]["val_loss"]]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert any(v.abs().sum() > 0 for k, v in out.state["adapters"].items() if "lora_up" in k)
    sd = export.kohya_state_dict(out)
    assert export.unmapped_keys(model, sd) == []
    if name in REFERENCE_METADATA:  # the reference trainer's key names and metadata
        key, md_expected = REFERENCE_METADATA[name]
        assert key in sd, (key, sorted(sd)[:8])
        path, _ = export.save_lora(out, name, folder=tmp_path / "loras")
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata()
        assert {k: md.get(k) for k in md_expected} == md_expected
    # resume is exact in every family: 1 step, a checkpoint, a new Train Init from it, 1 more == 2 straight
    loop.train_steps(init("half"), 1, val_every=2, checkpoint_every=1)
    resumed = loop.train_steps(init("half", "latest"), 1, val_every=2)
    assert resumed.step == 2 and [h["loss"] for h in resumed.history] == [h["loss"] for h in out.history]
    for k, v in out.state["adapters"].items():
        assert torch.equal(v, resumed.state["adapters"][k]), (name, k)


def test_flux_gradient_checkpointing_same_result(comfy, family_bundle, tmp_path):
    """FLUX's blocks add into their input and into activations they saved (``img += ...``): with gradient
    checkpointing the recomputation must still see the forward's values, so training with it equals training
    without (which keeps copies of saved tensors)."""
    model, clip, vae = family_bundle("flux1-dev")
    types = comfy.engine("data.types")
    C = comfy.engine("train.config")
    st = comfy.engine("train.state")
    loop = comfy.engine("train.loop")
    (cond,) = comfy.nodes.CLIPTextEncode().encode(clip, "ohwx, a red circle")
    lat = torch.randn(16, 8, 8, generator=torch.Generator().manual_seed(0))
    ts = types.TrainingSet((types.Sample("a", lat, (types.CaptionVariant("ohwx", cond),), bucket=(64, 64)),))
    out = {}
    for gc in (False, True):
        run = loop.init_run(model, ts, C.LoraConfig(rank=4, alpha=4, preset="all-linear+conv"), C.TimestepConfig(),
                            C.OptimizerConfig(lr=1e-3), st.RunSettings(run_name=f"gc{gc}", gradient_checkpointing=gc),
                            runs_root=tmp_path)
        out[gc] = loop.train_steps(run, 2)
    assert [h["loss"] for h in out[False].history] == pytest.approx([h["loss"] for h in out[True].history], rel=1e-5)
    for k, v in out[False].state["adapters"].items():
        assert torch.allclose(v, out[True].state["adapters"][k], atol=1e-6), k


def test_qwen_image_trains_both_streams_and_plans_its_memory(comfy, family_bundle, tmp_path):
    """Qwen-Image (ComfyUI's QwenImage config and model, shrunk; its Qwen2.5-VL text encoder through ComfyUI's own
    Qwen-Image classes; one-frame latents of the Wan 2.1 VAE's 16 channels): ``attention+mlp`` trains both streams of
    the joint blocks, and the memory plan probes the model on its 5-D latent."""
    model, clip, vae = family_bundle("qwen-image")
    types = comfy.engine("data.types")
    C = comfy.engine("train.config")
    st = comfy.engine("train.state")
    loop = comfy.engine("train.loop")
    export = comfy.engine("train.export")
    (cond,) = comfy.nodes.CLIPTextEncode().encode(clip, "ohwx, a red circle")
    assert cond[0][0].shape[-1] == families.QWEN_IMAGE_DIT["joint_attention_dim"]
    lat = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ts = types.TrainingSet((types.Sample("a", lat, (types.CaptionVariant("ohwx", cond),), bucket=(64, 64)),))
    assert comfy.engine("train.timesteps").is_flow(model.model.model_sampling)
    run = loop.init_run(model, ts, C.LoraConfig(rank=4, alpha=4, preset="attention+mlp"), C.TimestepConfig(),
                        C.OptimizerConfig(lr=1e-3), st.RunSettings(run_name="qwen", gradient_checkpointing=True,
                                                                    memory_budget_gb=64),
                        runs_root=tmp_path)
    assert "(not probed" not in run.meta["memory_plan"]  # the probe ran on the 5-D latent
    out = loop.train_steps(run, 1)
    assert torch.isfinite(torch.tensor(out.history[-1]["loss"]))
    ups = {k: v for k, v in out.state["adapters"].items() if "lora_up" in k}
    # attention+mlp covers both streams of the joint blocks: image (to_q, img_mlp) and text (add_q_proj, txt_mlp)
    for part in ("attn.to_q.", "attn.add_q_proj.", "attn.to_add_out.", "img_mlp.net.0.proj.", "txt_mlp.net.2."):
        assert any(part in k for k in ups), (part, list(ups))
    assert any(v.abs().sum() > 0 for v in ups.values())
    assert export.unmapped_keys(model, export.kohya_state_dict(out)) == []


def test_captions_of_different_lengths_batch_as_comfyui_runs_them(comfy, family_bundle, tmp_path):
    """Lumina 2's aligned captions keep their own lengths (masks, no padding to a common length), which ComfyUI's
    conds cannot batch: such samples run in separate forwards as ComfyUI's sampler runs them, so each sample's
    prediction in a batch of 2 equals its prediction alone, and a batch-2 run trains."""
    model, clip, vae = family_bundle("lumina2")
    types = comfy.engine("data.types")
    C = comfy.engine("train.config")
    st = comfy.engine("train.state")
    loop = comfy.engine("train.loop")
    caps = ["ohwx", "ohwx, a red circle on a blue square, simple flat colours, centred"]
    conds = [comfy.nodes.CLIPTextEncode().encode(clip, c)[0] for c in caps]
    assert conds[0][0][0].shape[1] != conds[1][0][0].shape[1]
    g = torch.Generator().manual_seed(0)
    lats = [torch.randn(16, 8, 8, generator=g) for _ in caps]
    ts = types.TrainingSet(tuple(types.Sample(f"s{i}", lat, (types.CaptionVariant(c, cond),), bucket=(64, 64))
                                 for i, (lat, c, cond) in enumerate(zip(lats, caps, conds))))
    run = loop.init_run(model, ts, C.LoraConfig(rank=4, alpha=4, preset="attention"), C.TimestepConfig(),
                        C.OptimizerConfig(lr=1e-3), st.RunSettings(run_name="mixed", batch_size=2, val_count=0),
                        runs_root=tmp_path)
    with torch.inference_mode(False), torch.no_grad():
        tr = loop.Trainer(run)
        tr.load()
        try:
            x = torch.stack(lats) + torch.randn(2, 16, 8, 8, generator=g)
            sigma = torch.tensor([0.7, 0.3])
            both = tr.predict_at(x, sigma, conds)
            alone = torch.cat([tr.predict_at(x[i:i + 1], sigma[i:i + 1], conds[i:i + 1]) for i in range(2)])
        finally:
            tr.release()
    assert torch.allclose(both, alone, atol=1e-6), float((both - alone).abs().max())
    out = loop.train_steps(run, 1)
    assert math.isfinite(out.history[-1]["loss"])
