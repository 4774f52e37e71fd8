"""Checkpoint grid: saved LoRA files (or training checkpoints) x prompts, rows ordered by training step."""
from __future__ import annotations

import math
import re
from pathlib import Path

import comfy.sd
import comfy.utils
import folder_paths

from .. import paths
from . import render
from .render import SampleSettings, short


def resolve(text: str) -> list[Path]:
    """``text`` is a folder or one file per line, each a name inside ComfyUI's loras folders (or a run's
    checkpoints folder under output/aligned_trainer/runs), relative or absolute. Anything outside those
    folders is refused by the path guard with one message, whether or not it exists. Returns the
    .safetensors files."""
    entries = [t.strip() for t in text.split("\n") if t.strip()]
    if not entries:
        raise ValueError("folder: give a folder of LoRA files, a sub-folder of models/loras, or file names (one per line)")
    roots = paths.lora_roots()
    files: list[Path] = []
    for e in entries:
        p = None
        if not Path(e).is_absolute():
            full = folder_paths.get_full_path("loras", e) if not e.startswith("~") else None
            candidates = ([Path(full)] if full else []) + [Path(r) / e for r in roots.roots]
            for c in candidates:
                try:
                    c = paths.confine(str(c), roots)
                except paths.PathRefused:
                    continue
                if c.exists():
                    p = c
                    break
        if p is None:
            p = paths.confine(e, roots)
        if p.is_dir():
            found = [f for f, _ in paths.walk(p, roots, max_depth=0).files if f.suffix == ".safetensors"]
            if not found:
                raise ValueError(f"folder: no .safetensors files in {e!r}")
            files.extend(found)
        elif p.is_file() and p.suffix == ".safetensors":
            files.append(p)
        else:
            raise ValueError(f"folder: {e!r} is neither a folder nor a .safetensors file in models/loras or a run's "
                             "checkpoints folder")
    return files


def step_of(path: Path, meta: dict) -> int | None:
    """Training step from metadata (ours or kohya's ``ss_steps``), else trailing digits of the file name."""
    for k in ("step", "aligned_trainer.steps", "ss_steps"):
        if str(meta.get(k, "")).isdigit():
            return int(meta[k])
    m = re.search(r"(\d+)$", Path(path).stem)
    return int(m.group(1)) if m else None


def read_lora(path: Path, model=None) -> tuple[dict, int | None]:
    """A LoRA file (stock loader), or one of our training checkpoints converted to ComfyUI's LoRA keys (output-axis
    DoRA magnitudes against ``model``'s base weights); plus its step."""
    try:
        sd, meta = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    except Exception as e:  # safetensors' SafetensorError (not a safetensors file, truncated), OSError
        raise ValueError(f"LoRA file {path} cannot be read as safetensors ({str(e)[:200]}); it is damaged or not a "
                         "LoRA: remove it from the folder or list the files to compare one per line") from None
    meta = meta or {}
    from ..train import state

    if meta.get("format") in (state.FORMAT, state.FORMAT_V1):  # Train Steps' checkpoints (v2 has a digest)
        import torch

        from ..train import dora_axes
        from ..train.export import kohya_from_adapters

        ck = state.load_checkpoint(path)  # verified against its digest
        adapters = ck["state"]["adapters"]
        if dora_axes.has_output_axis(adapters):
            if model is None:
                raise ValueError(f"{Path(path).name}: an output-axis DoRA checkpoint needs the base model to be read")
            adapters = dora_axes.for_comfyui(model, adapters)
        return kohya_from_adapters(adapters, torch.float32), int(ck["step"])
    return sd, step_of(path, meta)


def checkpoint_grid(model, clip, vae, files: list[Path], prompts: list[str], negative: str, s: SampleSettings,
                    strength: float = 1.0, progress=None):
    """Rows = checkpoints sorted by step, columns = prompts; every cell uses ``s.seed``.
    Returns (grid, row labels, geometry)."""
    if not math.isfinite(strength):
        raise ValueError(f"strength is {strength!r}: it must be a finite number; enter a LoRA strength such as 1.0.")
    neg = render.encode(clip, negative, s.guidance)
    pos = [render.encode(clip, p, s.guidance) for p in prompts]
    loaded = []
    for f in files:
        lora, step = read_lora(f, model)
        loaded.append((step if step is not None else float("inf"), Path(f).name, lora))
    loaded.sort(key=lambda t: (t[0], t[1]))
    rows, labels = [], []
    for k, (step, name, lora) in enumerate(loaded):
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0.0)
        try:
            rows.append([render.sample(patched, vae, c, neg, s, s.seed) for c in pos])
        finally:
            render.release(patched)
        labels.append(f"step {step} ({name})" if step != float("inf") else name)
        if progress:
            progress(k + 1, f"checkpoint {k + 1}/{len(loaded)}: {name}")
    cell_labels = [[f"seed {s.seed}" for _ in prompts] for _ in rows]
    g, geo = render.grid(rows, [short(lab, 18) for lab in labels], [short(p) for p in prompts], cell_labels)
    return g, labels, geo
