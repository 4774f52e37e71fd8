"""The ``channels_last`` speed option (train/speed.py): during Train Steps the diffusion model's 2-D convolution
weights and the latents it is called with are in torch's channels-last (NHWC) memory layout. Convolutions then
give channels-last outputs, so a UNet's activations stay in that layout through its blocks (the layout GPU tensor
cores prefer); the values are the same, only their order in memory changes.

How it acts: a forward pre-hook on the diffusion model, installed for the Train Steps call. On each forward it
puts the latents in channels-last and converts, in place of their data (``weight.data``: the same Parameter
objects, which ComfyUI's ModelPatcher keeps references to), every 2-D convolution weight not in that layout
yet. Each step checks again because ComfyUI may replace weights between steps (a preview reloads the model;
``.to(device)`` keeps the layout, a patched weight is a new tensor); a weight already in the layout costs a
check, not a copy. ComfyUI's ``comfy.ops`` cast (when weights are stored in another dtype or device) makes its
copy with the source's layout (``preserve_format``), so cast weights are channels-last too.

On exit the weights go back to the ordinary (contiguous) layout: the model is shared with ComfyUI's samplers
and every other node, which then see it as it was loaded (the conversion back costs one copy of the conv
weights per Train Steps call, not per step). Adapters, checkpoints and saved LoRA files never see the layout:
the adapters' own tensors are not converted, and state is saved contiguous.

A model without 2-D convolutions (FLUX, most DiTs) has nothing to convert: Train Init says so (``note``).
Under ``torch.inference_mode`` (ComfyUI's previews inside a run) the hook does nothing: weights already
converted stay so, which changes no value."""
from __future__ import annotations

import contextlib
import logging

import torch

CL = torch.channels_last
log = logging.getLogger(__name__)


def convolutions(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The 2-D convolutions of ``module`` (a 4-D weight), in module order."""
    return [m for m in module.modules()
            if isinstance(m, torch.nn.Conv2d) and getattr(m, "weight", None) is not None and m.weight.ndim == 4]


def note(diffusion_model: torch.nn.Module, enabled: bool) -> str | None:
    """Train Init's line on the option (None when off)."""
    if not enabled:
        return None
    n = len(convolutions(diffusion_model))
    if not n:
        return "channels_last: this model has no 2-D convolutions, so it changes nothing (it acts on UNets)"
    return f"channels_last: {n} 2-D convolutions run in channels-last layout during training"


def _convertible(w) -> bool:
    # plain floating tensors only: quantized or other tensor subclasses keep their own layout
    return isinstance(w, torch.Tensor) and type(w) in (torch.Tensor, torch.nn.Parameter) and w.is_floating_point() \
        and w.ndim == 4


class Layout:
    """The pre-hook's state: the convolutions it watches and how many weight conversions and latents it made."""

    def __init__(self, diffusion_model: torch.nn.Module):
        self.convs = convolutions(diffusion_model)
        self.converted = 0  # weight conversions (to channels-last)
        self.inputs = 0  # forwards whose latents it put in channels-last

    def pre_hook(self, module, args, kwargs):
        if torch.is_inference_mode_enabled():
            return None
        with torch.no_grad():
            for m in self.convs:
                w = m.weight
                if _convertible(w) and not w.is_contiguous(memory_format=CL):
                    w.data = w.data.contiguous(memory_format=CL)
                    self.converted += 1
        if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 4:
            self.inputs += 1
            return (args[0].contiguous(memory_format=CL), *args[1:]), kwargs
        return None

    def restore(self) -> int:
        """The watched weights back in the ordinary layout; returns how many were converted back."""
        n = 0
        with torch.inference_mode(False), torch.no_grad():
            for m in self.convs:
                w = m.weight
                if _convertible(w) and not w.is_contiguous():
                    w.data = w.data.contiguous()
                    n += 1
        return n


@contextlib.contextmanager
def applied(trainer):
    """Channels-last layout for the trainer's diffusion model while inside, when its run asks for it (else
    nothing). Yields the :class:`Layout` (None when off)."""
    if not trainer.run.settings.channels_last:
        yield None
        return
    dm = trainer.patcher.model.diffusion_model
    layout = Layout(dm)
    handle = dm.register_forward_pre_hook(layout.pre_hook, with_kwargs=True) if layout.convs else None
    trainer.channels_last = layout
    try:
        yield layout
    finally:
        if handle is not None:
            handle.remove()
        back = layout.restore()
        if layout.convs:
            log.info("channels_last: %d convolution weight conversions to channels-last over %d forwards of %d "
                     "convolutions; %d weights restored to the ordinary layout", layout.converted, layout.inputs,
                     len(layout.convs), back)
