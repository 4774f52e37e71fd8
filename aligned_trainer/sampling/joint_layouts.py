"""Where the text tokens sit in the joint text + image sequence of the joint-attention DiTs (data for token heatmaps).

Keyed by the class name of ComfyUI's diffusion model (``model.model.diffusion_model``), each entry says, with the
ComfyUI source line it is read from, what precedes the text (register tokens), whether text and image are padded
to a token multiple, and the patch size that turns the latent into image tokens. Every family listed puts the text
first: sequence = [registers][text (+ pad)][image patches (+ pad)]. A model whose class is not listed is refused by
the heatmaps, naming its family.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class JointLayout:
    source: str                         # the ComfyUI code that builds the joint sequence
    registers_attr: str | None = None   # attribute: number of tokens before the text (SD3's register tokens)
    pad_attr: str | None = None         # attribute: text and image each padded to a multiple of this (or None)
    patch_attr: str = "patch_size"      # attribute: latent pixels per image token along each axis


LAYOUTS = {
    "Flux": JointLayout("comfy/ldm/flux/model.py forward_orig: double blocks cat (txt, img) q/k/v; "
                        "img = torch.cat((txt, img), 1) before the single blocks"),
    "Chroma": JointLayout("comfy/ldm/chroma/model.py forward_orig: double blocks as FLUX's; "
                          "img = torch.cat((txt, img), 1) before the single blocks"),
    "OpenAISignatureMMDITWrapper": JointLayout(
        "comfy/ldm/modules/diffusionmodules/mmdit.py _block_mixing: torch.cat((context_qkv, x_qkv), dim=1); "
        "forward_core_with_concat puts the register tokens before the context", registers_attr="register_length"),
    "QwenImageTransformer2DModel": JointLayout(
        "comfy/ldm/qwen_image/model.py Attention.forward: torch.cat([txt_query, img_query], dim=2)"),
    "NextDiT": JointLayout(
        "comfy/ldm/lumina/model.py patchify_and_embed: torch.cat((cap_feats, x), dim=1), the caption and the "
        "image each padded to pad_tokens_multiple (Z-Image; None for Lumina 2)", pad_attr="pad_tokens_multiple"),
}


@dataclass(frozen=True)
class Span:
    """In one joint attention call: the text keys' columns and the image queries' rows, and the image grid."""
    text: slice
    image: slice
    grid: tuple[int, int]
    seq: int


def family_name(model) -> str:
    """The family as ComfyUI's model config names it (``SD3``, ``HiDream``, ``WAN21_T2V``...)."""
    cfg = getattr(model.model, "model_config", None)
    return type(cfg).__name__ if cfg is not None else type(model.model).__name__


def layout(model) -> JointLayout | None:
    return LAYOUTS.get(type(model.model.diffusion_model).__name__)


def span(model, text_len: int, latent_hw: tuple[int, int]) -> Span:
    """Where the ``text_len`` conditioning tokens and the image tokens of a ``latent_hw`` latent sit."""
    dm = model.model.diffusion_model
    lay = LAYOUTS[type(dm).__name__]
    patch = getattr(dm, lay.patch_attr)
    patch = patch[-1] if isinstance(patch, (tuple, list)) else int(patch)
    grid = (math.ceil(latent_hw[0] / patch), math.ceil(latent_hw[1] / patch))
    reg = int(getattr(dm, lay.registers_attr, 0) or 0) if lay.registers_attr else 0
    mult = int(getattr(dm, lay.pad_attr, None) or 1) if lay.pad_attr else 1
    n_img = grid[0] * grid[1]
    text_seq = text_len + (-text_len % mult)
    start = reg + text_seq
    return Span(slice(reg, reg + text_len), slice(start, start + n_img), grid, start + n_img + (-n_img % mult))
