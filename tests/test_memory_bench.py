"""bench/bench_memory.py still runs: the tiny smoke mode on the CPU (FLUX.1, two modes, one step) prints a row per
mode with finite ratios against bf16 and a predicted/measured peak."""
from __future__ import annotations

import math

from test_bench import run_bench, table_rows


def test_bench_memory_tiny_smoke():
    out = run_bench("bench/bench_memory.py", "--tiny", "--device", "cpu", "--family", "flux1", "--modes",
                    "bf16,int4+offload", "--steps", "1", "--warmup", "0")
    rows = {r[1]: r for r in table_rows(out, "| model |")}
    assert set(rows) == {"bf16", "int4+offload"}
    assert float(rows["bf16"][3]) == 1.0 and float(rows["bf16"][5]) == 1.0
    for r in rows.values():
        assert all(math.isfinite(float(v)) and float(v) > 0 for v in (r[2], r[4], r[6], r[7]))
