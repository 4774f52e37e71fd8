"""Trainable adapters on a ComfyUI model: target selection by preset/regex, ComfyUI's own weight adapters
(LoRA / LoHa / LoKr, conv layers for LoCon), DoRA, dropout and max-norm.

Two ways to run an adapter, same parameters (so checkpoints and exported LoRAs do not depend on the path):

- activation side (LoRA/LoCon without DoRA on a Linear, or on a Conv2d with groups 1 and zero padding): a
  forward hook adds ``scale * up(drop(down(x)))`` to the layer's output. The layer itself runs its plain
  forward (no weight copy, no weight-sized gradient); rank, module and network dropout act on activations.
  The hooks are installed only while the trainer runs the model (``hooked``): the layers are shared with every
  other user of the model.
- weight side (LoHa, LoKr, DoRA, other layers): ComfyUI's weight wrapper (``ModelPatcher.add_weight_wrapper``)
  merges ``W + delta`` on every forward.

Dropout draws from torch's global RNG: the trainer seeds it per micro-step from its own (checkpointed)
generator, and ``torch.utils.checkpoint`` restores it for the recomputation, so a recomputed block sees the
same masks as its forward."""
from __future__ import annotations

import math
import re
import time

import torch
import torch.nn.functional as F
from comfy.weight_adapter import LoHaAdapter, LoKrAdapter, LoRAAdapter

from .config import PRESETS, ConfigError, LoraConfig, user_pattern
from .full import FullDiff

ADAPTER = {"lora": LoRAAdapter, "locon": LoRAAdapter, "loha": LoHaAdapter, "lokr": LoKrAdapter,
           "full": FullDiff}  # full: a trainable difference per weight (train/full.py)


REGEX_BUDGET_S = 0.25  # CPU seconds for all include/exclude matching of one model (the regex engine's timeout
                       # counts CPU time; real patterns need microseconds per layer name)


def target_layers(diffusion_model: torch.nn.Module, cfg: LoraConfig) -> list[str]:
    """Names (ComfyUI module names inside the diffusion model) of the layers to train.

    The user's include/exclude patterns run on the ``regex`` engine with a shared time budget
    (``REGEX_BUDGET_S`` of CPU time): a pattern with catastrophic backtracking raises ConfigError within the
    budget, and the engine releases the GIL while matching, so the server keeps answering meanwhile."""
    preset = re.compile(PRESETS[cfg.preset])
    inc = user_pattern("include", cfg.include)
    exc = user_pattern("exclude", cfg.exclude)
    deadline = time.monotonic() + REGEX_BUDGET_S

    def hit(name: str, which: str, pattern) -> bool:
        try:
            return pattern.search(name, timeout=max(deadline - time.monotonic(), 1e-3)) is not None
        except TimeoutError:
            raise ConfigError(f"{which} pattern '{pattern.pattern}' took longer than {REGEX_BUDGET_S} s on this "
                              f"model's layer names (last: {name!r}); it backtracks catastrophically (nested "
                              "repeats such as '(a+)+'). Simplify it, e.g. anchor it or drop the nested repeat.") from None

    out = []
    for name, m in diffusion_model.named_modules():
        w = getattr(m, "weight", None)
        if not hasattr(m, "weight_function") or w is None:
            continue
        if w.ndim == 2 or (w.ndim in (3, 4) and cfg.conv):
            if not preset.search(name) and not (inc and hit(name, "include", inc)):
                continue
            if exc and hit(name, "exclude", exc):
                continue
            out.append(name)
    if not out:
        raise ConfigError(f"no layer of this model matches preset '{cfg.preset}'"
                          f"{' with include ' + repr(cfg.include) if cfg.include else ''}"
                          f"{' and exclude ' + repr(cfg.exclude) if cfg.exclude else ''}; this model has no such "
                          "layers (e.g. DiT models have no separate cross-attention): pick another preset")
    return out


def activation_kind(module: torch.nn.Module, cfg: LoraConfig) -> str | None:
    """``"linear"`` or ``"conv"`` when ``module``'s adapter runs on the activation side, else None (weight side:
    LoHa, LoKr, DoRA, grouped or non-zero-padded convolutions, 1-D/3-D convolutions, other layers)."""
    if cfg.algorithm not in ("lora", "locon") or cfg.dora:
        return None
    w = getattr(module, "weight", None)
    if w is None:
        return None
    if isinstance(module, torch.nn.Linear) and w.ndim == 2:
        return "linear"
    if (isinstance(module, torch.nn.Conv2d) and w.ndim == 4 and module.groups == 1
            and module.padding_mode == "zeros"):
        return "conv"
    return None


def refuse_network_dropout_on_weights(cfg: LoraConfig, kinds: dict[str, str | None]) -> None:
    """``kinds``: target layer name -> its adapter's ``activation_kind`` (None: weight side). Network dropout
    acts on activations, so a run with it where any adapter patches weights is refused."""
    weight_side = [n for n, k in kinds.items() if not k]
    if cfg.network_dropout and weight_side:
        raise ConfigError(f"network_dropout acts on activations, but {len(weight_side)} target layer(s) (e.g. "
                          f"'{weight_side[0]}') can only be trained through weight patches (LoHa, LoKr, DoRA, or "
                          "grouped, non-zero-padded or non-2-D convolutions): exclude them (exclude regex), use "
                          "lora/locon without DoRA, or set network_dropout to 0")


class TrainAdapter(torch.nn.Module):
    """A ComfyUI train adapter plus rank/module(/network) dropout. Weight side: called by ComfyUI's weight
    wrapper with the weight. Activation side (``kind`` set): ``hook`` is a forward hook of the layer."""

    def __init__(self, inner: torch.nn.Module, cfg: LoraConfig, kind: str | None = None,
                 layer: torch.nn.Module | None = None):
        super().__init__()
        self.inner = inner
        self.rank_dropout = cfg.rank_dropout if cfg.algorithm in ("lora", "locon") else 0.0
        self.module_dropout = cfg.module_dropout
        self.network_dropout = cfg.network_dropout if kind else 0.0
        self.kind = kind
        self.scale = cfg.scale_alpha / cfg.rank  # ComfyUI's LoRA adapter: alpha / rank
        if kind == "conv":
            self.conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
            self.kernel = tuple(layer.weight.shape[1:])
        self.enabled = True  # off: the base model's weight (differential output preservation's reference)
        self.merged_forwards = 0  # forwards that built the merged weight (speed option lora_math merged)

    def hook(self, layer, args, out):
        """Forward hook of the layer (activation side): ``out + scale * up(drop(down(x)))``. Under autocast
        the LoRA matmuls run in the autocast dtype like the layer's own; outside it in ``x``'s dtype."""
        if not self.enabled:
            return None
        train = self.training
        if train and self.module_dropout and float(torch.rand(())) < self.module_dropout:
            return None
        x = args[0]
        inner = self.inner
        down, up = inner.lora_down.weight, inner.lora_up.weight
        if self.kind == "linear":
            h = F.linear(x, down.to(x.dtype))
        else:
            h = F.conv2d(x, down.reshape(down.shape[0], *self.kernel).to(x.dtype), None, **self.conv)
        scale = self.scale
        if train:
            if self.network_dropout:
                h = F.dropout(h, p=self.network_dropout)
            if self.rank_dropout:  # kohya: one mask per sample over the rank, kept ranks scaled 1/(1-p)
                shape = (h.shape[0], h.shape[1], 1, 1) if self.kind == "conv" else \
                    (h.shape[0], *[1] * (h.ndim - 2), h.shape[-1])
                h = h * (torch.rand(shape, device=h.device) >= self.rank_dropout).to(h.dtype)
                scale = scale / (1 - self.rank_dropout)
        up = (up * scale).to(h.dtype)
        if self.kind == "linear":
            y = F.linear(h, up)
        else:
            y = F.conv2d(h, up.reshape(*up.shape, 1, 1))
        return out + y.to(out.dtype)

    def move_to(self, device) -> int:
        """Called by ComfyUI's ModelPatcher when it moves the model (``move_weight_functions``). Parameters
        move in place, so the optimizer keeps referring to them."""
        self.inner.to(device)
        return sum(p.numel() * p.element_size() for p in self.inner.parameters())

    def __call__(self, w):
        if not self.enabled:
            return w
        if self.training:
            if self.module_dropout and float(torch.rand(())) < self.module_dropout:
                return w
            if self.rank_dropout:
                inner = self.inner
                keep = (torch.rand(inner.rank) >= self.rank_dropout).to(w.device)
                up = inner.lora_up.weight * keep.to(inner.lora_up.weight.dtype) / (1 - self.rank_dropout)
                diff = up @ inner.lora_down.weight
                return self._dora((w + (inner.alpha / inner.rank) * diff.reshape(w.shape)).to(w.dtype), w.dtype)
        return self._dora(self.inner(w), w.dtype)

    def _dora(self, w_new: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """DoRA on the input axis as ComfyUI's loader applies a ``dora_scale`` of shape (1, in, ...)
        (weight_decompose): the updated weight's columns normalised, times the trained magnitude. On the output
        axis (``dora_magnitude``, one per output row) as peft's DoRA: the updated weight's rows normalised, times
        the magnitude (``dora_axes`` writes it for ComfyUI and for diffusers)."""
        m = getattr(self.inner, "dora_scale", None)
        if m is not None:
            return (w_new * (m.to(w_new.dtype) / (input_axis_norm(w_new) + torch.finfo(dtype).eps))).to(dtype)
        m = getattr(self.inner, "dora_magnitude", None)
        if m is not None:
            m = m.to(w_new.dtype).reshape(-1, *[1] * (w_new.dim() - 1))
            return (w_new * (m / (output_axis_norm(w_new) + torch.finfo(dtype).eps))).to(dtype)
        return w_new


def input_axis_norm(w: torch.Tensor) -> torch.Tensor:
    """Norm of each input column of ``w`` (out, in, ...), shaped (1, in, 1...) like a ``dora_scale``."""
    return (w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1, keepdim=True)
            .reshape(w.shape[1], *[1] * (w.dim() - 1)).transpose(0, 1))


def output_axis_norm(w: torch.Tensor) -> torch.Tensor:
    """Norm of each output row of ``w`` (out, in, ...), shaped (out, 1, 1...) (peft's DoRA weight norm)."""
    return w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1))


def create(weight: torch.Tensor, cfg: LoraConfig, generator: torch.Generator, device=None,
           layer: torch.nn.Module | None = None) -> TrainAdapter:
    """A trainable adapter for ``weight`` (only its shape is used), initialised from ``generator`` and placed
    on ``device`` (where the model will run). With ``layer`` (the module owning ``weight``) the adapter runs
    on the activation side where ``activation_kind`` allows."""
    shape_only = torch.zeros(()).expand(*weight.shape)  # create_train reads shape and device only; no copy
    with torch.random.fork_rng(devices=[]):  # ComfyUI's create_train draws from the global RNG: seed it from ours
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        inner = ADAPTER[cfg.algorithm].create_train(shape_only, rank=cfg.rank, alpha=cfg.scale_alpha)
    if cfg.algorithm in ("lora", "locon"):
        # Standard LoRA init from the run's seed: down ~ kaiming/gaussian, up = 0 (no change at step 0).
        down = inner.lora_down.weight
        with torch.no_grad():
            std = 1.0 / math.sqrt(down.shape[1]) if cfg.init == "default" else 1.0 / cfg.rank
            down.copy_(torch.randn(down.shape, generator=generator) * std)
            inner.lora_up.weight.zero_()
        if cfg.dora and cfg.dora_axis == "output":  # magnitude starts at the base weight's row norms
            inner.dora_magnitude = torch.nn.Parameter(output_axis_norm(weight.detach().float()).flatten().clone())
        elif cfg.dora:  # magnitude starts at the base weight's column norms: no change at step 0
            inner.dora_scale = torch.nn.Parameter(input_axis_norm(weight.detach().float()).clone())
    else:
        with torch.no_grad():
            for p in inner.parameters():
                if p.requires_grad and p.ndim >= 1 and not torch.isfinite(p).all():
                    p.zero_()
    kind = activation_kind(layer, cfg) if layer is not None else None
    return TrainAdapter(inner.float().to(device or "cpu"), cfg, kind, layer)


def apply_max_norm(adapters: dict[str, TrainAdapter], max_norm: float) -> int:
    """Scale LoRA pairs whose delta norm exceeds ``max_norm`` (kohya scale_weight_norms); returns how many.

    Decided on the device: each pair is multiplied by ``sqrt(max_norm / norm)`` where its norm is above the bound
    and by exactly 1 elsewhere (bit for bit what a skipped pair keeps), so the step waits for the GPU once, for
    the count, instead of once per pair (hundreds of host-device round trips per step on SDXL/FLUX)."""
    if not max_norm:
        return 0
    over = []
    with torch.no_grad():
        for a in adapters.values():
            inner = a.inner
            if not hasattr(inner, "lora_up"):
                continue
            delta = (inner.lora_up.weight @ inner.lora_down.weight.flatten(1)) * (inner.alpha / inner.rank)
            n = delta.norm()
            above = n > max_norm
            r = torch.where(above, max_norm / n, torch.ones_like(n)).sqrt()
            inner.lora_up.weight.mul_(r)
            inner.lora_down.weight.mul_(r)
            over.append(above)
    if not over:
        return 0
    return int(torch.stack([o.to(over[0].device) for o in over]).sum())
