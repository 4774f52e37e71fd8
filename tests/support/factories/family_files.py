"""Files of the tiny family bundles (``families``) in the layouts ComfyUI's stock loaders read, where those
loaders can detect a tiny model:

- ``sd3_checkpoint()``: the tiny SD3 MMDiT and its 16-channel VAE as one checkpoint
  (``model.diffusion_model.*`` + ``first_stage_model.*``, no text encoders) for ``CheckpointLoaderSimple``.
  ComfyUI's ``SD3`` config matches on ``in_channels`` 16 and reads depth, widths and the position table
  from the tensors, so the tiny MMDiT is detected as SD3 (its text encoders are not: see
  tests/support/comfy_nodes).
- ``vae_file(name)``: the family's VAE alone, for ``VAELoader`` (full size: ComfyUI's VAE detection
  hard-codes the SD VAE's widths).

Weights are the bundles' own (same generators, same seeds), cached in ``.work/cache/models`` under the
source of this module and of ``families``.
"""
from __future__ import annotations

import sys
from pathlib import Path

from . import common, families


def _key() -> str:
    return common.source_key(sys.modules[__name__], families)


def _vae_sd(name: str, seed: int):
    spec = families.SPECS[name]
    return families.vae_state_dict(spec.vae_channels, spec.vae_quant_conv, seed)


def sd3_checkpoint(seed: int = 0) -> Path:
    """Tiny SD3 MMDiT (seed) + VAE (seed + 2), as ``families.build("sd3", seed)`` has them."""
    path = common.cached_file(f"tiny-sd3-ckpt-s{seed}", _key())
    if not path.exists():
        sd = {f"model.diffusion_model.{k}": v for k, v in families.diffusion_state_dict("sd3", seed).items()}
        sd.update({f"first_stage_model.{k}": v for k, v in _vae_sd("sd3", seed + 2).items()})
        common.atomic_save(sd, path, metadata={"generator": "aligned-trainer tiny sd3 checkpoint"})
    return path


def vae_file(name: str, seed: int = 2) -> Path:
    """The VAE of ``families.build(name, seed - 2)``."""
    spec = families.SPECS[name]
    path = common.cached_file(f"tiny-vae{spec.vae_channels}{'q' if spec.vae_quant_conv else ''}-file-s{seed}", _key())
    if not path.exists():
        common.atomic_save(_vae_sd(name, seed), path, metadata={"generator": f"aligned-trainer tiny {name} vae"})
    return path
