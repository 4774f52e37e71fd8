"""The benchmark scripts still run: each is started as the README says, on the tiny models, for a couple of
steps, and its results table is read back. Timings are not asserted (they are the benchmarks' business);
what is checked is that every trainer produced a figure and that the FLOP accounting separates the two
plain-PyTorch floors the way their arithmetic says it must."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from support.paths import REPO


def run_bench(*args: str) -> str:
    p = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{args[0]} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def table_rows(out: str, header_start: str) -> list[list[str]]:
    """Rows of the first markdown table whose header starts with ``header_start``."""
    lines = out.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


BENCH_SMOKE = pytest.mark.skipif(os.environ.get("AT_BENCH_SMOKE") != "1",
                                 reason="smoke run of a benchmark script (~25-65 s each); set AT_BENCH_SMOKE=1 to run "
                                        "(not in CI: the suite's 20-minute budget goes to the features' tests)")


@BENCH_SMOKE
def test_bench_gpu_tiny_smoke_counts_merge_step_above_activation_step():
    out = run_bench("bench/bench_gpu.py", "--tiny", "--device", "cpu", "--family", "sdxl", "--steps", "2",
                    "--warmup", "1", "--rounds", "2")
    for name in ("floor", "floor_act", "ours", "peer"):
        assert f"{name} ... (round 2/2)" in out
    rows = {r[3]: r for r in table_rows(out, "| model |")}
    assert set(rows) == {"merge floor", "activation floor", "ours", "diffusers+peft"}
    for r in rows.values():
        assert math.isfinite(float(r[4])) and float(r[4]) > 0  # ms/step
    merge_exec, act_exec = float(rows["merge floor"][10]), float(rows["activation floor"][10])
    # the merge floor also computes each full weight gradient; the activation floor does not
    assert merge_exec > 1.2 * act_exec
    # without checkpointing the model FLOPs of a step are what the activation floor executes
    assert float(rows["ours"][7]) == float(rows["activation floor"][10])
    floors, peer = rows["ours"][5].split("; ")
    merge_ratio, act_ratio = (float(x) for x in floors.split(" / "))
    assert merge_ratio > 0 and act_ratio > 0
    # the diffusers+peft peer (bench/peer.py) trained the same architecture in the same run
    assert peer.startswith("peer/ours ") and float(peer.split()[1].rstrip("x")) > 0


@BENCH_SMOKE
def test_bench_train_tiny_flux_smoke_reports_every_trainer():
    out = run_bench("bench/bench_train.py", "--family", "flux1", "--steps", "2", "--warmup", "1", "--batches", "1",
                    "--dataset-sizes", "8", "--rounds", "1")
    rows = table_rows(out, "| batch | grad ckpt | merge floor ms")
    assert [(r[0], r[1]) for r in rows] == [("1", "off"), ("1", "on")]
    for r in rows:
        for cell in (r[2], r[3], r[5]):  # merge floor, activation floor, ours: always a figure
            assert float(cell.split(" ")[0]) > 0
    # TrainLoraNode trains with checkpointing (without it ComfyUI 0.3.75's FLUX blocks break its backward)
    assert float(rows[1][4].split(" ")[0]) > 0
    mem = table_rows(out, "| batch | grad ckpt | merge floor MiB")
    assert all(float(r[5]) >= 0 for r in mem)
    sizes = table_rows(out, "| dataset size |")
    assert sizes[0][0] == "8" and float(sizes[0][1].split(" ")[0]) > 0
