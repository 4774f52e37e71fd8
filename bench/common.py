"""Shared benchmark plumbing: boot ComfyUI in-process like the tests, measure per-step times through
ComfyUI's progress-bar hook, read peak memory, and write a results table."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support.boot import boot  # noqa: E402


def boot_comfy(tmp: Path):
    for d in ("output", "temp", "models/checkpoints", "models/loras"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    c = boot(output_dir=tmp / "output", temp_dir=tmp / "temp")
    import folder_paths

    folder_paths.add_model_folder_path("checkpoints", str(tmp / "models/checkpoints"), is_default=True)
    folder_paths.add_model_folder_path("loras", str(tmp / "models/loras"), is_default=True)
    return c


class StepClock:
    """Collects a timestamp each time ComfyUI's progress bar advances (one training step)."""

    def __init__(self):
        self.stamps: list[float] = []

    def __enter__(self):
        import comfy.utils

        self._old = comfy.utils.PROGRESS_BAR_HOOK
        comfy.utils.set_progress_bar_global_hook(lambda *a, **k: self.stamps.append(time.perf_counter()))
        return self

    def __exit__(self, *exc):
        import comfy.utils

        comfy.utils.set_progress_bar_global_hook(self._old)

    def step_times(self, warmup: int) -> list[float]:
        d = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return d[warmup:]


def median_ms(times: list[float]) -> float:
    return 1000.0 * statistics.median(times) if times else float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux: KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cuda_peak_mb() -> float | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def machine() -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {dev}, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def stamp() -> str:
    return _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
