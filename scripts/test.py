#!/usr/bin/env python3
"""Run the test suite on a fresh machine: sets everything up (scripts/setup.py), then runs pytest in
the project's virtual environment against the real ComfyUI. Extra arguments go to pytest.

    python3 scripts/test.py            # whole suite
    python3 scripts/test.py -k spec    # a subset

Tests run in two pytest-xdist workers (``-n 2``; one torch thread each), which keeps the suite inside its time
budget on a 2-core machine: much of a test's time is spent waiting on a server, a browser or a subprocess. Each
test file runs in one worker, and the files that share the family server run in the same one
(tests/conftest.py: ``pytest_xdist_make_scheduler``). Pass ``-n 0`` (or any ``-n``) to choose yourself; ``-n 0``
runs serially.
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
    run_env = dict(os.environ, COMFYUI_PATH=env["COMFYUI_PATH"], PYTHONUNBUFFERED="1")
    args = sys.argv[1:]
    if not any(a == "-n" or a.startswith(("-n", "--numprocesses")) for a in args):
        args = ["-n", "2", *args]
        run_env.setdefault("OMP_NUM_THREADS", "1")  # two workers on two cores: no oversubscribed torch threads
    cmd = [env["PYTHON"], "-m", "pytest", *args]
    print(f"[test] {' '.join(cmd)}", flush=True)
    rc = subprocess.call(cmd, cwd=project_setup.ROOT, env=run_env)
    print(f"[test] finished in {time.time() - t0:.0f}s with exit code {rc}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
