"""HunyuanVideo 1.5 (issue #21's optional family): the tiny transformer of ComfyUI's HunyuanVideo15 config
(support.factories.hunyuan_video15) trains on 32-channel video latents with the flow target on its shift, and the
LoRA maps completely in ComfyUI's loader, with musubi-tuner's metadata for the family."""
from __future__ import annotations

import importlib
import math

import torch
from safetensors import safe_open

from support.factories import hunyuan_video15 as hv15
from support.factories import te_hunyuan_video15 as hv15_te
from support.factories import te_qwen_image


def test_hunyuan_video15_trains_and_its_lora_maps(comfy, tmp_path):
    """The caption encoded by the aligned text encoders (spec hunyuan-video-1.5, default variant: tiny Qwen2.5-VL
    and byT5 in ComfyUI's classes; the caption has quoted text, so both streams), one 2-frame latent clip: 2 steps
    with finite loss through the model's own forward (concat of the empty image latent and mask, byT5 states read
    by the model's byT5 mapper, no vision input, as in text-to-video); LoRA on attention and MLP of both streams,
    0 unmapped keys."""
    sm = importlib.import_module("comfy.supported_models")
    types, C, st, loop, export = (comfy.engine(m) for m in ("data.types", "train.config", "train.state",
                                                             "train.loop", "train.export"))
    model = hv15.build_model(context_in_dim=te_qwen_image.QWEN25VL_TINY["hidden_size"])
    assert isinstance(model.model.model_config, sm.HunyuanVideo15)
    assert float(model.get_model_object("model_sampling").shift) == sm.HunyuanVideo15.sampling_settings["shift"]
    g = torch.Generator().manual_seed(0)
    clip = comfy.engine("te.align").align_clip(
        hv15_te.shared_hv15_clip(hv15_te.qwen25vl_tiny_file(), hv15_te.byt5_tiny_file()), "hunyuan-video-1.5")
    with torch.no_grad():
        cond = clip.encode_from_tokens_scheduled(clip.tokenize('ohwx, a shop sign that says "OPEN"'))
    assert cond[0][0].shape[-1] == te_qwen_image.QWEN25VL_TINY["hidden_size"] and "attention_mask" not in cond[0][1]
    assert cond[0][1]["conditioning_byt5small"].shape[1] == len(b'Text "OPEN". ') + 1  # the glyph text and </s>
    byt5_calls = []
    hook = model.model.diffusion_model.byt5_in.register_forward_hook(lambda m, a, o: byt5_calls.append(a[0].shape))
    lat = torch.randn(32, 2, 4, 4, generator=g)
    ts = types.TrainingSet((types.Sample("a", lat, (types.CaptionVariant("ohwx", cond),), bucket=(64, 64)),))
    run = loop.init_run(model, ts, C.LoraConfig(rank=4, alpha=4, preset="attention+mlp"), C.TimestepConfig(),
                        C.OptimizerConfig(lr=1e-3), st.RunSettings(run_name="hv15", val_count=0), runs_root=tmp_path)
    out = loop.train_steps(run, 2)
    hook.remove()
    assert byt5_calls and all(c[1:] == cond[0][1]["conditioning_byt5small"].shape[1:] for c in byt5_calls)
    assert len(out.history) == 2 and all(math.isfinite(h["loss"]) for h in out.history)
    ups = {k: v for k, v in out.state["adapters"].items() if "lora_up" in k}
    for part in ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_mlp.2", "single_blocks.0.linear1"):
        assert any(part in k for k in ups), (part, list(ups))
    sd = export.kohya_state_dict(out)
    assert "lora_unet_double_blocks_0_img_mlp_0.lora_down.weight" in sd and export.unmapped_keys(model, sd) == []
    path, _ = export.save_lora(out, "hv15", folder=tmp_path / "loras")
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
    assert (md["ss_base_model_version"], md["ss_network_module"]) == ("hunyuan_video_1_5", "networks.lora_hv_1_5")
    assert md["modelspec.architecture"] == "hunyuan-video-1.5/lora" and "modelspec.prediction_type" not in md
