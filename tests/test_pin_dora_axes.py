"""Output-axis DoRA's file form (train/dora_axes.py) pinned on the tiny SD1.5 (issue #26): a hand-built LoRA pair
with magnitudes m on two linears (one without alpha) and a 3x3 convolution of the UNet, turned into ComfyUI's ``dora_scale`` by
``for_comfyui`` and loaded by ComfyUI's stock LoRA loader, merges to peft's DoRA weight written out here,
W' = (W + s up@down) * m / ||W + s up@down||_row (s = alpha / rank); ``from_comfyui`` gives m back; the axis test
is ComfyUI's (first dimension = the weight's output size); the model's parameters stay leaves (found broken: the
base weight was read with ``Tensor.dequantize``, which made an ordinary Parameter a non-leaf)."""
from __future__ import annotations

import torch


def _pair(w: torch.Tensor, rank: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    out, k = w.shape[0], w[0].numel()
    up = torch.randn(out, rank, generator=g) * 0.05
    down = torch.randn(rank, k, generator=g) * 0.05
    if w.dim() == 4:  # kohya's conv layout: up (out, r, 1, 1), down (r, in, kh, kw)
        up, down = up.reshape(out, rank, 1, 1), down.reshape(rank, *w.shape[1:])
    m = w.reshape(out, -1).norm(dim=1) * (1.0 + 0.5 * torch.rand(out, generator=g))
    return {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0), "dora_magnitude": m}


def test_for_comfyui_merges_to_peft_dora_in_comfyuis_loader(comfy, T, sd15):
    import comfy.lora as comfy_lora
    import comfy.sd as comfy_sd

    dora_axes = comfy.engine("train.dora_axes")

    model = sd15[0]
    dm = model.model.diffusion_model
    linear = next(n for n, m in dm.named_modules() if n.endswith("attn1.to_q"))
    no_alpha = next(n for n, m in dm.named_modules() if n.endswith("attn1.to_k"))  # no alpha: scale 1 (alpha = rank)
    conv = next(n for n, m in dm.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
                and n.startswith("output_blocks"))
    g = torch.Generator().manual_seed(0)
    rank = 2
    adapters, expected = {}, {}
    for module in (linear, conv, no_alpha):
        w = dm.get_submodule(module).weight.detach().float()
        pair = _pair(w, rank, g)
        if module == no_alpha:
            del pair["alpha"]
        adapters.update({f"{module}.{k}": v for k, v in pair.items()})
        s = float(pair["alpha"]) / rank if "alpha" in pair else 1.0
        merged = w + s * (pair["lora_up.weight"].reshape(w.shape[0], -1)
                          @ pair["lora_down.weight"].reshape(rank, -1)).reshape(w.shape)
        norm = merged.reshape(w.shape[0], -1).norm(dim=1)
        expected[module] = merged * (pair["dora_magnitude"] / norm).reshape(-1, *[1] * (w.dim() - 1))
    before = dict(adapters)
    assert dora_axes.has_output_axis(adapters) and not dora_axes.has_output_axis(
        {k: v for k, v in adapters.items() if not k.endswith("dora_magnitude")})
    file = dora_axes.for_comfyui(model, adapters)
    assert adapters.keys() == before.keys() and all(adapters[k] is before[k] for k in before)  # input unchanged
    assert not any(k.endswith("dora_magnitude") for k in file)
    patched, _ = comfy_sd.load_lora_for_models(model, None, T.export.kohya_from_adapters(file, torch.float32), 1.0, 0)
    for module in (linear, conv, no_alpha):
        w = dm.get_submodule(module).weight.detach().float()
        scale = file[f"{module}.dora_scale"]
        assert tuple(scale.shape) == (w.shape[0],) + (1,) * (w.dim() - 1)
        assert dora_axes.is_output_axis_scale(scale, w.shape)
        assert not dora_axes.is_output_axis_scale(torch.ones(1, w.shape[1]), w.shape)
        key = f"diffusion_model.{module}.weight"
        got = comfy_lora.calculate_weight(patched.patches[key], w.clone(), key)
        torch.testing.assert_close(got, expected[module], rtol=1e-4, atol=1e-6)
        back = dora_axes.from_comfyui(model, adapters, module, scale)
        torch.testing.assert_close(back, adapters[f"{module}.dora_magnitude"], rtol=1e-5, atol=1e-7)
    plain = {k: v for k, v in adapters.items() if not k.endswith("dora_magnitude")}
    assert dora_axes.for_comfyui(model, plain) is plain
    # reading the base weights leaves the shared model's parameters as they were: leaves that Train Init can
    # freeze (Tensor.dequantize on an ordinary Parameter returned the Parameter itself and made it a non-leaf)
    assert all(p.is_leaf for p in dm.parameters())
