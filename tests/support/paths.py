"""Where things live: the repo, its work folder, the ComfyUI in use and the pack link inside it."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / ".work"
CACHE = WORK / "cache"
# ALIGNED_TRAINER_MODEL_CACHE points the generated tiny models somewhere else (an empty folder reproduces a
# fresh clone: tests/test_main_command.py).
MODEL_CACHE = Path(os.environ["ALIGNED_TRAINER_MODEL_CACHE"]) if os.environ.get("ALIGNED_TRAINER_MODEL_CACHE") \
    else CACHE / "models"
PACK_NAME = "comfyui-aligned-trainer"


def comfyui_path() -> Path:
    """ComfyUI in use: $COMFYUI_PATH (scripts/setup.py exports it) or the bundled copy."""
    env = os.environ.get("COMFYUI_PATH")
    path = Path(env) if env else WORK / "ComfyUI"
    if not (path / "main.py").exists():
        raise RuntimeError(f"No ComfyUI at {path}: run `python3 scripts/setup.py` first.")
    return path.resolve()


def pack_link(comfy: Path | None = None) -> Path:
    """The entry of ComfyUI's custom_nodes that is this pack (a link made by setup, or a clone)."""
    custom = (comfy or comfyui_path()) / "custom_nodes"
    for entry in sorted(custom.iterdir()):
        try:
            if entry.resolve() == REPO:
                return entry
        except OSError:
            continue
    raise RuntimeError(f"This pack is not in {custom}: run `python3 scripts/setup.py`.")
