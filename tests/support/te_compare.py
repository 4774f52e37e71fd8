"""Shared helpers of the text-encoder parity tests (aligned encoders vs the diffusers pipelines)."""
from __future__ import annotations

import torch


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference of two same-shaped tensors (in fp32)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def encode(clip, prompt: str) -> dict:
    """``clip``'s conditioning for ``prompt`` as a dict (cond, pooled_output, attention_mask...)."""
    with torch.no_grad():
        return clip.encode_from_tokens(clip.tokenize(prompt), return_dict=True)
