"""Loss curves and histograms drawn with PIL (no plotting library needed)."""
from __future__ import annotations

import math

from PIL import Image, ImageDraw

from .imaging import BG, FG, MUTED, font

LOSS = (90, 170, 255)
SMOOTH = (255, 200, 60)
VAL = (120, 220, 120)
MINIMA = (255, 90, 90)


def ema(values: list[float], smoothing: float) -> list[float]:
    """Exponential moving average, bias-corrected (no pull towards the first value)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc = smoothing * acc + (1 - smoothing) * v
        out.append(acc / (1 - smoothing ** (i + 1)) if smoothing < 1 else v)
    return out


def local_minima(values: list[float], window: int = 5) -> list[int]:
    """Indices that are the minimum of their +-window neighbourhood (plateaus report their first index)."""
    idx = []
    for i, v in enumerate(values):
        lo, hi = max(0, i - window), min(len(values), i + window + 1)
        seg = values[lo:hi]
        if v == min(seg) and (i == lo or values[i - 1] > v) and len(values) > 2:
            idx.append(i)
    return idx


def summarize(history: list[dict], smoothing: float = 0.9, window: int = 5) -> dict:
    if not (math.isfinite(smoothing) and 0.0 <= smoothing < 1.0):
        raise ValueError(f"smoothing is {smoothing!r}: it must be a number from 0 (none) to below 1; try 0.9.")
    # a NaN or infinite loss (a diverged run, or a history typed by hand) cannot be drawn or averaged: it is left
    # out and its step listed
    non_finite = [h["step"] for h in history if not math.isfinite(float(h["loss"]))]
    history = [h for h in history if math.isfinite(float(h["loss"]))]
    steps = [h["step"] for h in history]
    loss = [float(h["loss"]) for h in history]
    sm = ema(loss, smoothing)
    val = [(h["step"], float(h["val_loss"])) for h in history
           if h.get("val_loss") is not None and math.isfinite(float(h["val_loss"]))]
    return {"steps": steps, "loss": loss, "smoothed": sm, "non_finite_loss_steps": non_finite,
            "smoothed_minima_steps": [steps[i] for i in local_minima(sm, window)],
            "val": val, "val_minima_steps": [val[i][0] for i in local_minima([v for _, v in val], 1)] if val else [],
            "best_val_step": min(val, key=lambda t: t[1])[0] if val else None}


MARGINS = (56, 16, 28, 36)  # left, right, top, bottom of a line chart's plot area


def axes(d: ImageDraw.ImageDraw, size, steps: list, values: list[float], f, muted=MUTED):
    """Frame, five value labels and the first/last step of a line chart over ``steps`` x ``values``; returns
    ``px(step, value) -> (x, y)`` in image pixels."""
    W, H = size
    L, R, T, B = MARGINS
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        hi = lo + 1e-6
    s0, s1 = min(steps), max(steps)
    s_end = s1 if s1 - s0 >= 1 else s0 + 1   # at least one step wide

    def frac(x, a, b):
        """(x - a) / (b - a), halved first where b - a overflows (values near +-1e308 in a typed history)."""
        return (x - a) / (b - a) if math.isfinite(b - a) else (x / 2 - a / 2) / (b / 2 - a / 2)

    def px(step, v):
        return L + frac(step, s0, s_end) * (W - L - R), T + (1 - frac(v, lo, hi)) * (H - T - B)

    d.rectangle([L, T, W - R, H - B], outline=muted)
    for k in range(5):
        v = lo + (hi - lo) * k / 4 if math.isfinite(hi - lo) else lo * (1 - k / 4) + hi * (k / 4)
        d.text((4, px(s0, v)[1] - 6), f"{v:.4g}", fill=muted, font=f)
    d.text((L, H - B + 6), str(s0), fill=muted, font=f)
    d.text((W - R - 30, H - B + 6), str(s1), fill=muted, font=f)
    return px


def loss_plot(history: list[dict], smoothing: float = 0.9, size=(640, 360), title: str = "training loss") -> tuple[Image.Image, dict]:
    info = summarize(history, smoothing)
    W, H = size
    L = MARGINS[0]
    img = Image.new("RGB", size, BG)
    d = ImageDraw.Draw(img)
    f = font(11)
    d.text((L, 6), title, fill=FG, font=font(13))
    if not info["steps"]:
        d.text((L, H // 2), "no finite loss to draw" if info["non_finite_loss_steps"] else "no steps yet",
               fill=MUTED, font=f)
        return img, info
    if info["non_finite_loss_steps"]:
        bad = info["non_finite_loss_steps"]
        d.text((L, H - 14), f"non-finite loss at {len(bad)} step(s), first {bad[0]}: left out", fill=MUTED, font=f)
    px = axes(d, size, info["steps"], info["loss"] + [v for _, v in info["val"]], f)
    pts = [px(s, v) for s, v in zip(info["steps"], info["loss"])]
    if len(pts) > 1:
        d.line(pts, fill=LOSS, width=1)
    spts = [px(s, v) for s, v in zip(info["steps"], info["smoothed"])]
    if len(spts) > 1:
        d.line(spts, fill=SMOOTH, width=2)
    vpts = [px(s, v) for s, v in info["val"]]
    if len(vpts) > 1:
        d.line(vpts, fill=VAL, width=2)
    for x, y in vpts:
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=VAL)
    for step in info["smoothed_minima_steps"]:
        i = info["steps"].index(step)
        x, y = spts[i]
        d.ellipse([x - 3, y - 3, x + 3, y + 3], outline=MINIMA)
    x = W - 300
    for label, color in (("loss", LOSS), ("smoothed", SMOOTH), ("validation", VAL), ("minima", MINIMA)):
        d.rectangle([x, 11, x + 8, 19], fill=color)
        d.text((x + 11, 8), label, fill=MUTED, font=f)
        x += 16 + int(d.textlength(label, font=f))
    return img, info


def histogram(values, bins: int = 40, size=(480, 240), title: str = "") -> Image.Image:
    vals = [float(v) for v in values]
    lo, hi = 0.0, 1.0
    counts = [0] * bins
    for v in vals:
        counts[min(bins - 1, max(0, int((v - lo) / (hi - lo) * bins)))] += 1
    W, H = size
    img = Image.new("RGB", size, BG)
    d = ImageDraw.Draw(img)
    d.text((8, 6), title, fill=FG, font=font(12))
    top = max(counts) or 1
    bw = (W - 20) / bins
    for i, c in enumerate(counts):
        h = (H - 50) * c / top
        d.rectangle([10 + i * bw, H - 24 - h, 10 + (i + 1) * bw - 1, H - 24], fill=LOSS)
    d.text((10, H - 20), "clean (t=0)", fill=MUTED, font=font(10))
    d.text((W - 90, H - 20), "noise (t=1000)", fill=MUTED, font=font(10))
    mean = sum(vals) / max(1, len(vals))
    d.text((W // 2 - 40, H - 20), f"mean {mean * 1000:.0f}", fill=FG, font=font(10))
    return img


def nan_safe(x: float) -> float | None:
    return None if x is None or math.isnan(x) else x
