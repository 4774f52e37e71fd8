"""Loss history input for the Loss Graph: a training run's ``.history`` or a JSON list."""
from __future__ import annotations

import json


def history_from(run=None, text: str = "") -> list[dict]:
    if run is not None:
        return [dict(h) for h in run.history]
    try:
        data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as e:
        raise ValueError(f"history_json: not valid JSON ({e}); give a list of {{\"step\", \"loss\"}} records") from e
    if not isinstance(data, list) or not all(isinstance(h, dict) and "step" in h and "loss" in h for h in data):
        raise ValueError("loss history JSON must be a list of {\"step\": int, \"loss\": float, ...}")
    return sorted(data, key=lambda h: h["step"])
