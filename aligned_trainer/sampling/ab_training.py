"""A/B training experiment: two runs trained on the same data with the same seed, one with aligned and one with
unaligned text encoders. Compares their recorded configs (they must differ only in the encoder), draws both
validation-loss curves on one chart, and renders a grid whose rows pair each LoRA with each CLIP."""
from __future__ import annotations

from PIL import Image, ImageDraw

from .. import plot
from ..imaging import font, to_tensor
from . import render
from .render import SampleSettings, short

COLORS = ((40, 110, 220), (220, 90, 40))
BG, FG, MUTED = (255, 255, 255), (20, 20, 20), (120, 120, 120)


def run_record(run) -> dict:
    """What a run was trained with: its config, text-encoder spec and the caption reading recorded at caching."""
    meta = getattr(run.training_set, "meta", {}) or {}
    return {"config": run.config_json(), "te_spec": run.te_spec, "prompt_syntax": meta.get("prompt_syntax"),
            "clip_id": meta.get("clip_id"), "dataset_hash": meta.get("dataset_hash"), "steps": run.step}


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Paths where two nested records differ (``config/settings/run_name``...)."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        path = f"{prefix}{k}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differences(va, vb, path + "/")
        elif va != vb:
            out.append(path)
    return out


def val_curves(histories: list[list[dict]], labels: list[str], size=(640, 360),
               title: str = "validation loss: aligned vs unaligned") -> Image.Image:
    """Each run's validation loss (the training loss where a run has no validation points) on one chart."""
    series = []
    for hist in histories:
        pts = [(h["step"], float(h["val_loss"])) for h in hist if h.get("val_loss") is not None]
        kind = "validation"
        if not pts:
            pts, kind = [(h["step"], float(h["loss"])) for h in hist if h.get("loss") is not None], "training"
        series.append((pts, kind))
    W, H = size
    L = plot.MARGINS[0]
    img = Image.new("RGB", size, BG)
    d = ImageDraw.Draw(img)
    f = font(11)
    d.text((L, 6), title, fill=FG, font=font(13))
    allp = [p for pts, _ in series for p in pts]
    if not allp:
        d.text((L, H // 2), "no steps yet", fill=MUTED, font=f)
        return img
    px = plot.axes(d, size, [s for s, _ in allp], [v for _, v in allp], f, muted=MUTED)
    x = W - 320
    for (pts, kind), label, color in zip(series, labels, COLORS):
        xy = [px(s, v) for s, v in pts]
        if len(xy) > 1:
            d.line(xy, fill=color, width=2)
        for cx, cy in xy:
            d.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=color)
        text = f"{label} ({kind})"
        d.rectangle([x, 11, x + 8, 19], fill=color)
        d.text((x + 11, 8), text, fill=MUTED, font=f)
        x += 20 + int(d.textlength(text, font=f))
    return img


def pairs_grid(model_a, model_b, clip_a, clip_b, vae, prompts: list[str], negative: str, s: SampleSettings,
               labels: tuple[str, str] = ("aligned", "unaligned")):
    """Rows: LoRA A + CLIP A, LoRA B + CLIP B, then the crossed pairs (LoRA A + CLIP B, LoRA B + CLIP A);
    columns: prompts; every cell from the same seed. Returns (grid IMAGE, row labels)."""
    rows = [(model_a, clip_a, f"{labels[0]} LoRA + {labels[0]} CLIP"), (model_b, clip_b, f"{labels[1]} LoRA + {labels[1]} CLIP"),
            (model_a, clip_b, f"{labels[0]} LoRA + {labels[1]} CLIP"), (model_b, clip_a, f"{labels[1]} LoRA + {labels[0]} CLIP")]
    cells = []
    for model, clip, _ in rows:
        neg = render.encode(clip, negative, s.guidance)
        cells.append([render.sample(model, vae, render.encode(clip, p, s.guidance), neg, s, s.seed) for p in prompts])
    render.release(model_a, model_b)
    g, _ = render.grid(cells, [r[2] for r in rows], [short(p, 18) for p in prompts])
    return g, [r[2] for r in rows]


def report(run_a, run_b, model_a, model_b, clip_a, clip_b, vae, prompts: list[str], negative: str, s: SampleSettings,
           labels: tuple[str, str] = ("aligned", "unaligned")):
    """(loss chart IMAGE, grid IMAGE, record dict with both runs and where they differ)."""
    rec_a, rec_b = run_record(run_a), run_record(run_b)
    chart = to_tensor(val_curves([list(run_a.history), list(run_b.history)], list(labels)))
    grid, rows = pairs_grid(model_a, model_b, clip_a, clip_b, vae, prompts, negative, s, labels)
    return chart, grid, {"a": rec_a, "b": rec_b, "differences": differences(rec_a, rec_b), "grid_rows": rows,
                         "labels": list(labels)}
