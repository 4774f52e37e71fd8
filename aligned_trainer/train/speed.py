"""Speed options of a run (issue #25): each changes how a training step is computed, never what it computes.
With every option on its plain value the step is the one measured in BENCHMARKS.md; each other value gives the
same adapters after N steps within float rounding (fp32, tests/test_speed.py), so a run may switch them on
resume. Which ones pay is a GPU measurement (bench/bench_gpu.py measures each on its own); all default to the
plain path until one does.

- ``optimizer_impl``: torch's choice (``default``), its multi-tensor ``foreach`` kernels, or its ``fused`` kernels
  (AdamW, ``optim.py``; other optimizers keep their own implementation and Train Init's text says so);
- ``channels_last``: UNet convolutions and their activations in NHWC memory layout during Train Steps
  (``speed_channels_last.py``; a model without 2-D convolutions: nothing to do, Train Init's text says so);
- ``lora_math``: LoRA on the activation side (the default, ``train/adapters.py``) or ``merged`` into the layer's
  weight for each forward (faster where a layer sees many tokens per weight: SDXL at batch 4 on a GPU);
- ``attention``: ComfyUI's choice (``comfy``), another function ComfyUI registers, or PyTorch's SDPA held to one
  kernel (train/attention.py)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from . import optim, speed_channels_last
from .attention import CHOICES as ATTENTION
from .config import ConfigError

OPTIMIZER_IMPLS = ("default", "foreach", "fused")
LORA_MATH = ("activation", "merged")


@dataclass(frozen=True)
class SpeedConfig:
    optimizer_impl: str = "default"
    channels_last: bool = False
    lora_math: str = "activation"
    attention: str = "comfy"

    def validate(self) -> None:
        for name, options in (("optimizer_impl", OPTIMIZER_IMPLS), ("lora_math", LORA_MATH),
                              ("attention", ATTENTION)):
            if getattr(self, name) not in options:
                raise ConfigError(f"{name} must be one of {options} (got {getattr(self, name)!r})")
        if not isinstance(self.channels_last, bool):
            raise ConfigError(f"channels_last must be true or false (got {self.channels_last!r})")


def of(settings) -> SpeedConfig:
    """The speed options a run's settings carry."""
    return SpeedConfig(**{k: getattr(settings, k) for k in SpeedConfig.__dataclass_fields__})


def apply(settings, cfg: SpeedConfig | None):
    """``settings`` (a RunSettings) with the speed options of ``cfg`` (None: unchanged)."""
    if cfg is None:
        return settings
    cfg.validate()
    return replace(settings, **asdict(cfg))


def note(settings, optimizer, diffusion_model) -> str | None:
    """Train Init's lines on the speed options that cannot act on this run (or, for channels_last, on what they
    act on); None when there is nothing to say."""
    lines = [optim.impl_note(optimizer, settings.optimizer_impl),
             speed_channels_last.note(diffusion_model, settings.channels_last)]
    return "\n".join(x for x in lines if x) or None
