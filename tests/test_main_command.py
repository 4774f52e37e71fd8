"""The README's main command as a new user runs it: ``python3 scripts/demo.py`` in a subprocess, with an
empty model cache (as on a fresh clone, where no tiny model has been generated yet)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from safetensors import safe_open

from support.paths import REPO

pytestmark = [pytest.mark.slow, pytest.mark.server]


def test_demo_runs_on_an_empty_model_cache(tmp_path):
    cache = tmp_path / "empty-model-cache"
    cache.mkdir()
    python = shutil.which("python3") or sys.executable
    env = dict(os.environ, ALIGNED_TRAINER_MODEL_CACHE=str(cache), PYTHONUNBUFFERED="1")
    env.pop("ALIGNED_TRAINER_DEMO_CHILD", None)
    proc = subprocess.run([python, "scripts/demo.py"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # the tiny checkpoint was generated into the empty cache, not taken from an earlier run
    assert [p.name for p in cache.iterdir() if p.name.startswith("tiny-sd15")], out[-2000:]
    folder = re.search(r"\[demo\] output folder: (.+)", out)
    assert folder, out[-2000:]
    loras = re.findall(r"trained LoRA: (.+\.safetensors)", out)
    assert loras, out[-2000:]
    with safe_open(loras[0], "pt") as f:
        keys = list(f.keys())
        assert any(k.endswith("lora_up.weight") for k in keys)
        assert any(k.endswith("lora_down.weight") for k in keys)
    images = re.findall(r"image: +(.+\.png)", out)
    assert any("sample_grid" in i for i in images) and any("loss_plot" in i for i in images), out[-2000:]
    assert any("ab_compare" in i for i in images), out[-2000:]  # the whole demo ran (test_workflows runs it shortened)
    for i in images:
        assert os.path.getsize(i) > 1000
    base = os.path.dirname(os.path.dirname(folder.group(1).strip()))  # .work/demo/<stamp>
    if os.path.basename(os.path.dirname(base)) == "demo":
        shutil.rmtree(base, ignore_errors=True)
