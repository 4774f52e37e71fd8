"""The ``full`` algorithm's trainable difference (train/full.py, issue #26): on a bf16 base weight, as ComfyUI keeps
SD1.5's UNet on a GPU, the effective weight is W + D computed in the base's dtype (a bf16 tensor equal to
``w + d.to(bf16)``), not promoted to D's fp32; D starts at zero, so the untrained adapter returns W exactly."""
from __future__ import annotations

import torch


def test_full_difference_is_added_in_the_base_weights_dtype(comfy):
    full = comfy.engine("train.full")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=g).to(torch.bfloat16)
    a = full.FullDiff.create_train(w)
    assert torch.equal(a(w), w)  # the zero init changes nothing
    with torch.no_grad():
        a.diff.copy_(torch.randn(6, 5, generator=g) * 0.1)
    out = a(w)
    assert out.dtype == torch.bfloat16 and a.diff.dtype == torch.float32
    assert torch.equal(out, w + a.diff.to(torch.bfloat16))
    assert not torch.equal(out, w)
