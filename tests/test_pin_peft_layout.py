"""The peft layout (train/peft_layout.py) pinned on the tiny SD3 (issue #26, survivors of the first run): a fused
qkv LoRA split into to_q/to_k/to_v whose B parts and DoRA magnitudes put back together in row order give the
scaled up matrix and the magnitudes; the final adaLN's rows (swap_scale_shift) swapped halves; a conv layer's
magnitude in peft's (1, out, 1, 1); alpha/rank folded into B, no alpha = scale 1; which files take the layout."""
from __future__ import annotations

import torch


def test_fused_swapped_and_conv_modules_split_as_peft_reads_them(comfy, family_bundle):
    pl = comfy.engine("train.peft_layout")
    model = family_bundle("sd3")[0]
    dm = model.model.diffusion_model
    mods = dict(dm.named_modules())
    table = {m: parts for m, parts in pl.targets(model).items() if m in mods}  # the tiny model's layers
    fused = next(m for m, parts in table.items() if len(parts) == 3 and all(o is not None for _, o, _ in parts))
    swapped = next(m for m, parts in table.items() if any(fn is not None for _, _, fn in parts))
    conv = next(m for m in table if isinstance(mods[m], torch.nn.Conv2d))
    g = torch.Generator().manual_seed(0)
    sd, mags, ups = {}, {}, {}
    for m, alpha in ((fused, 2.0), (swapped, None), (conv, 8.0)):
        w = dm.get_submodule(m).weight
        down = torch.randn((4, *w.shape[1:]), generator=g)
        ups[m] = torch.randn((w.shape[0], 4, *[1] * (w.ndim - 2)), generator=g)
        sd[f"{m}.lora_down.weight"], sd[f"{m}.lora_up.weight"] = down, ups[m]
        if alpha is not None:
            sd[f"{m}.alpha"] = torch.tensor(alpha)
        mags[m] = torch.rand(w.shape[0], generator=g) + 0.5
    out = pl.from_kohya(model, sd, mags)
    pre = "transformer."
    # fused: the parts in row order are the up matrix scaled by alpha / rank = 0.5, each with the same A
    parts = sorted(table[fused], key=lambda p: p[1][1])
    assert [p[1][0] for p in parts] == [0, 0, 0]
    b = torch.cat([out[f"{pre}{d}.lora_B.weight"] for d, _, _ in parts])
    mag = torch.cat([out[f"{pre}{d}.lora_magnitude_vector"] for d, _, _ in parts])
    assert torch.equal(b, ups[fused] * 0.5) and torch.equal(mag, mags[fused])
    assert all(torch.equal(out[f"{pre}{d}.lora_A.weight"], sd[f"{fused}.lora_down.weight"]) for d, _, _ in parts)
    # swap_scale_shift: the halves of the rows swapped, B unscaled (no alpha)
    (d, _, _), = table[swapped]
    half = ups[swapped].shape[0] // 2
    assert torch.equal(out[f"{pre}{d}.lora_B.weight"], torch.cat([ups[swapped][half:], ups[swapped][:half]]))
    assert torch.equal(out[f"{pre}{d}.lora_magnitude_vector"], torch.cat([mags[swapped][half:], mags[swapped][:half]]))
    # conv: B scaled by 8 / 4, the magnitude as peft keeps a conv DoRA's
    (d, _, _), = table[conv]
    assert torch.equal(out[f"{pre}{d}.lora_B.weight"], ups[conv] * 2.0)
    assert torch.equal(out[f"{pre}{d}.lora_magnitude_vector"], mags[conv].reshape(1, -1, 1, 1))
    # without magnitudes for a module: none written for it
    plain = pl.from_kohya(model, sd, {conv: mags[conv]})
    assert not any(k.endswith("lora_magnitude_vector") and "conv" not in k and d not in k for k in plain)
    assert sum(k.endswith("lora_magnitude_vector") for k in plain) == 1
    # the layout applies to LoRA pairs and alphas of a family that asks for it
    assert pl.applies(model, list(sd)) and not pl.applies(model, [*sd, f"{fused}.hada_w1_a"])
