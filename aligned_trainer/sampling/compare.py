"""A/B comparison: the same prompts, seed and noise through two (model, CLIP) pairs, side by side with a
difference figure per pair."""
from __future__ import annotations

import math

import torch

from . import render
from .render import SampleSettings, short

DIFF_GAIN = 4.0  # the |A-B| column is drawn x4 so small differences are visible


def metrics(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Pixel differences in [0, 1] units: mean/max absolute difference, RMSE and PSNR (dB, inf if equal)."""
    d = (a.float() - b.float()).abs()
    mse = float((d * d).mean())
    return {"mean_abs_diff": float(d.mean()), "max_abs_diff": float(d.max()), "rmse": math.sqrt(mse),
            "psnr_db": float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)}


def diff_image(a: torch.Tensor, b: torch.Tensor, gain: float = DIFF_GAIN) -> torch.Tensor:
    return ((a.float() - b.float()).abs() * gain).clamp(0, 1)


def ab_compare(model_a, model_b, clip_a, clip_b, vae, prompts: list[str], negative: str, s: SampleSettings,
               labels: tuple[str, str] = ("A", "B")):
    """Returns (grid, images A, images B, per-pair metrics list, geometry). Rows = prompts, columns = A, B,
    |A-B|. Both sides use ``s.seed`` and so the same initial noise."""
    rows_a, rows_b, cells, diffs, cell_labels = [], [], [], [], []
    for p in prompts:
        a = render.sample(model_a, vae, render.encode(clip_a, p, s.guidance), render.encode(clip_a, negative, s.guidance),
                          s, s.seed)
        b = render.sample(model_b, vae, render.encode(clip_b, p, s.guidance), render.encode(clip_b, negative, s.guidance),
                          s, s.seed)
        m = metrics(a, b)
        diffs.append({"prompt": p, "seed": s.seed, **m})
        rows_a.append(a)
        rows_b.append(b)
        cells.append([a, b, diff_image(a, b)])
        cell_labels.append([f"seed {s.seed}", f"seed {s.seed}", f"mean |Δ| {m['mean_abs_diff']:.4f}"])
    render.release(model_a, model_b)
    cols = [labels[0], labels[1], f"|{labels[0]} − {labels[1]}| ×{DIFF_GAIN:g}"]
    g, geo = render.grid(cells, [short(p, 18) for p in prompts], cols, cell_labels)
    return g, torch.cat(rows_a), torch.cat(rows_b), diffs, geo


def json_safe(diffs: list[dict]) -> list[dict]:
    """PSNR of identical images is inf, which JSON cannot hold: write it as null."""
    return [{k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()} for d in diffs]
