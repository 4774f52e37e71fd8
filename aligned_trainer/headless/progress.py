"""The terminal side of a headless run: which node runs, a progress bar with loss and ETA from the pack's
``aligned_trainer.loss`` events (ComfyUI's own ``progress`` events for other nodes), one line per bar on a
pipe or file (throttled) and a bar redrawn in place on a terminal."""
from __future__ import annotations

import sys
import time


def clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def bar(done: int, total: int, width: int = 24) -> str:
    total = max(1, total)
    filled = min(width, int(width * done / total))
    return "[" + "#" * filled + "." * (width - filled) + "]"


class Terminal:
    """Renders run events; ``labels`` maps node id -> a printable name."""

    def __init__(self, labels: dict[str, str], stream=None, interval: float = 2.0, now=time.monotonic):
        self.labels, self.out = labels, stream or sys.stdout
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self.interval, self.now = interval, now
        self.last_print: dict[str, float] = {}
        self.loss_nodes: set[str] = set()
        self.started: dict[str, float] = {}
        self.open_line = False
        self.t0 = now()  # created when the prompt is queued

    def _emit(self, key: str, text: str, final: bool) -> None:
        if self.tty:
            self.out.write("\r\x1b[2K" + text + ("\n" if final else ""))
            self.open_line = not final
        else:
            t = self.now()
            if not final and t - self.last_print.get(key, -1e9) < self.interval:
                return
            self.last_print[key] = t
            self.out.write(text + "\n")
        self.out.flush()

    def line(self, text: str) -> None:
        if self.open_line:
            self.out.write("\n")
            self.open_line = False
        self.out.write(text + "\n")
        self.out.flush()

    def executing(self, node: str) -> None:
        self.started[node] = t = self.now()
        self.line(f"[run] {t - self.t0:7.1f}s  node {self.labels.get(node, node)}")

    def progress(self, node: str, value: int, total: int) -> None:
        if node in self.loss_nodes:  # its loss events say more
            return
        t = self.now() - self.started.get(node, self.now())
        eta = t / value * (total - value) if value else None
        self._emit(node, f"      {bar(value, total)} {value}/{total}  ETA {clock(eta)}", value >= total)

    def loss(self, d: dict) -> None:
        node = str(d.get("node"))
        self.loss_nodes.add(node)
        done, total = int(d.get("done", 0)), int(d.get("total", 1))
        parts = [f"      {bar(done, total)} {done}/{total}", f"step {d.get('step')}", f"loss {d['loss']:.5f}"]
        if d.get("val_loss") is not None:
            parts.append(f"val {d['val_loss']:.5f}")
        if d.get("its"):
            parts.append(f"{d['its']:.2f} it/s")
        parts.append(f"ETA {clock(d.get('eta'))}")
        self._emit(node, "  ".join(parts), done >= total)
