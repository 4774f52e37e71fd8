"""A concept slider's strength sweep: each prompt (rows) sampled with the trained LoRA at each strength (columns,
e.g. -2 ... +2) through ComfyUI's stock LoRA loader and sampler (``render.sample``: what LoraLoaderModelOnly +
KSampler + VAEDecode give), with one seed everywhere, so a column differs from the others only by the strength."""
from __future__ import annotations

import math

import torch

from ..train import export
from . import render
from .render import SampleSettings, short

MAX_STRENGTHS = 16


def parse_strengths(text: str) -> list[float]:
    """'-2, -1, 0, 1, 2' -> [-2.0, -1.0, 0.0, 1.0, 2.0]; one ValueError naming the bad entry otherwise."""
    out = []
    for part in (p.strip() for p in str(text).replace(";", ",").split(",")):
        if not part:
            continue
        try:
            v = float(part)
        except ValueError:
            raise ValueError(f"strengths: {part!r} is not a number; write LoRA strengths separated by commas, "
                             "e.g. '-2, -1, 0, 1, 2'") from None
        if not math.isfinite(v) or abs(v) > 100:
            raise ValueError(f"strengths: {part!r} must be a finite number between -100 and 100, e.g. '-2, 0, 2'")
        out.append(v)
    if not out or len(out) > MAX_STRENGTHS:
        raise ValueError(f"strengths: give 1 to {MAX_STRENGTHS} LoRA strengths separated by commas (got {len(out)}), "
                         "e.g. '-2, -1, 0, 1, 2'")
    return out


def sweep(run, clip, vae, prompts: list[str], strengths: list[float], negative: str, s: SampleSettings,
          progress=None) -> tuple[torch.Tensor, dict]:
    """(grid, geometry): rows = prompts, columns = strengths; the run's LoRA (fp32, EMA weights when kept) on its
    base model at each strength; strength 0 is the base model itself."""
    if not prompts:
        raise ValueError("Slider Sweep: write at least one prompt (one per line), e.g. the slider's target prompt")
    lora = export.kohya_state_dict(run, dtype=torch.float32)
    neg = render.encode(clip, negative, s.guidance)
    pos = [render.encode(clip, p, s.guidance) for p in prompts]
    columns = []
    for k, w in enumerate(strengths):
        patched = export.model_with_lora(run.model, lora, w) if w else run.model
        try:
            columns.append([render.sample(patched, vae, c, neg, s, s.seed) for c in pos])
        finally:
            if patched is not run.model:
                render.release(patched)
        if progress:
            progress(k + 1, f"strength {w:+g} ({k + 1}/{len(strengths)})")
    rows = [[columns[j][i] for j in range(len(strengths))] for i in range(len(prompts))]
    cells = [[f"seed {s.seed}" for _ in strengths] for _ in prompts]
    return render.grid(rows, [short(p, 18) for p in prompts], [f"{w:+g}" for w in strengths], cells)
