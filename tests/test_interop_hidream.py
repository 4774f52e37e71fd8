"""HiDream-I1 LoRA files as ai-toolkit writes them (the reference trainer for HiDream-I1: lora_formats.json
``HiDream``): peft pairs under ``diffusion_model.<module>`` with no alpha, ``ss_base_model_version hidream_i1``.
ComfyUI maps every key, and diffusers' ``HiDreamImagePipeline.load_lora_weights(path)`` puts an adapter on every
module of the file of a diffusers transformer holding the same weights, whose output then equals ComfyUI's (same
file through ComfyUI's stock loader) within 1e-4."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from support.factories import diffusers_ref as R
from support.factories import families, te_hidream
from test_interop_diffusers import _run, comfy_unet_out


@pytest.mark.parametrize("preset", ["all-linear"])
def test_hidream_lora_is_ai_toolkits_and_loads_in_diffusers_as_in_comfyui(T, family_bundle, tmp_path, preset):
    model, _, _ = family_bundle("hidream")
    g = torch.Generator().manual_seed(0)
    t5_w, llama_w = families.HIDREAM_DIT["caption_channels"]
    layers = te_hidream.LLAMA_TINY["num_hidden_layers"]
    pooled_w = families.HIDREAM_DIT["text_emb_dim"]
    # conditioning shaped as HiDream's CLIPTextEncode gives it (T5 states, pooled CLIP-L + CLIP-G, the Llama stack)
    cond = [[torch.randn(1, 8, t5_w, generator=g), {"pooled_output": torch.randn(1, pooled_w, generator=g),
                                                     "conditioning_llama3": torch.randn(1, layers, 8, llama_w, generator=g)}]]
    tset = T.types.TrainingSet((T.types.Sample("a", torch.randn(16, 8, 8, generator=g),
                                               (T.types.CaptionVariant("ohwx", cond),), bucket=(64, 64)),))
    lora = T.C.LoraConfig(rank=4, alpha=2, preset=preset)
    run = _run(T, model, tset, tmp_path, lora, "hidream_dl")
    path, report = T.export.save_lora(run, "hidream_dl", folder=tmp_path / "loras", dtype=torch.float32)
    d = report["diffusers"]
    assert d["checked"] and d["pipeline"] == "HiDreamImagePipeline" and not d["dropped"] and not d["refused"], d
    with safe_open(str(path), framework="pt") as f:
        keys, md = set(f.keys()), f.metadata()
        sd = {k: f.get_tensor(k) for k in keys}
    # ai-toolkit's layout: peft pairs under diffusion_model.<diffusers module> (= ComfyUI's), no alpha
    assert all(k.startswith("diffusion_model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    modules = {k.rsplit(".", 2)[0].removeprefix("diffusion_model.") for k in keys}
    trained = {k[:-len(".lora_up.weight")] for k in run.state["adapters"] if k.endswith(".lora_up.weight")}
    assert modules == trained
    assert {"double_stream_blocks.0.block.attn1.to_q", "single_stream_blocks.0.block.ff_i.experts.3.w2",
            "double_stream_blocks.0.block.ff_t.w1", "caption_projection.2.linear"} <= modules
    assert md["ss_base_model_version"] == "hidream_i1" and "modelspec.prediction_type" not in md
    assert T.export.unmapped_keys(model, sd) == []
    # alpha/rank folded into B (ai-toolkit's files: alpha = rank, scale 1)
    m = "double_stream_blocks.0.block.attn1.to_q"
    assert torch.allclose(sd[f"diffusion_model.{m}.lora_B.weight"], run.state["adapters"][f"{m}.lora_up.weight"] * 0.5)
    # Train Init's init_lora reads the file back into the run's own adapters
    back = T.interop.adapters_from_lora(model, sd, sorted(trained), lora)
    for k, v in run.state["adapters"].items():
        if k.endswith(("lora_up.weight", "lora_down.weight")):
            assert torch.allclose(back[k].reshape(v.shape), v.float(), atol=1e-6), k

    pipe = R.hidream_transformer_pipeline(model.model.diffusion_model.state_dict())
    x, t = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([500.0])
    t5, pooled = torch.randn(1, 6, t5_w, generator=g), torch.randn(1, pooled_w, generator=g)
    llama = torch.randn(1, layers, 6, llama_w, generator=g)
    d_in = {"hidden_states": x, "timesteps": t, "encoder_hidden_states_t5": t5,
            "encoder_hidden_states_llama3": llama.movedim(1, 0), "pooled_embeds": pooled}
    c_in = {"x": x, "t": t, "context": t5, "y": pooled, "encoder_hidden_states_llama3": llama}
    pipe.load_lora_weights(str(path), adapter_name="default_0")
    try:
        assert len(R.lora_modules(pipe.transformer)) == len(modules)
        with torch.no_grad():
            ours = pipe.transformer(**d_in).sample
            pipe.transformer.disable_adapters()
            base = pipe.transformer(**d_in).sample
            pipe.transformer.enable_adapters()
            comfy_base = model.model.diffusion_model(**c_in).float()
    finally:
        pipe.unload_lora_weights()
    # ComfyUI's HiDream returns the negated prediction (its model_sampling's sign); the same weights first
    assert float((base + comfy_base).abs().max()) < 1e-5, "the diffusers transformer must equal ComfyUI's first"
    comfy_out = comfy_unet_out(T, model, sd, **c_in)
    assert (ours - base).abs().max() > 1e-2, "the LoRA must visibly change the output"
    err = float((ours + comfy_out).abs().max())
    assert err < 1e-4, err


def test_attention_mlp_preset_selects_both_streams_and_every_swiglu_of_hidream(T, family_bundle):
    """The attention / attention+mlp presets reach every Linear of HiDream's blocks that ai-toolkit trains: both
    streams' attention (image to_q/k/v/out, text to_q_t/k_t/v_t/out_t in the double-stream blocks) and every SwiGLU
    (ff_i: shared and routed experts, ff_t), in the double- and single-stream blocks. The expected sets come from
    walking the model: the Linears under each block's attn1 and under its ff_i / ff_t. The MoE gate is a bare
    Parameter (no Linear): never a target. Nothing outside the blocks' attention and MLPs is picked (adaLN
    modulation, embedders, caption projections, final layer)."""
    model, _, _ = family_bundle("hidream")
    net = model.model.diffusion_model

    def linears(prefix: str, module) -> set[str]:
        return {f"{prefix}.{n}" for n, m in module.named_modules()
                if isinstance(m, torch.nn.Linear) and hasattr(m, "weight_function")}

    attn, mlp, gates = set(), set(), set()
    for stream in ("double_stream_blocks", "single_stream_blocks"):
        for i, b in enumerate(getattr(net, stream)):
            p = f"{stream}.{i}.block"
            attn |= linears(f"{p}.attn1", b.block.attn1)
            for ff in ("ff_i", "ff_t"):
                if hasattr(b.block, ff):
                    mlp |= linears(f"{p}.{ff}", getattr(b.block, ff))
                    gate = getattr(getattr(b.block, ff), "gate", None)
                    if gate is not None:
                        assert isinstance(gate.weight, torch.nn.Parameter) and not isinstance(gate, torch.nn.Linear)
                        gates.add(f"{p}.{ff}.gate")
    # the walk found what the brief names: both streams' attention, shared and routed experts, ff_t, a gate
    assert any(n.endswith("attn1.to_out_t") for n in attn) and any(n.endswith("attn1.to_out") for n in attn)
    assert any(".ff_i.shared_experts." in n for n in mlp) and any(".ff_i.experts.3.w3" in n for n in mlp)
    assert any(".ff_t.w2" in n for n in mlp) and any(n.startswith("single_stream_blocks.0.block.ff_i") for n in mlp)
    assert gates
    select = lambda preset: set(T.ad.target_layers(net, T.C.LoraConfig(preset=preset)))  # noqa: E731
    assert select("attention") == attn, sorted(attn ^ select("attention"))
    assert select("attention+mlp") == attn | mlp, sorted((attn | mlp) ^ select("attention+mlp"))
    assert not any(n.startswith(tuple(gates)) for n in select("all-linear"))
