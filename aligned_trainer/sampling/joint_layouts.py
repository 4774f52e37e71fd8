"""Where the text tokens sit in the attention calls of the DiTs (data for token heatmaps).

Keyed by ComfyUI's model config class (``SD3``, ``HunyuanVideo15``...) where one diffusion model class serves
families with different layouts, else by the class name of ComfyUI's diffusion model
(``model.model.diffusion_model``), each entry says, with the ComfyUI source line it is read from, where the text
sits (``text_at``), what precedes it (register tokens), whether text and image are padded to a token multiple, and
the patch size that turns the latent into image tokens:
- ``start``: joint attention over [registers][text (+ pad)][image patches (+ pad)] (FLUX.1, Chroma, SD3, Qwen-Image,
  Z-Image, Lumina 2);
- ``after_image``: joint attention over [image patches][text][more context] (HiDream: T5, then Llama layers that
  change per block; the text mapped is the conditioning's, T5);
- ``end``: joint attention over [image patches][other context][text] (HunyuanVideo 1.5: byT5 glyph tokens, and an
  image prompt's vision tokens, before the text);
- ``cross``: cross-attention, the image queries over the text keys only (Wan's DiT blocks).
A model with neither a listed config nor a listed class is refused by the heatmaps, naming its family.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class JointLayout:
    source: str                         # the ComfyUI code that builds the joint sequence
    registers_attr: str | None = None   # attribute: number of tokens before the text (SD3's register tokens)
    pad_attr: str | None = None         # attribute: text and image each padded to a multiple of this (or None)
    patch_attr: str = "patch_size"      # attribute: latent pixels per image token along each axis
    text_at: str = "start"              # start | after_image | end | cross (module docstring)
    tokenizer: str | None = None        # the tokenizer key of the conditioning's tokens, where another tokenizer
                                        # gives as many (HiDream: T5's and Llama's both pad to 128)


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
    "HiDreamImageTransformer2DModel": JointLayout(
        "comfy/ldm/hidream/model.py HiDreamAttnProcessor_flashattn: torch.cat([query_i, query_t], dim=1), the text "
        "tokens being torch.cat([T5, last Llama layer], dim=1) + the block's Llama layer; the single blocks "
        "torch.cat([hidden_states, initial_encoder_hidden_states], dim=1) likewise; the conditioning is T5's "
        "(comfy/text_encoders/hidream.py encode_token_weights returns t5_out)", text_at="after_image",
        tokenizer="t5xxl"),
    "HunyuanVideo15": JointLayout(
        "comfy/ldm/hunyuan_video/model.py forward_orig: txt = torch.cat((txt_byt5, txt), dim=1) (byT5 first for "
        "HunyuanVideo 1.5), vision states before it, then img = torch.cat((img, txt), 1); the double blocks "
        "(comfy/ldm/flux/layers.py) torch.cat((img_q, txt_q), dim=2)", text_at="end"),
    "WanModel": JointLayout(
        "comfy/ldm/wan/model.py WanT2VCrossAttention.forward: optimized_attention(q, k, v) with q from the video "
        "tokens and k, v from the text context (WanI2VCrossAttention: the text part likewise)", text_at="cross"),
}


@dataclass(frozen=True)
class Span:
    """In one attention call: the text keys' columns and the image queries' rows, and the image grid. ``seq`` is the
    joint sequence's length where the layout fixes it (``start``), else 0 (``locate`` finds the call)."""
    text: slice
    image: slice
    grid: tuple[int, int]
    seq: int
    text_at: str = "start"

    def locate(self, q_len: int, k_len: int) -> "Span | None":
        """This span placed in an attention call whose queries and keys have these lengths, or None for a call
        that does not attend from the image to the text (text-only refiners, image-only self-attention)."""
        n_text, n_img = self.text.stop - self.text.start, self.image.stop - self.image.start
        if self.text_at == "start":
            return self if q_len == k_len == self.seq else None
        if self.text_at == "cross":
            return self if q_len == n_img and k_len == n_text else None
        if q_len != k_len or q_len < n_img + n_text:
            return None
        if self.text_at == "after_image":
            return self
        return replace(self, text=slice(q_len - n_text, q_len), seq=q_len)  # end


def family_name(model) -> str:
    """The family as ComfyUI's model config names it (``SD3``, ``HiDream``, ``WAN21_T2V``...)."""
    cfg = getattr(model.model, "model_config", None)
    return type(cfg).__name__ if cfg is not None else type(model.model).__name__


def _key(model) -> str | None:
    for key in (family_name(model), type(model.model.diffusion_model).__name__):
        if key in LAYOUTS:
            return key
    return None


def layout(model) -> JointLayout | None:
    key = _key(model)
    return LAYOUTS[key] if key else None


def tokenizer(model) -> str | None:
    """The tokenizer key whose tokens make the conditioning, where the layout names one (else None: found by count)."""
    lay = layout(model)
    return lay.tokenizer if lay else None


def span(model, text_len: int, latent_hw: tuple[int, int]) -> Span:
    """Where the ``text_len`` conditioning tokens and the image tokens of a ``latent_hw`` latent sit."""
    dm = model.model.diffusion_model
    lay = LAYOUTS[_key(model)]
    patch = getattr(dm, lay.patch_attr)
    patch = patch[-1] if isinstance(patch, (tuple, list)) else int(patch)
    grid = (math.ceil(latent_hw[0] / patch), math.ceil(latent_hw[1] / patch))
    reg = int(getattr(dm, lay.registers_attr, 0) or 0) if lay.registers_attr else 0
    mult = int(getattr(dm, lay.pad_attr, None) or 1) if lay.pad_attr else 1
    n_img = grid[0] * grid[1]
    text_seq = text_len + (-text_len % mult)
    if lay.text_at == "cross":
        if n_img == text_len:  # self-attention over the image would look like the cross-attention
            raise ValueError(f"token heatmaps on {family_name(model)}: the image has as many tokens ({n_img}) as the "
                             "prompt; change the width or height by one step")
        return Span(slice(0, text_len), slice(0, n_img), grid, 0, "cross")
    if lay.text_at in ("after_image", "end"):
        return Span(slice(n_img, n_img + text_len), slice(0, n_img), grid, 0, lay.text_at)
    start = reg + text_seq
    return Span(slice(reg, reg + text_len), slice(start, start + n_img), grid, start + n_img + (-n_img % mult))
