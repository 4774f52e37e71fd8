"""Token heatmaps (DAAM, Tang et al. 2022): where each prompt token acts in a generated image.

While ComfyUI's own sampler runs, every cross-attention layer of the UNet is replaced (ComfyUI's ``attn2``
replace patch on a clone of the model; ComfyUI is not edited) by a function that computes the layer's output
with ComfyUI's own ``optimized_attention`` (the call the unpatched layer makes, so the image is unchanged) and,
beside it, the softmax attention of the image queries over the text tokens. As DAAM does, those maps are
averaged over heads, upsampled to the latent's size (bicubic), summed over layers and sampling steps (the
conditional half of a CFG batch only), then upsampled to the image and normalised per token to [0, 1].

Scope: UNet families with cross-attention (SD1.x, SD2.x, SDXL). Joint-attention DiTs (SD3, FLUX) route text
and image through one attention call without an ``attn2`` hook; they are refused with a clear message (not
built yet, see docs/heatmaps.md).
"""
from __future__ import annotations

import math

import comfy.ldm.modules.attention as comfy_attention
import torch
import torch.nn.functional as F

from . import render


class Capture:
    """Sums of the per-token attention maps at the latent's size, for the conditional batch entry."""

    def __init__(self):
        self.total: torch.Tensor | None = None   # (tokens, H_latent, W_latent)
        self.calls = 0

    def add(self, q: torch.Tensor, k: torch.Tensor, extra: dict) -> None:
        heads = extra["n_heads"]
        b, n, _ = q.shape
        t = k.shape[1]
        chunks = extra.get("cond_or_uncond") or [0]
        per = b // len(chunks)
        rows = [i * per for i, c in enumerate(chunks) if c == 0]  # first sample of each conditional chunk
        if not rows:
            return
        qh = q[rows].float().reshape(len(rows), n, heads, -1).transpose(1, 2)
        kh = k[rows].float().reshape(len(rows), t, heads, -1).transpose(1, 2)
        attn = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1]), dim=-1).mean(1)  # (r, n, t)
        _, _, hl, wl = extra["original_shape"]
        f = math.sqrt(hl * wl / n)
        h, w = round(hl / f), round(wl / f)
        maps = attn[0].T.reshape(t, 1, h, w)
        maps = F.interpolate(maps, size=(hl, wl), mode="bicubic", align_corners=False)[:, 0].clamp_min(0)
        if self.total is None or self.total.shape != maps.shape:
            self.total = maps.cpu() if self.total is None else self._grow(maps)
        else:
            self.total += maps.cpu()
        self.calls += 1

    def _grow(self, maps: torch.Tensor) -> torch.Tensor:
        """A later call with a longer context (more token chunks): pad the shorter sum with zeros."""
        t = max(self.total.shape[0], maps.shape[0])
        out = torch.zeros((t, *maps.shape[1:]))
        out[:self.total.shape[0]] += self.total
        out[:maps.shape[0]] += maps.cpu()
        return out


def cross_attention_blocks(model) -> list[tuple[str, int, int]]:
    """(block name, block index, transformer index) of every cross-attention layer of the UNet, as ComfyUI's
    UNet names them in ``transformer_options`` (input/middle/output blocks)."""
    dm = model.model.diffusion_model
    if not hasattr(dm, "input_blocks"):
        raise ValueError(f"Token heatmaps need a UNet with cross-attention (SD1.x, SD2.x, SDXL); this model is "
                         f"{type(dm).__name__}, whose text and image share joint attention: not supported yet.")
    found = []
    for name, blocks in (("input", dm.input_blocks), ("middle", [dm.middle_block]), ("output", dm.output_blocks)):
        for i, seq in enumerate(blocks):
            for layer in seq:
                for t, blk in enumerate(getattr(layer, "transformer_blocks", [])):
                    if getattr(blk, "attn2", None) is not None:
                        found.append((name, i, t))
    if not found:
        raise ValueError("this UNet has no cross-attention layers to read token maps from")
    return found


def patched(model, capture: Capture):
    """A clone of ``model`` whose cross-attention layers report to ``capture``; outputs are unchanged."""
    def attn2(q, k, v, extra):
        out = comfy_attention.optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra["attn_precision"])
        with torch.no_grad():
            capture.add(q, k, extra)
        return out

    m = model.clone()
    for name, i, t in cross_attention_blocks(model):
        m.set_model_attn2_replace(attn2, name, i, t)
    return m


def _ids(clip, text: str) -> list[int]:
    toks = clip.tokenize(text)
    key = sorted(toks)[0]  # one encoder's tokens ("g" before "l" for SDXL; both tokenizers split words alike)
    return [int(tok[0]) for chunk in toks[key] for tok in chunk], key


def token_positions(clip, prompt: str, words: list[str]) -> dict[str, list[int]]:
    """Positions in the conditioning of each word's tokens (every occurrence). A word that does not occur
    raises, naming it."""
    ids, key = _ids(clip, prompt)
    special = set(_ids(clip, "")[0])
    out = {}
    for word in words:
        sub = [i for i in _ids(clip, word)[0] if i not in special]
        pos = [p + j for p in range(len(ids) - len(sub) + 1) if sub and ids[p:p + len(sub)] == sub
               for j in range(len(sub))]
        if not pos:
            raise ValueError(f"token heatmaps: {word!r} is not in the prompt {prompt!r} (as the {key!r} tokenizer "
                             "splits it); list words that appear in the prompt, separated by commas.")
        out[word] = pos
    return out


def heatmaps(model, clip, vae, prompt: str, negative: str, words: list[str], s: render.SampleSettings):
    """(image (1, H, W, 3), maps (len(words), H, W) in [0, 1]) for ``prompt`` sampled with ``s``."""
    positions = token_positions(clip, prompt, words)
    capture = Capture()
    pos = render.encode(clip, prompt, s.guidance)
    neg = render.encode(clip, negative, s.guidance)
    image = render.sample(patched(model, capture), vae, pos, neg, s, s.seed)
    if capture.total is None:
        raise RuntimeError("no cross-attention was captured while sampling; is this a UNet model?")
    h, w = image.shape[1:3]
    maps = []
    for word in words:
        m = capture.total[positions[word]].sum(0)
        m = F.interpolate(m[None, None], size=(h, w), mode="bicubic", align_corners=False)[0, 0].clamp_min(0)
        maps.append(m / m.max() if m.max() > 0 else m)
    return image, torch.stack(maps)


def overlay(image: torch.Tensor, heat: torch.Tensor, alpha: float = 0.55) -> torch.Tensor:
    """The image (H, W, 3) with a heat map (H, W) in [0, 1] blended over it (blue -> red)."""
    h = heat[..., None]
    colour = torch.cat([h, 1 - (2 * h - 1).abs(), 1 - h], -1)
    return (1 - alpha) * image + alpha * colour


def heatmap_grid(image: torch.Tensor, maps: torch.Tensor, words: list[str]) -> torch.Tensor:
    """One row: the image, then one tile per word with its map over the image (IMAGE (1, H, W', 3))."""
    from .. import imaging

    img = image[0]
    cells = [imaging.to_pil(img)] + [imaging.to_pil(overlay(img, m)) for m in maps]
    grid, _ = imaging.labelled_grid([cells], [""], ["image", *words], left_w=4)
    return imaging.to_tensor(grid)
