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

from support.factories import families, hunyuan_video15, sd2, te_flux2, te_qwen_image, wan, wan22  # noqa: E402

CATEGORY = "Aligned Trainer (tests)"
# Bundles outside support.factories.families: the tiny Wan 2.1 T2V (support.factories.wan; UNETLoader builds
# WanModel with dim/128 heads, CLIPLoader(type wan) UMT5-XXL at full size, so neither loads the tiny files).
# HunyuanVideo 1.5 (support.factories.hunyuan_video15.BUNDLE): UNETLoader builds its transformer at 2048 wide,
# DualCLIPLoader(type hunyuan_video_15) Qwen2.5-VL 7B at full size, and VAELoader the VAE at its fixed full widths.
OTHERS = {"wan2.1": wan, "wan2.2-t2v-high": wan22.HIGH, "wan2.2-t2v-low": wan22.LOW,  # + the A14B expert pair
          "hunyuan-video-1.5": hunyuan_video15.BUNDLE}
SD2 = "sd2-v"  # the tiny SD2.x 768-v (support.factories.sd2)
# Text encoders alone (TinyTextEncoderLoader only): FLUX.2 [dev]'s tiny Mistral-Small-3.1 (support.factories.te_flux2;
# CLIPLoader(type flux2) recognises the Mistral only at 40 layers of 5120 and builds it at that size).
# qwen-image-edit: the qwen-image bundle's tiny Qwen2.5-VL language model (seed 41) with its seeded tiny vision tower
# (support.factories.te_qwen_image.qwen25vl_edit_tiny_file; ComfyUI builds the tower at Qwen2.5-VL-7B's full size).
TEXT_ENCODERS = {"flux2": te_flux2.build_clip,
                 "qwen-image-edit": lambda: te_qwen_image.qwen_image_clip(te_qwen_image.qwen25vl_edit_tiny_file(41),
                                                                          vision=True)}


def _family():
    return {"required": {"family": (list(families.NAMES) + list(OTHERS) + [SD2],
                                    {"tooltip": "Tiny bundle of support.factories.families (or wan2.1)."})}}


def bundle(family):
    """(build, build_model, build_clip) of a tiny bundle by name."""
    if family == SD2:  # SD20 is matched only at model_channels 320 and context_dim 1024
        return sd2.build, sd2.build_model, sd2.build_clip
    if family in OTHERS:
        m = OTHERS[family]
        return m.build, m.build_model, getattr(m, "build_clip", None) or m.te_wan.wan_clip
    return (lambda: families.build(family)), (lambda: families.build_model(family)), \
        (lambda: families.build_clip(family))


class TinyCheckpointLoader:
    """Stands in for CheckpointLoaderSimple: (MODEL, CLIP, VAE)."""
    CATEGORY, FUNCTION = CATEGORY, "load"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    INPUT_TYPES = classmethod(lambda cls: _family())

    def load(self, family):
        return bundle(family)[0]()


class TinyDiffusionModelLoader:
    """Stands in for UNETLoader: (MODEL,)."""
    CATEGORY, FUNCTION = CATEGORY, "load"
    RETURN_TYPES = ("MODEL",)
    INPUT_TYPES = classmethod(lambda cls: _family())

    def load(self, family):
        return (bundle(family)[1](),)


class TinyTextEncoderLoader:
    """Stands in for CLIPLoader / DualCLIPLoader / TripleCLIPLoader: (CLIP,)."""
    CATEGORY, FUNCTION = CATEGORY, "load"
    RETURN_TYPES = ("CLIP",)

    @classmethod
    def INPUT_TYPES(cls):
        spec = _family()
        names, opts = spec["required"]["family"]
        spec["required"]["family"] = (names + [n for n in TEXT_ENCODERS if n not in names],
                                      {"tooltip": "Tiny bundle of support.factories.families (or wan2.1), or a tiny text "
                                                  "encoder alone (flux2: support.factories.te_flux2; qwen-image-edit: "
                                                  "support.factories.te_qwen_image with its vision tower)."})
        return spec

    def load(self, family):
        if family in TEXT_ENCODERS:
            return (TEXT_ENCODERS[family](),)
        return (bundle(family)[2](),)


class TinyVAELoader:
    """Stands in for VAELoader where ComfyUI's VAE detection builds the family's VAE at fixed full-size widths (the
    HunyuanVideo 1.5 VAE): (VAE,), the ``comfy.sd.VAE`` ComfyUI detects holding the tiny module."""
    CATEGORY, FUNCTION = CATEGORY, "load"
    RETURN_TYPES = ("VAE",)
    INPUT_TYPES = classmethod(lambda cls: {"required": {"family": (list(VAES), {"tooltip": "Tiny VAE by family."})}})

    def load(self, family):
        return (VAES[family](),)


VAES = {"hunyuan-video-1.5": hunyuan_video15.BUNDLE.build_vae}


NODE_CLASS_MAPPINGS = {
    "AlignedTrainerTests_TinyCheckpointLoader": TinyCheckpointLoader,
    "AlignedTrainerTests_TinyDiffusionModelLoader": TinyDiffusionModelLoader,
    "AlignedTrainerTests_TinyTextEncoderLoader": TinyTextEncoderLoader,
    "AlignedTrainerTests_TinyVAELoader": TinyVAELoader,
}
