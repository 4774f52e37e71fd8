"""Kohya-format LoRA files (``lora_unet_*.lora_down/lora_up/alpha``) for a loaded model, written with seeded
weights, and the stock-node reference render used by the sampling tests."""
from __future__ import annotations

from pathlib import Path

import torch


def kohya_lora(model, seed: int, rank: int = 4, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """Seeded LoRA on every 2-D (Linear) UNet weight, keyed the way kohya (diffusers names) writes them."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    sd = model.model.state_dict()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, target in sorted(key_map.items()):
        if not k.startswith("lora_unet_") or not any(b in k for b in ("down_blocks", "mid_block", "up_blocks")):
            continue
        w = sd.get(target)
        if w is None or w.ndim != 2:
            continue
        o, i = w.shape
        out[f"{k}.lora_down.weight"] = torch.randn(rank, i, generator=g) / i ** 0.5
        out[f"{k}.lora_up.weight"] = torch.randn(o, rank, generator=g) * scale / rank ** 0.5
        out[f"{k}.alpha"] = torch.tensor(float(rank))
    return out


def write_lora(path: Path, sd: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def stock_render(nodes, model, clip, vae, prompt: str, negative: str, seed: int, steps=2, cfg=2.0,
                 sampler="euler", scheduler="normal", size=64, guidance=None):
    """The stock graph: CLIPTextEncode (-> FluxGuidance) -> EmptyLatentImage -> KSampler -> VAEDecode."""
    (pos,) = nodes.CLIPTextEncode().encode(clip, prompt)
    (neg,) = nodes.CLIPTextEncode().encode(clip, negative)
    if guidance is not None:
        import node_helpers

        pos = node_helpers.conditioning_set_values(pos, {"guidance": guidance})
        neg = node_helpers.conditioning_set_values(neg, {"guidance": guidance})
    (lat,) = nodes.EmptyLatentImage().generate(size, size, 1)
    (out,) = nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, pos, neg, lat)
    (img,) = nodes.VAEDecode().decode(vae, out)
    return img


def cell(grid, geo, i, j):
    x0, y0, x1, y1 = geo["cell_boxes"][i][j]
    return grid[0, y0:y1, x0:x1]
