"""Shared benchmark plumbing: boot ComfyUI in-process like the tests (or import just ComfyUI's model code and
the engine, for the GPU mode), measure per-step times through ComfyUI's progress-bar hook, run one trainer in a
forked child to read its own peak memory, and write a results table."""
from __future__ import annotations

import datetime as _dt
import importlib
import os
import pickle
import platform
import re
import resource
import statistics
import sys
import time
import traceback
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


def set_threads(n: int) -> None:
    """Intra-op threads for torch. Call before any torch work: on a CPU shared with other jobs, more threads
    than free cores make OpenMP threads wait on each other (steps measured here went from ~25 ms to ~2.6 s
    with 2 threads on 2 busy cores), and forked children (``isolated``) must not inherit a thread pool."""
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set
        pass


def _status_mib(key: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024.0


def isolated(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` in a forked child of this (booted) process and return
    ``(result, memory)``: ``memory`` = {"base": RSS MiB when the child starts, "peak": the child's peak RSS MiB
    (Linux VmHWM, reset at the start), "delta": peak - base, i.e. what the trainer itself needed}. The child
    shares the parent's model pages until it writes them, so each trainer starts from the same state and its
    allocations are not hidden by memory an earlier trainer freed into the allocator."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        code = 0
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # reset the peak (VmHWM) to the current RSS
            base = _status_mib("VmRSS")
            out = ("ok", fn(*args, **kwargs))
            peak = _status_mib("VmHWM")
            out = out + ({"base": base, "peak": peak, "delta": peak - base},)
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = ("error", f"{type(e).__name__}: {e}", traceback.format_exc())
            code = 1
        with os.fdopen(w, "wb") as f:
            pickle.dump(out, f)
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    out = pickle.loads(data) if data else ("error", "child died without a result", "")
    if out[0] == "error":
        raise ChildError(out[1], out[2])
    return out[1], out[2]


class ChildError(RuntimeError):
    def __init__(self, message: str, tb: str):
        super().__init__(message)
        self.tb = tb


def measured(where: str, fn, *args, **kwargs):
    """``(result, memory MiB dict)`` of one trainer run: on CUDA in this process (peak allocated by torch,
    reset first); on CPU in a forked child (``isolated``)."""
    import torch

    if where == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        return out, {"base": base, "peak": peak, "delta": peak - base}
    return isolated(fn, *args, **kwargs)


def cuda_peak_mb() -> float | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def light_comfy(cpu: bool):
    """ComfyUI's model code and this pack's engine, without its server, node API or custom-node loader: what
    the GPU mode needs (a GPU machine may lack the server's dependencies). Returns ``engine(name)``, which
    imports ``aligned_trainer.<name>`` (the engine uses only relative imports and ``comfy``)."""
    from support.paths import comfyui_path

    root = comfyui_path()
    for p in (str(root), str(REPO)):
        if p not in sys.path:
            sys.path.insert(0, p)
    import utils.extra_config  # noqa: F401  (ComfyUI's `utils` package first, as main.py does)
    from comfy.cli_args import args

    args.cpu = cpu
    import comfy.model_management  # noqa: F401

    return lambda name: importlib.import_module(f"aligned_trainer.{name}" if name else "aligned_trainer")


def machine() -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {dev}, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def stamp() -> str:
    return _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
