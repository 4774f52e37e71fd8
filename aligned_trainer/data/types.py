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
    control_latents: tuple[torch.Tensor, ...] = ()  # image-edit training: each control image's latent (C, H, W), one
                                  # per control folder in folder order, as ``latent`` (before process_latent_in); given
                                  # to the model as ComfyUI's reference_latents
    empty_conditioning: list | None = None  # the empty caption's conditioning for this sample when it differs per
                                  # sample (a text encoder that reads the control image: Qwen-Image-Edit); else the set's


    @property
    def control_latent(self) -> torch.Tensor | None:
        """The first control latent (the only one with one control folder), or None."""
        return self.control_latents[0] if self.control_latents else None


@dataclass(frozen=True)
class TrainingSet:
    samples: tuple[Sample, ...]
    empty_conditioning: list | None = None  # conditioning used for caption dropout (spec's empty prompt); None when
                                             # each sample has its own (Sample.empty_conditioning)
    caption_dropout: float = 0.0             # probability of using ``empty_conditioning`` in a step
    te_spec_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # dataset hash, bucket table, cache dirs, ...

    def __len__(self) -> int:
        return len(self.samples)


def with_reference(conditioning: list, sample: Sample) -> list:
    """``conditioning`` with the sample's control latents appended to its ``reference_latents`` in folder order, as
    ComfyUI's ReferenceLatent nodes chained one per control image append a LATENT's samples each
    (``node_helpers.conditioning_set_values(..., append=True)``: a (1, C, H, W) tensor per reference); unchanged
    when the sample has no control image. The model's own ``extra_conds`` turn them into what its forward takes
    (FLUX: ``ref_latents``)."""
    if not sample.control_latents:
        return conditioning
    refs = [c[None] for c in sample.control_latents]
    return [[c, {**x, "reference_latents": [*x.get("reference_latents", []), *refs]}] for c, x in conditioning]
