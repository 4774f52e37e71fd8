"""Test-only ComfyUI nodes (not part of the pack, never shipped): loaders for the tiny SDXL / SD3 / FLUX.1
bundles of ``support.factories.families``, for end-to-end runs of the shipped family workflows through the
real server (tests/test_workflows_families.py puts this folder on the server's ``custom_nodes`` path).

Why they exist: ComfyUI's stock loaders detect what they load from tensor shapes, and some of that
detection only accepts full-size models. ``CheckpointLoaderSimple``/``UNETLoader`` match SDXL only at its
real UNet size (``model_channels`` 320, ``transformer_depth`` [0, 0, 2, 2, 10, 10], ``context_dim`` 2048)
and build FLUX.1 with 24 heads of 128 (hidden 3072) whatever the file holds; ``DualCLIPLoader``/
``TripleCLIPLoader`` recognise CLIP-G by its 31st layer and T5-XXL by its 24th block and build both from
full-size configs. A tiny model cannot pass that, so these nodes take the family's name instead of a file
name and load the family's seeded, cached weights through the same calls the stock loaders end in
(``BaseModel.load_model_weights``, ``CLIP.load_sd``, ``comfy.sd.VAE(sd=...)``), with the family's real
``comfy.supported_models`` config and text-encoder classes (shrunk configs). Their outputs have the
types and slot order of the stock loaders they stand in for.
"""
from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[3]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from support.factories import families  # noqa: E402

CATEGORY = "Aligned Trainer (tests)"


def _family():
    return {"required": {"family": (list(families.NAMES), {"tooltip": "Tiny bundle of support.factories.families."})}}


class TinyCheckpointLoader:
    """Stands in for CheckpointLoaderSimple: (MODEL, CLIP, VAE)."""
    CATEGORY, FUNCTION = CATEGORY, "load"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    INPUT_TYPES = classmethod(lambda cls: _family())

    def load(self, family):
        return families.build(family)


class TinyDiffusionModelLoader:
    """Stands in for UNETLoader: (MODEL,)."""
    CATEGORY, FUNCTION = CATEGORY, "load"
    RETURN_TYPES = ("MODEL",)
    INPUT_TYPES = classmethod(lambda cls: _family())

    def load(self, family):
        return (families.build_model(family),)


class TinyTextEncoderLoader:
    """Stands in for DualCLIPLoader / TripleCLIPLoader: (CLIP,)."""
    CATEGORY, FUNCTION = CATEGORY, "load"
    RETURN_TYPES = ("CLIP",)
    INPUT_TYPES = classmethod(lambda cls: _family())

    def load(self, family):
        return (families.build_clip(family),)


NODE_CLASS_MAPPINGS = {
    "AlignedTrainerTests_TinyCheckpointLoader": TinyCheckpointLoader,
    "AlignedTrainerTests_TinyDiffusionModelLoader": TinyDiffusionModelLoader,
    "AlignedTrainerTests_TinyTextEncoderLoader": TinyTextEncoderLoader,
}
