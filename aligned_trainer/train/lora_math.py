"""Speed option ``lora_math`` (issue #25; train/speed.py): how a LoRA/LoCon adapter without DoRA (the adapters
``adapters.activation_kind`` puts on the activation side) is computed while the trainer runs the model.

- ``activation`` (the default): a forward hook adds ``scale * up(down(x))`` to the layer's output
  (``adapters.TrainAdapter.hook``);
- ``merged``: the layer computes with ``W + scale * up @ down`` (a convolution: the product reshaped to the
  kernel), built at each forward of the layer (a recomputed checkpointed block builds it again); the frozen
  ``W`` gets no gradient, ``up``/``down`` get theirs through the product. Same adapters within float rounding
  (tests/test_speed_lora_math.py); it trades the two thin LoRA matmuls per layer for one weight-sized add and
  keeps that weight-sized tensor per layer alive for backward (unless checkpointing). Which pays is a GPU
  measurement (bench/gpu_session.sh).

Route: inside ``Trainer.hooked`` (the same scope as the activation hooks: the layers are shared with every other
user of the model) the layer's ``forward`` becomes ``F.linear`` / ``_conv_forward`` with the merged weight, as
bench/floor.py's merge floor computes it; the weight is read at call time, so offloaded blocks use their
streamed copy. Where ComfyUI itself computes the layer's weight per call (``comfy_cast_weights``: fp8 manual
casts, partly loaded models; weight or bias functions; a forward already replaced by another scope) the merge
joins the layer's weight functions instead, and ComfyUI's cast path then copies the weight before the merge
(one more weight-sized copy per forward).

Refused with ``merged`` (Train Init, :func:`check`): ``network_dropout`` and ``rank_dropout`` (they act on each
sample's activations; a merged weight is shared by the batch), and ``quantize`` int8/int4 (a quantized weight
cannot take ``W + delta`` without dequantizing the layer at each forward, whose full weight autograd would then
keep for backward, undoing what quantize saves). ``module_dropout`` works the same on both (one draw per layer
and forward, from the same seeded RNG in the same order)."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from . import quantize
from .config import ConfigError

log = logging.getLogger("aligned_trainer")


def check(lora, settings) -> None:
    """Refuse settings ``merged`` cannot compute as the activation side does (see the module's doc)."""
    if settings.lora_math != "merged":
        return
    for name in ("network_dropout", "rank_dropout"):
        if getattr(lora, name):
            raise ConfigError(f"lora_math 'merged' cannot apply {name} ({getattr(lora, name)}): it drops parts of "
                              "each sample's LoRA activations, and a merged weight is shared by the whole batch. "
                              f"Set {name} to 0 (LoRA Config), or lora_math to 'activation' (Speed Options)")
    if settings.quantize != "none":
        raise ConfigError(f"lora_math 'merged' cannot merge the LoRA into quantized weights (quantize "
                          f"'{settings.quantize}'): each layer would be dequantized at every forward and its full "
                          "weight kept for backward, undoing what quantize saves. Set lora_math to 'activation' "
                          "(Speed Options) or quantize to 'none' (Train Init)")


def merged_weight(adapter, w: torch.Tensor) -> torch.Tensor:
    """``w + scale * up @ down`` in ``w``'s dtype (``w`` itself when the adapter is off or module dropout skips
    it for this forward)."""
    if not adapter.enabled:
        return w
    if adapter.training and adapter.module_dropout and float(torch.rand(())) < adapter.module_dropout:
        return w
    inner = adapter.inner
    delta = inner.lora_up.weight @ inner.lora_down.weight
    adapter.merged_forwards += 1
    return w + (adapter.scale * delta).reshape(w.shape).to(w.dtype)


class _Merged:
    """``layer`` computing with its merged weight until :meth:`remove` (a hook handle's interface)."""

    def __init__(self, layer: torch.nn.Module, adapter):
        self.layer, self.adapter = layer, adapter
        d = layer.__dict__
        self.own = not (getattr(layer, "comfy_cast_weights", False) or getattr(layer, "weight_function", None)
                        or getattr(layer, "bias_function", None) or "forward" in d)
        if self.own:
            layer.forward = self.forward
        else:  # ComfyUI computes this weight per call: the merge joins its weight functions
            self.functions = d.get("weight_function", _ABSENT)
            layer.weight_function = [*layer.weight_function, quantize.weight_wrapper(layer, self)]

    def __call__(self, w: torch.Tensor) -> torch.Tensor:  # as one of ComfyUI's weight functions
        return merged_weight(self.adapter, w)

    def move_to(self, device) -> int:  # ComfyUI's ModelPatcher asks weight functions to move (the adapter does)
        return self.adapter.move_to(device)

    def forward(self, x, *args, **kwargs):
        import comfy.ops

        comfy.ops.run_every_op()  # ComfyUI's ops check for Cancel here
        layer = self.layer
        w = merged_weight(self.adapter, layer.weight)
        if self.adapter.kind == "linear":
            return F.linear(x, w, layer.bias)
        return layer._conv_forward(x, w, layer.bias)

    def remove(self) -> None:
        if self.own:
            del self.layer.forward
        elif self.functions is _ABSENT:
            del self.layer.weight_function
        else:
            self.layer.weight_function = self.functions


_ABSENT = object()


def attach(layer: torch.nn.Module, adapter, lora_math: str):
    """Put an activation-side ``adapter`` on ``layer`` the way ``lora_math`` says; returns a handle whose
    ``remove()`` takes it off again."""
    if lora_math == "merged":
        return _Merged(layer, adapter)
    return layer.register_forward_hook(adapter.hook)


def note(trainer) -> str | None:
    """Train Init's line about the option (None on the default path)."""
    if trainer.run.settings.lora_math != "merged":
        return None
    kinds = [a.kind for _, a in trainer.hooked_layers]
    rest = len(trainer.adapters) - len(kinds)
    return (f"lora_math merged: {len(kinds)} LoRA layer(s) compute with W + scale * up @ down "
            f"({kinds.count('linear')} linear, {kinds.count('conv')} conv)"
            + (f"; {rest} other adapter(s) (LoHa, LoKr, DoRA, other layers) patch their weights as always"
               if rest else ""))


def report(trainer, steps: int) -> None:
    """Log how many layer forwards ran merged over ``steps`` steps (the option seen to act)."""
    if trainer.run.settings.lora_math != "merged":
        return
    n = sum(a.merged_forwards for _, a in trainer.hooked_layers)
    log.info("aligned_trainer: lora_math merged: %d layer forwards used a merged weight over %d step(s) (%d LoRA "
             "layers)", n, steps, len(trainer.hooked_layers))
