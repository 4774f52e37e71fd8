"""Sample previews, preview plans for training, A/B comparison and checkpoint grids."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import comfy.sd
import comfy.utils
import torch

from . import render
from .render import SampleSettings, short


def prompt_list(text: str) -> list[str]:
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if not lines:
        raise ValueError("give at least one prompt (one per line)")
    return lines


def preview_grid(model, clip, vae, prompts: list[str], negative: str, s: SampleSettings, step: int = 0):
    """One row: each prompt at this step's seed. Returns (grid, cells batch, geometry)."""
    neg = render.encode(clip, negative, s.guidance)
    seed = s.seed_for(step)
    cells = [render.sample(model, vae, render.encode(clip, p, s.guidance), neg, s, seed) for p in prompts]
    labels = [[f"seed {seed}" for _ in prompts]]
    g, geo = render.grid([cells], [f"step {step}"], [short(p) for p in prompts], labels)
    return g, torch.cat(cells), geo


@dataclass(frozen=True)
class PreviewPlan:
    """What Train Steps renders every ``every_n`` steps. Conditionings are encoded once, when the plan is
    made, so the text encoder need not stay in memory during training."""

    vae: object
    prompts: tuple[str, ...]
    positives: tuple
    negative: list
    settings: SampleSettings
    every_n: int

    def render(self, model, step: int) -> torch.Tensor:
        seed = self.settings.seed_for(step)
        try:
            cells = [render.sample(model, self.vae, pos, self.negative, self.settings, seed) for pos in self.positives]
        finally:
            render.release(model)
        g, _ = render.grid([cells], [f"step {step}"], [short(p) for p in self.prompts],
                           [[f"seed {seed}" for _ in self.prompts]])
        return g


def make_plan(clip, vae, prompts: list[str], negative: str, s: SampleSettings, every_n: int) -> PreviewPlan:
    if every_n < 1:
        raise ValueError("every_n must be >= 1")
    pos = tuple(render.encode(clip, p, s.guidance) for p in prompts)
    return PreviewPlan(vae, tuple(prompts), pos, render.encode(clip, negative, s.guidance), s, every_n)


def mean_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().mean())


def ab_compare(model_a, model_b, clip_a, clip_b, vae, prompts: list[str], negative: str, s: SampleSettings,
               labels: tuple[str, str] = ("A", "B")):
    """Same prompts, seed and noise through (model_a, clip_a) and (model_b, clip_b)."""
    rows_a, rows_b, cells, diffs = [], [], [], []
    for p in prompts:
        a = render.sample(model_a, vae, render.encode(clip_a, p, s.guidance), render.encode(clip_a, negative, s.guidance),
                          s, s.seed)
        b = render.sample(model_b, vae, render.encode(clip_b, p, s.guidance), render.encode(clip_b, negative, s.guidance),
                          s, s.seed)
        rows_a.append(a)
        rows_b.append(b)
        d = mean_abs_diff(a, b)
        diffs.append({"prompt": p, "seed": s.seed, "mean_abs_diff": d})
        cells.append([a, b])
    g, geo = render.grid(cells, [short(p, 18) for p in prompts], list(labels),
                         [[labels[0], f"{labels[1]}  Δ {d['mean_abs_diff']:.4f}"] for d in diffs])
    return g, torch.cat(rows_a), torch.cat(rows_b), diffs, geo


def read_lora(path: Path) -> tuple[dict, str]:
    """A LoRA file, or one of our training checkpoints converted to LoRA keys; plus a step label."""
    sd, meta = comfy.utils.load_torch_file(str(path), return_metadata=True)
    meta = meta or {}
    if meta.get("format") == "aligned_trainer.checkpoint.v1":
        from ..train.export import kohya_from_adapters
        from ..train.state import load_checkpoint

        ck = load_checkpoint(path)
        return kohya_from_adapters(ck["state"]["adapters"], torch.float32), f"step {ck['step']}"
    step = meta.get("ss_steps") or meta.get("aligned_trainer.steps")
    return sd, f"step {step}" if step else Path(path).stem


def checkpoint_grid(model, clip, vae, files: list[Path], prompts: list[str], negative: str, s: SampleSettings,
                    strength: float = 1.0):
    rows, labels = [], []
    neg = render.encode(clip, negative, s.guidance)
    pos = [render.encode(clip, p, s.guidance) for p in prompts]
    for f in files:
        lora, label = read_lora(f)
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0.0)
        rows.append([render.sample(patched, vae, c, neg, s, s.seed) for c in pos])
        render.release(patched)
        labels.append(f"{label} ({Path(f).name})")
    g, geo = render.grid(rows, [short(lab, 18) for lab in labels], [short(p) for p in prompts])
    return g, labels, geo


def list_checkpoints(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"checkpoint folder {folder} does not exist")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors files in {folder}")
    return files


def history_from(run=None, text: str = "") -> list[dict]:
    if run is not None:
        return list(run.history)
    data = json.loads(text) if text.strip() else []
    if not isinstance(data, list) or not all(isinstance(h, dict) and "step" in h and "loss" in h for h in data):
        raise ValueError("loss history JSON must be a list of {\"step\": int, \"loss\": float, ...}")
    return data
