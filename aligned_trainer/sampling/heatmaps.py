"""Token heatmaps (DAAM, Tang et al. 2022): where each prompt token acts in a generated image.

While ComfyUI's own sampler runs, a clone of the model carries a capture hook (ComfyUI is not edited), and the
hooked call still computes its output with ComfyUI's own attention function, so the image is unchanged:
- UNet families (SD1.x, SD2.x, SDXL): every cross-attention layer gets ComfyUI's ``attn2`` replace patch, which
  calls ``optimized_attention`` as the unpatched layer does and records the softmax attention of the image
  queries over the text tokens;
- DiTs whose attention goes through ComfyUI's wrapped attention (the joint attention of FLUX.1, Chroma, SD3's
  MMDiT, Qwen-Image, Z-Image, Lumina 2, HiDream, HunyuanVideo 1.5; Wan's cross-attention; where their text tokens
  sit is data in ``joint_layouts.py``; the recorded maps ignore any attention mask): the
  ``optimized_attention_override`` hook of ``transformer_options`` sees every attention call; for the calls from
  the image to the text it records the text-to-image part (image queries, softmax over all keys, the text keys'
  columns).
As DAAM does, the maps are averaged over heads, summed over layers and sampling steps (the conditional half of a
CFG batch only), upsampled to the image (bicubic) and normalised per token to [0, 1]. Other models are refused
with a message naming the family (docs/heatmaps.md).
"""
from __future__ import annotations

import math

import comfy.ldm.modules.attention as comfy_attention
import torch
import torch.nn.functional as F

from . import joint_layouts, render


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

    def add_joint(self, q: torch.Tensor, k: torch.Tensor, span: joint_layouts.Span, options: dict) -> None:
        """A joint-attention call (B, heads, sequence, d) laid out as ``span`` says: the image queries' attention
        to the text keys, softmax over all keys, averaged over heads one head at a time (bounded memory)."""
        chunks = options.get("cond_or_uncond") or [0]
        per = q.shape[0] // len(chunks)
        rows = [i * per for i, c in enumerate(chunks) if c == 0]
        if not rows:
            return
        r = rows[0]
        h, w = span.grid
        text_len = span.text.stop - span.text.start
        acc = torch.zeros(h * w, text_len)
        scale = 1.0 / math.sqrt(q.shape[-1])
        for head in range(q.shape[1]):
            qi = q[r, head, span.image].float()
            ki = k[r, head].float()
            acc += torch.softmax(qi @ ki.T * scale, dim=-1)[:, span.text].cpu()
        maps = (acc / q.shape[1]).T.reshape(text_len, h, w)
        self.total = maps if self.total is None else (self.total + maps if self.total.shape == maps.shape
                                                      else self._grow(maps))
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
        raise ValueError(f"Token heatmaps read UNet cross-attention (SD1.x, SD2.x, SDXL) or the text attention of "
                         f"the DiTs listed in joint_layouts.py ({', '.join(joint_layouts.LAYOUTS)}); this model is "
                         f"{joint_layouts.family_name(model)} ({type(dm).__name__}): not supported yet.")
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


def _heads_first(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k of an ``optimized_attention`` call as (B, heads, sequence, d), whichever layout the caller used."""
    q, k = args[0], args[1]
    if kwargs.get("skip_reshape"):
        return q, k
    heads = kwargs["heads"] if "heads" in kwargs else args[3]
    b, n, _ = q.shape
    return (q.reshape(b, n, heads, -1).transpose(1, 2), k.reshape(b, k.shape[1], heads, -1).transpose(1, 2))


def refuse_unreadable(model) -> None:
    """Raise, naming the family, when the model has neither UNet cross-attention nor a known joint layout."""
    if joint_layouts.layout(model) is None:
        cross_attention_blocks(model)


def patched(model, capture: Capture, text_len: int | None = None, latent_hw: tuple[int, int] | None = None):
    """A clone of ``model`` whose attention reports to ``capture``; outputs are unchanged. Joint-attention
    models (joint_layouts.LAYOUTS) need the conditioning's ``text_len`` and the latent's (height, width)."""
    if joint_layouts.layout(model) is not None:
        if not text_len or not latent_hw:
            raise ValueError("token heatmaps on a joint-attention model need the prompt's token count and the "
                             "latent size")
        span = joint_layouts.span(model, text_len, latent_hw)

        m = model.clone()
        options = m.model_options.setdefault("transformer_options", {})
        own = options.get("optimized_attention_override")  # the user's own attention override runs as before

        def override(func, *args, **kwargs):
            out = own(func, *args, **kwargs) if own is not None else func(*args, **kwargs)
            axis = -2 if kwargs.get("skip_reshape") else 1  # the sequence axis
            here = span.locate(args[0].shape[axis], args[1].shape[axis])  # image-to-text calls only
            if here is not None:
                with torch.no_grad():
                    qh, kh = _heads_first(args, kwargs)
                    capture.add_joint(qh, kh, here, kwargs.get("transformer_options") or {})
            return out

        options["optimized_attention_override"] = override
        return m

    def attn2(q, k, v, extra):
        out = comfy_attention.optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra["attn_precision"])
        with torch.no_grad():
            capture.add(q, k, extra)
        return out

    m = model.clone()
    for name, i, t in cross_attention_blocks(model):
        m.set_model_attn2_replace(attn2, name, i, t)
    return m


def _ids(clip, text: str, text_len: int | None = None, key: str | None = None) -> tuple[list[int], str, int]:
    """Token ids of ``text`` from the tokenizer whose tokens make the conditioning, the tokenizer's key, and how
    many leading tokens the encoder drops. The tokenizer is the one whose count is ``text_len`` (T5 for FLUX.1,
    not CLIP-L's pooled text); else one with more tokens, whose leading surplus the encoder drops (Qwen-Image's
    chat template, cut at its end by ComfyUI's encoder); else the first (SD3: CLIP-L/G's 77 tokens open the
    sequence, T5's follow, not mapped). For SDXL/SD3 both CLIPs split words alike. ``key`` names the tokenizer
    where the model's layout does (joint_layouts.tokenizer: HiDream's T5, as long as its Llama)."""
    toks = clip.tokenize(text)
    flat = {k: [int(t[0]) for chunk in v for t in chunk] for k, v in toks.items()}
    keys = sorted(flat)
    if key is not None and key not in flat:
        raise ValueError(f"token heatmaps: this CLIP has no {key!r} tokenizer (it has {', '.join(keys)}); connect the "
                         "text encoders of the model's family")
    key = key or next((k for k in keys if text_len and len(flat[k]) == text_len), None)
    if key is None:
        key = next((k for k in keys if text_len and len(flat[k]) > text_len), keys[0])
    dropped = len(flat[key]) - text_len if text_len and len(flat[key]) > text_len else 0
    return flat[key], key, dropped


def token_positions(clip, prompt: str, words: list[str], text_len: int | None = None,
                    tokenizer: str | None = None) -> dict[str, list[int]]:
    """Positions in the conditioning of each word's tokens (every occurrence), read with ``tokenizer`` where given
    (joint_layouts.tokenizer). A word that does not occur raises, naming it."""
    ids, key, dropped = _ids(clip, prompt, text_len, tokenizer)

    def key_ids(text: str) -> list[int]:
        return [int(t[0]) for chunk in clip.tokenize(text)[key] for t in chunk]

    special = set(key_ids(""))  # start, end and padding tokens (and a chat template's)

    def find(sub: list[int]) -> list[int]:
        return [p + j - dropped for p in range(dropped, len(ids) - len(sub) + 1) if sub and ids[p:p + len(sub)] == sub
                for j in range(len(sub))]

    out = {}
    for word in words:
        # byte-level BPE (Qwen, Llama) spells a word inside a sentence with its leading space
        pos = find([i for i in key_ids(word) if i not in special]) or find(
            [i for i in key_ids(" " + word) if i not in special])
        if not pos:
            raise ValueError(f"token heatmaps: {word!r} is not in the prompt {prompt!r} (as the {key!r} tokenizer "
                             "splits it); list words that appear in the prompt, separated by commas.")
        out[word] = pos
    return out


def heatmaps(model, clip, vae, prompt: str, negative: str, words: list[str], s: render.SampleSettings):
    """(image (1, H, W, 3), maps (len(words), H, W) in [0, 1]) for ``prompt`` sampled with ``s``."""
    capture = Capture()
    pos = render.encode(clip, prompt, s.guidance)
    positions = token_positions(clip, prompt, words, pos[0][0].shape[1], joint_layouts.tokenizer(model))
    neg = render.encode(clip, negative, s.guidance)
    refuse_unreadable(model)  # before sampling
    latent_hw = tuple(render.empty_latent(model, vae, s).shape[-2:])
    hooked = patched(model, capture, text_len=pos[0][0].shape[1], latent_hw=latent_hw)
    image = render.sample(hooked, vae, pos, neg, s, s.seed)
    if capture.total is None:
        raise RuntimeError("no text attention was captured while sampling this model")
    return image, word_maps(capture, positions, words, tuple(image.shape[1:3]))


def word_maps(capture: Capture, positions: dict[str, list[int]], words: list[str], size: tuple[int, int]):
    """(len(words), H, W): each word's map (the sum over its tokens' captured maps), upsampled to ``size``
    (bicubic) and normalised to [0, 1]."""
    maps = []
    for word in words:
        m = capture.total[positions[word]].sum(0)
        m = F.interpolate(m[None, None], size=size, mode="bicubic", align_corners=False)[0, 0].clamp_min(0)
        maps.append(m / m.max() if m.max() > 0 else m)
    return torch.stack(maps)


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
