"""VAE round-trip: what the model is really trained to reproduce. Each dataset image, resized and cropped to its
bucket exactly as training sees it, is encoded and decoded by the VAE (any VAE ComfyUI loads), and compared with
the original by PSNR and SSIM. The kohya LoRA guide (seed 002) shows why: a LoRA learns the decoded image, so
detail the VAE loses (eyes, fine lines, lighting) cannot be learned with that VAE.

Both compare the 8-bit original with the 8-bit decoded image (as a sample is saved). PSNR is
10·log10(1 / MSE) on [0, 1] pixels over all channels. SSIM is Wang et al.'s index with an 11x11 Gaussian
window (sigma 1.5), K1 = 0.01, K2 = 0.03, computed per channel over the valid region (no padding, as their
reference code) and averaged; both come from kornia (a ComfyUI dependency).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

PSNR_FLAG = 25.0   # dB: below this the VAE visibly loses detail at this resolution
SSIM_FLAG = 0.80


def metrics(original: torch.Tensor, decoded: torch.Tensor) -> tuple[float, float]:
    """(PSNR dB, SSIM) of two (1, 3, H, W) images in [0, 1]."""
    from kornia.metrics import psnr, ssim

    a, b = original.float(), decoded.float().clamp(0, 1)
    mse = torch.mean((a - b) ** 2)
    p = float("inf") if mse == 0 else float(psnr(b, a, 1.0))
    s = float(ssim(a, b, 11, 1.0, padding="valid").mean())
    return p, s


def _chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def roundtrip(ds, vae, progress=None, interrupted=None) -> list[dict]:
    """Per distinct dataset image (flipped copies skipped): PSNR, SSIM, whether it is flagged, and the original
    and decoded pixels (PIL) for the grid; worst (lowest PSNR) first."""
    rows = []
    items = [i for i in ds.items if not i.flip]
    for n, item in enumerate(items):
        if interrupted:
            interrupted()
        img = ds.pixels(item)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
        with torch.inference_mode():
            dec = vae.decode(vae.encode(pixels))
        dec = dec.reshape(-1, *dec.shape[-3:])[:1].float().cpu()  # video VAEs add a frame axis
        if dec.shape[1:3] != pixels.shape[1:3]:
            raise ValueError(f"the VAE decoded {item.source} to {tuple(dec.shape[1:3])}, not its bucket "
                             f"{tuple(pixels.shape[1:3])}: is this the image VAE of the model you train?")
        decoded = Image.fromarray((dec[0].clamp(0, 1).numpy() * 255.0).round().astype(np.uint8))
        p, s = metrics(_chw(img), _chw(decoded))  # the 8-bit decoded image, as a sample is saved and seen
        flags = [f for f, bad in ((f"PSNR {p:.1f} dB < {PSNR_FLAG:.0f}", p < PSNR_FLAG),
                                  (f"SSIM {s:.3f} < {SSIM_FLAG}", s < SSIM_FLAG)) if bad]
        name = item.source if item.source.startswith("graph:") else Path(item.source).name
        rows.append({"source": name, "bucket": list(item.bucket), "psnr": round(p, 3), "ssim": round(s, 4),
                     "flags": flags, "original": img, "decoded": decoded})
        if progress:
            progress(n + 1, len(items))
    rows.sort(key=lambda r: (r["psnr"], r["ssim"]))
    return rows


def difference(a: Image.Image, b: Image.Image, gain: float = 4.0) -> Image.Image:
    """|a - b| per pixel, amplified by ``gain`` so small losses show."""
    d = np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)) * gain
    return Image.fromarray(d.clip(0, 255).astype(np.uint8))


def report(rows: list[dict]) -> dict:
    """The JSON report of ``roundtrip``'s rows (worst first), without the pixels."""
    return {"images": [{k: r[k] for k in ("source", "bucket", "psnr", "ssim", "flags")} for r in rows],
            "flagged": sum(1 for r in rows if r["flags"]),
            "thresholds": {"psnr_db": PSNR_FLAG, "ssim": SSIM_FLAG}}


def preview_rows(rows: list[dict], limit: int) -> list[tuple[str, list, list[str]]]:
    """Grid rows (label, [original, decoded, difference x4], captions), worst first."""
    return [(r["source"], [r["original"], r["decoded"], difference(r["original"], r["decoded"])],
             ["", f"PSNR {r['psnr']:.1f} dB", f"SSIM {r['ssim']:.3f}"]) for r in rows[:limit]]
