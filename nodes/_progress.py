"""What a training run tells the UI while it runs: one status event per step (step, loss, lr, speed, an ETA
that counts the validation passes, checkpoints and previews still to come, and an overall fraction that only
grows), the node's progress bar, and preview images as files in ComfyUI's temp folder announced by an
``aligned_trainer.preview`` event (the frontend shows them beside the loss chart, not under it).

``RunClock`` is plain Python (no ComfyUI): it learns what a plain step costs and what each periodic extra
(validation, checkpoint, preview) adds, from the intervals it observes."""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..aligned_trainer import imaging
from ..aligned_trainer.sampling import animation
from ._common import NodeProgress, send_event

PREVIEW_SUBFOLDER = "aligned_trainer_previews"


def due(start: int, end: int, every: int) -> int:
    """How many multiples of ``every`` lie in (start, end]."""
    return 0 if every <= 0 or end <= start else end // every - start // every


class RunClock:
    """ETA and overall progress of ``total`` steps after ``start``, with periodic extras ``every`` (name -> N,
    0 = never). ``step(s, extras)`` marks the end of step ``s`` (the extras that ran with it); ``extra(name,
    seconds)`` records an extra timed on its own (previews). Costs are learned: a plain step's is the median
    of steps without extras, an extra's the mean excess of the steps it ran with (or its own timings)."""

    def __init__(self, start: int, total: int, every: dict[str, int], now=time.perf_counter):
        self.start, self.total, self.every, self.now = start, max(1, total), dict(every), now
        self.t0 = self.mark = now()
        self.plain: list[float] = []
        self.mixed: list[tuple[float, tuple[str, ...]]] = []
        self.timed: dict[str, list[float]] = {}
        self.overall = 0.0
        self.done = 0

    def step(self, step: int, extras: tuple[str, ...] = ()) -> None:
        t = self.now()
        interval, self.mark = t - self.mark, t
        (self.mixed.append((interval, extras)) if extras else self.plain.append(interval))
        self.done = step - self.start

    def extra(self, name: str, seconds: float | None = None) -> None:
        """An extra that ran right after the last ``step`` (the time since it, unless given)."""
        t = self.now()
        self.timed.setdefault(name, []).append(t - self.mark if seconds is None else seconds)
        self.mark = t

    def step_cost(self) -> float:
        if self.plain:
            return statistics.median(self.plain[1:] or self.plain)  # the first step also warms up
        return min((i for i, _ in self.mixed), default=0.0)

    def extra_cost(self, name: str) -> float | None:
        if self.timed.get(name):
            return statistics.fmean(self.timed[name])
        base = self.step_cost()
        own = [i - base for i, ex in self.mixed if ex == (name,)]
        shared = [(i - base) / len(ex) for i, ex in self.mixed if name in ex]
        vals = own or shared
        return max(0.0, statistics.fmean(vals)) if vals else None

    def eta(self) -> float:
        step = self.start + self.done
        end = self.start + self.total
        left = (end - step) * self.step_cost()
        for name, every in self.every.items():
            cost = self.extra_cost(name)
            if cost is not None:
                left += due(step, end, every) * cost
        return left

    def its(self) -> float:
        c = self.step_cost()
        return 1.0 / c if c > 0 else 0.0

    def fraction(self) -> float:
        """Share of the run's time already spent (never decreases; 1 at the last step)."""
        elapsed = self.now() - self.t0
        left = self.eta()
        f = 1.0 if self.done >= self.total else elapsed / max(1e-9, elapsed + left)
        self.overall = min(1.0, max(self.overall, f))
        return self.overall


class TrainMonitor:
    """The node-side sink of a Train Steps run: ``on_step(result)`` after each step, ``on_preview(step,
    image)`` after each preview render (a PIL image or a grid tensor; clips become animated WebPs)."""

    def __init__(self, unique_id: str | None, start: int, steps: int, val_every: int, checkpoint_every: int,
                 preview_every: int):
        self.uid, self.steps = unique_id, steps
        self.every = {"validation": val_every, "checkpoint": checkpoint_every, "preview": preview_every}
        self.clock = RunClock(start, steps, self.every)
        self.bar = NodeProgress(steps, unique_id)
        self.animated: list[dict] = []  # animated previews written so far (output folder references)

    def on_step(self, r) -> None:
        extras = tuple(k for k in ("validation", "checkpoint") if self.every[k] and r.step % self.every[k] == 0)
        self.clock.step(r.step, extras)
        c = self.clock
        overall = c.fraction()
        self.bar(c.done)
        send_event("loss", {"node": self.uid, "step": r.step, "done": c.done, "total": self.steps, "loss": r.loss,
                            "lr": r.lr, "val_loss": r.val_loss, "eta": c.eta(), "its": c.its(), "overall": overall})

    def on_preview(self, step: int, image, fps: float = 16.0) -> None:
        """``image``: a PIL image, or a grid tensor (F, H, W, 3); one of several frames (a video model's clips)
        is saved as an animated WebP in the output folder and kept in ``animated`` for the node's UI."""
        self.clock.extra("preview")
        if isinstance(image, torch.Tensor) and image.shape[0] > 1:
            ref = animation.save_webp(image, f"node{self.uid or 'x'}_step{step:07d}", fps)
            self.animated.append(ref)
        else:
            ref = save_temp_preview(imaging.to_pil(image) if isinstance(image, torch.Tensor) else image, self.uid, step)
        send_event("preview", {"node": self.uid, "step": step, "image": ref})


def save_temp_preview(image, unique_id: str | None, step: int) -> dict:
    """Write a preview JPEG atomically into ComfyUI's temp folder; returns its /view reference."""
    import folder_paths

    folder = Path(folder_paths.get_temp_directory()) / PREVIEW_SUBFOLDER
    folder.mkdir(parents=True, exist_ok=True)
    name = f"node{unique_id or 'x'}_step{step:07d}.jpg"
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            image.convert("RGB").save(f, format="JPEG", quality=90)
        os.replace(tmp, folder / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"filename": name, "subfolder": PREVIEW_SUBFOLDER, "type": "temp"}
