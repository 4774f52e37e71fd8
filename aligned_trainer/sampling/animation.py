"""Animated previews: the frames of a video sample (a clip grid, (F, H, W, 3) in [0, 1]) written as one animated
WebP into ComfyUI's output folder, and the UI entry the frontend plays, shaped as ComfyUI's own SaveAnimatedWEBP
returns it (``{"images": [{filename, subfolder, type}], "animated": (True,)}``).

Frames are stored lossless, so each frame of the file is the decoded frame rounded to 8 bits; the file is
written under a temporary name and renamed, so a reader never sees half a file."""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch

from .. import imaging

SUBFOLDER = "aligned_trainer/previews"


def frames_to_pil(frames: torch.Tensor) -> list:
    """(F, H, W, 3) in [0, 1] -> F RGB PIL images (rounded to 8 bits)."""
    return [imaging.to_pil(f) for f in frames]


def save_webp(frames: torch.Tensor, name: str, fps: float) -> dict:
    """Write ``frames`` as an animated, lossless WebP at ``fps`` into ``<output>/aligned_trainer/previews`` as
    ``<name>_<counter>_.webp`` (the next free counter, as ComfyUI's save nodes number files); returns its /view
    reference ``{filename, subfolder, type: "output"}``."""
    import folder_paths

    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a finite number > 0 (got {fps!r}); Wan clips play at 16.")
    if frames.ndim != 4 or frames.shape[0] < 1:
        raise ValueError(f"an animated preview needs frames shaped (F, H, W, 3), got {tuple(frames.shape)}")
    images = frames_to_pil(frames)
    w, h = images[0].size
    folder, base, counter, subfolder, _ = folder_paths.get_save_image_path(
        f"{SUBFOLDER}/{name}", folder_paths.get_output_directory(), w, h)
    Path(folder).mkdir(parents=True, exist_ok=True)
    filename = f"{base}_{counter:05}_.webp"
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            images[0].save(f, format="WEBP", save_all=True, append_images=images[1:], duration=round(1000.0 / fps),
                           loop=0, lossless=True, quality=80, method=4)
        os.replace(tmp, Path(folder) / filename)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"filename": filename, "subfolder": subfolder, "type": "output"}


def ui(refs: list[dict]) -> dict:
    """The node UI output that shows ``refs`` as animated images (as SaveAnimatedWEBP returns it)."""
    return {"images": list(refs), "animated": (True,)}
