"""bench/bench_memory.py still runs: its tiny CPU smoke mode (FLUX.1, bf16 and int4+offload, one step), in this
process with the pack's engine as ComfyUI loaded it, gives a row per mode with ratios against bf16 (1.00 for
bf16 itself) and a finite predicted/measured peak. Timings are not asserted."""
from __future__ import annotations

import math
import sys

from support.paths import REPO
from test_bench import BENCH_SMOKE, table_rows


@BENCH_SMOKE
def test_bench_memory_tiny_smoke(comfy):
    sys.path.insert(0, str(REPO / "bench"))
    import bench_memory

    args = bench_memory.parse(["--tiny", "--device", "cpu", "--family", "flux1", "--modes", "bf16,int4+offload",
                               "--steps", "1", "--warmup", "0", "--resolution", "32"])
    out = bench_memory.report(comfy.engine, args)
    rows = {r[1]: r for r in table_rows(out, "| model |")}
    assert set(rows) == {"bf16", "int4+offload"}
    assert float(rows["bf16"][3]) == 1.0 and float(rows["bf16"][5]) == 1.0
    for r in rows.values():  # ms/step, peak (steps), peak (load), predicted, predicted/measured
        assert all(math.isfinite(float(v.split()[0])) and float(v.split()[0]) > 0 for v in (r[2], r[4], r[6], r[7], r[8]))
        assert r[10] == ""  # no cap on the CPU, and no error
