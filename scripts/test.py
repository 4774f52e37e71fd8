#!/usr/bin/env python3
"""Run the test suite on a fresh machine: sets everything up (scripts/setup.py), then runs pytest in
the project's virtual environment against the real ComfyUI. Extra arguments go to pytest.

    python3 scripts/test.py            # whole suite
    python3 scripts/test.py -k spec    # a subset

The suite runs serially by default. ``-n 2`` runs it in two pytest-xdist workers (one torch thread each): each
test file stays in one worker, and the files that share the family server run in the same one (tests/conftest.py:
``pytest_xdist_make_scheduler``). On this 2-core, 24 GB machine two workers gained little (the CPUs are already
busy ~65 % of the time) and can run out of memory when two memory-heavy modules overlap, so it is not the default.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import setup as project_setup  # noqa: E402


def main() -> int:
    t0 = time.time()
    try:
        env = project_setup.setup(browser=True)
    except project_setup.SetupError as e:
        print(f"[setup] ERROR: {e}", file=sys.stderr)
        return 2
    run_env = project_setup.reproducible_env(project_setup.bytecode_env(
        dict(os.environ, COMFYUI_PATH=env["COMFYUI_PATH"], PYTHONUNBUFFERED="1")))
    args = sys.argv[1:]
    workers = args[args.index("-n") + 1] if "-n" in args[:-1] else "0"
    if workers != "0":
        run_env.setdefault("OMP_NUM_THREADS", "1")  # xdist workers on two cores: no oversubscribed torch threads
    cmd = [env["PYTHON"], "-m", "pytest", *args]
    print(f"[test] {' '.join(cmd)}", flush=True)
    rc = subprocess.call(cmd, cwd=project_setup.ROOT, env=run_env)
    print(f"[test] finished in {time.time() - t0:.0f}s with exit code {rc}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
