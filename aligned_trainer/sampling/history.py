"""Loss history input for the Loss Graph: a training run's ``.history`` or a JSON list."""
from __future__ import annotations

import json
import math


def history_from(run=None, text: str = "") -> list[dict]:
    """The run's history, or the records of ``text`` (a JSON list of ``{"step", "loss", ...}``) sorted by step;
    a record whose step is not a finite number or whose loss is not a number is refused naming it (a NaN or
    infinite loss is kept: the plot leaves it out and lists its step)."""
    if run is not None:
        return [dict(h) for h in run.history]
    try:
        data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as e:
        raise ValueError(f"history_json: not valid JSON ({e}); give a list of {{\"step\", \"loss\"}} records") from e
    except RecursionError:
        raise ValueError("history_json: nested too deeply to read; give a flat list of {\"step\", \"loss\"} "
                         "records") from None
    if not isinstance(data, list) or not all(isinstance(h, dict) and "step" in h and "loss" in h for h in data):
        raise ValueError("loss history JSON must be a list of {\"step\": int, \"loss\": float, ...}")
    for i, h in enumerate(data):
        for key, finite in (("step", True), ("loss", False), ("val_loss", False)):
            v = h.get(key)
            if key == "val_loss" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (finite and not math.isfinite(v)):
                raise ValueError(f"history_json: record {i} has {key} {v!r}; {key} must be a "
                                 f"{'finite ' if finite else ''}number, e.g. {{\"step\": 10, \"loss\": 0.12}}")
    return sorted(data, key=lambda h: h["step"])
