"""Text-encoder swap, the pooled vector of a UNet with an adm (SDXL: its ``y`` starts with the old encoder's
``pooled_output``, then size embeddings).

:func:`pooled_dim` reads the pooled vector's width off the old encoder. The projection's context (the trainer's hook
and the Apply node alike) gives the adm a pooled vector of that width through :func:`with_pooled`: zero (``pooled =
"zero"``), or (``"projected"``) the new encoder's own pooled vector (:func:`pooled_source`: its ``pooled_output``,
else the mean of its valid token states) through a trainable Linear (the *head*, :func:`add_head`), times a fixed
``pooled_scale`` chosen by :func:`fit_scale_` so that its spread on the captions equals the old pooled vector's.
The head lives on the projection module as ``pooled`` (Linear) and ``pooled_scale`` (buffer): those state keys are
what projection files and checkpoints hold.
"""
from __future__ import annotations

import torch

from .te_swap_measure import SwapError, vector_std

POOLED = ("zero", "projected")           # what an adm model's pooled input gets


def _adm(model) -> int:
    return int(getattr(model.model, "adm_channels", 0) or 0)


def check_option(model, pooled: str) -> None:
    """Refuse a ``pooled`` choice the setup cannot honour on ``model``, with the fix."""
    if pooled not in POOLED:
        raise SwapError(f"pooled {pooled!r} is not one of {POOLED}")
    if pooled == "projected" and not _adm(model):
        raise SwapError("pooled 'projected' is for a model that reads a pooled text vector (an adm, e.g. SDXL); "
                        "this model has none: set pooled to 'zero'")


def pooled_dim(model, old_conds: list) -> int:
    """The pooled vector's width a model's adm reads (SDXL's ``y``: the old encoder's ``pooled_output``, then size
    embeddings), read off the old encoder's conditioning; 0 when the model has no adm (SD1.5: ``adm_channels``
    0) or the old encoder gives no pooled vector."""
    if not _adm(model):
        return 0
    pooled = old_conds[0][0][1].get("pooled_output") if old_conds else None
    if not isinstance(pooled, torch.Tensor):
        raise SwapError("this model reads a pooled text vector (an adm, e.g. SDXL) but the old CLIP's conditioning "
                        "carries none: connect the CLIP of the model's own checkpoint as old_clip")
    return int(pooled.shape[-1])


def old_pooled(old_conds: list) -> torch.Tensor:
    """The old encoder's pooled vectors of the captions, one row each (the spread the head is scaled to)."""
    return torch.cat([c[0][1]["pooled_output"].float().reshape(1, -1) for c in old_conds])


def pooled_source(states: torch.Tensor, extras: dict) -> torch.Tensor:
    """The new encoder's own pooled vector (batch, width): its ``pooled_output`` when it gives one (e.g. FLUX's
    CLIP-L next to T5), else the mean of its token states over the valid tokens (``attention_mask``; all tokens
    without one), as T5 has no pooled output."""
    pooled = extras.get("pooled_output") if isinstance(extras, dict) else None
    if isinstance(pooled, torch.Tensor):
        return pooled.float().reshape(states.shape[0], -1)
    x = states.float()
    mask = extras.get("attention_mask") if isinstance(extras, dict) else None
    if isinstance(mask, torch.Tensor) and mask.numel() == x.shape[0] * x.shape[1]:
        w = (mask.reshape(x.shape[0], x.shape[1], 1).to(x.device) > 0).to(x.dtype)
        return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
    return x.mean(dim=1)


def add_head(module: torch.nn.Module, pooled_dim: int, pooled_in: int) -> int:
    """Give ``module`` the pooled head when both widths are set: ``pooled`` (Linear ``pooled_in`` -> ``pooled_dim``)
    and the buffer ``pooled_scale`` (1 until :func:`fit_scale_`). Returns the head's input width (0: no head)."""
    pooled_in = int(pooled_in) if pooled_dim else 0
    if pooled_in:
        module.pooled = torch.nn.Linear(pooled_in, int(pooled_dim))
        module.register_buffer("pooled_scale", torch.ones(()))
    return pooled_in


def head_vector(module: torch.nn.Module, states: torch.Tensor, extras: dict) -> torch.Tensor:
    """The projected pooled vector (batch, pooled_dim) from the new encoder's ``states`` and ``extras``."""
    src = pooled_source(states, extras)
    if src.shape[-1] != module.pooled_in:
        raise SwapError(f"the new encoder's pooled vector is {src.shape[-1]} wide, the swap's pooled projection "
                        f"reads {module.pooled_in}: encode the prompt with the new text encoder the swap was set "
                        "up with")
    w = module.pooled.weight
    return module.pooled(src.to(device=w.device, dtype=w.dtype)) * module.pooled_scale


def with_pooled(module: torch.nn.Module, extras: dict, states: torch.Tensor) -> dict:
    """The conditioning's extras for the UNet: a model with an adm (``module.pooled_dim``) gets a pooled vector of
    its width, zero, or with a head the new encoder's own pooled vector projected (:func:`head_vector`); others
    keep the extras as they are."""
    out = dict(extras)
    if module.pooled_in:
        out["pooled_output"] = head_vector(module, states, extras).to(states.dtype)
    elif module.pooled_dim:
        out["pooled_output"] = torch.zeros(states.shape[0], module.pooled_dim, dtype=states.dtype,
                                           device=states.device)
    return out


def sources(new_conds: list) -> list[torch.Tensor]:
    """The new encoder's pooled vectors of the captions (:func:`pooled_source` of each CONDITIONING)."""
    return [pooled_source(c[0][0], c[0][1]) for c in new_conds]


def fit_scale_(module: torch.nn.Module, srcs: list[torch.Tensor], target: torch.Tensor) -> None:
    """Set the head's ``pooled_scale`` so that the projected ``srcs`` spread (:func:`vector_std`) like ``target``
    (the old encoder's pooled vectors)."""
    with torch.no_grad():
        raw = vector_std([module.pooled(x) for x in srcs])
    if not raw > 0:
        raise SwapError("the new text encoder's projected captions have zero spread; check that the CLIP is loaded "
                        "with weights")
    module.pooled_scale.fill_(vector_std([target]) / raw)


def spread(module: torch.nn.Module, new_conds: list) -> float:
    """The head's output spread on the captions (0 without a head)."""
    if not module.pooled_in:
        return 0.0
    with torch.no_grad():
        return vector_std([head_vector(module, c[0][0], c[0][1]) for c in new_conds])


def report(swap) -> str:
    """The pooled part of a swap's one-line report ('' without an adm)."""
    if not swap.pooled_dim:
        return ""
    if not swap.pooled_in:
        return f"; pooled {swap.pooled_dim}: zero"
    return (f"; pooled {swap.pooled_in}->{swap.pooled_dim} projected: old pooled std {swap.std_pooled_old:.4f}, "
            f"output {swap.std_pooled_projected:.4f}")
