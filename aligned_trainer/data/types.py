"""The contract between the data nodes and the training engine.

The data side produces a :class:`TrainingSet`; the training side only reads it. Both are immutable:
ComfyUI caches node outputs and hands the same object to several consumers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class CaptionVariant:
    """One processed caption and its text conditioning (ComfyUI CONDITIONING: ``[[cond, extras]]``,
    ``cond`` of shape (1, tokens, dim); extras hold ``pooled_output``, ``attention_mask``, ...)."""

    text: str
    conditioning: list


@dataclass(frozen=True)
class Sample:
    key: str                      # stable identity: image file/bytes hash + bucket + crop + flip
    latent: torch.Tensor          # (C, H, W) as ComfyUI's VAE.encode returns it (before process_latent_in)
    captions: tuple[CaptionVariant, ...]  # >= 1; training draws one per step (shuffle / dropout variants)
    weight: float = 1.0           # loss weight (regularization images use the dataset's reg weight)
    is_reg: bool = False
    bucket: tuple[int, int] = (0, 0)  # (width, height) in pixels
    repeats: int = 1              # kohya folder repeats: drawn this many times as often


@dataclass(frozen=True)
class TrainingSet:
    samples: tuple[Sample, ...]
    empty_conditioning: list | None = None  # conditioning used for caption dropout (spec's empty prompt)
    caption_dropout: float = 0.0             # probability of using ``empty_conditioning`` in a step
    te_spec_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # dataset hash, bucket table, cache dirs, ...

    def __len__(self) -> int:
        return len(self.samples)
