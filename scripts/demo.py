#!/usr/bin/env python3
"""The main job, on a fresh machine: set everything up, start ComfyUI headless with this pack, generate a
tiny SD1.5 model and a tiny captioned dataset, run the shipped demo workflow (workflows/demo_train_tiny.json)
through ComfyUI's HTTP API, and print where the trained LoRA, the sample grid and the loss plot are.

    python3 scripts/demo.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main() -> int:
    sys.path.insert(0, str(HERE))
    import setup as project_setup

    if os.environ.get("ALIGNED_TRAINER_DEMO_CHILD") != "1":
        try:
            env = project_setup.setup()
        except project_setup.SetupError as e:
            print(f"[setup] ERROR: {e}", file=sys.stderr)
            return 2
        child_env = project_setup.bytecode_env(dict(os.environ, ALIGNED_TRAINER_DEMO_CHILD="1",
                                                    COMFYUI_PATH=env["COMFYUI_PATH"], PYTHONUNBUFFERED="1"))
        return subprocess.call([env["PYTHON"], str(Path(__file__).resolve())], env=child_env, cwd=ROOT)

    sys.path.insert(0, str(ROOT / "tests"))
    from support.demo import run_demo

    base = ROOT / ".work" / "demo" / time.strftime("%Y%m%d-%H%M%S")
    print(f"[demo] starting ComfyUI with the pack; working folder {base}", flush=True)
    res = run_demo(base, stream=sys.stdout)
    print(f"[demo] workflow finished in {res['seconds']:.0f}s")
    print(f"[demo] output folder: {res['folder']}")
    for p in res["lora"]:
        print(f"[demo]   trained LoRA: {p}")
    for p in res["images"]:
        print(f"[demo]   image:        {p}")
    print(f"[demo]   server log:   {res['log']}")
    ok = bool(res["lora"]) and any("sample_grid" in p.name for p in res["images"]) and \
        any("loss_plot" in p.name for p in res["images"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
