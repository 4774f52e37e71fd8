"""Full fine-tuning of chosen layers, as a trainable difference per weight: ``W_eff = W + D``, ``D`` starting at 0.

The shared base weights of the ComfyUI model are never written: ``D`` is applied through ComfyUI's weight wrapper
(``ModelPatcher.add_weight_wrapper``) like the weight-side LoRA adapters, so EMA, checkpoints, resume, max-norm
(a no-op here) and the exported file come from the same machinery. The exported form is ComfyUI's ``.diff`` key
(``comfy/lora.py``; LyCORIS' "full" algorithm writes the same), which the stock LoRA loaders apply.

``FullDiff`` has the ``create_train(weight, rank, alpha)`` constructor of ComfyUI's train adapters
(``comfy/weight_adapter``); rank and alpha mean nothing for it and are ignored. Memory: one fp32 copy of each
trained weight, its gradient and the optimizer's moments (4-5 x the layers' size): plan for it (8-bit optimizers,
gradient checkpointing) when training many layers.
"""
from __future__ import annotations

import torch

PARAM = "diff"   # the state key of a layer's difference: '<layer>.diff' (the file key's suffix as well)


class FullDiff(torch.nn.Module):
    """The trainable difference of one weight."""

    def __init__(self, shape):
        super().__init__()
        self.diff = torch.nn.Parameter(torch.zeros(tuple(shape)))
        self.rank, self.alpha = 1, 1.0  # the attributes ComfyUI's adapters have; never read for 'full'

    @classmethod
    def create_train(cls, weight: torch.Tensor, rank: int = 1, alpha: float = 1.0) -> "FullDiff":
        return cls(weight.shape)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.diff.to(device=w.device, dtype=w.dtype)
