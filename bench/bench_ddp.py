#!/usr/bin/env python3
"""Data-parallel training, one device: the same run as 1 process with grad_accum x 2 and as 2 processes
(Train Init ``processes`` = 2, torchrun workers) sharing the device, through a real ComfyUI server on the tiny
SD1.5 (the samples per step are the same: batch_size x grad_accum x processes). Prints a Markdown table: the
Train Steps wall time (the 2-process run includes starting the workers, which import ComfyUI and load the model),
the steady step time as the UI's ETA sees it (``its`` of the last ``aligned_trainer.loss`` event), and the
ratio. On CPU the workers use gloo (a smoke run); on a GPU both workers share it (gloo too: nccl needs one GPU
per rank), so the ratio says what sharing one GPU between two processes costs or gains.

    .work/venv/bin/python bench/bench_ddp.py [--device cpu|cuda] [--steps 6] [--batch 1] [--threads 1]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support.factories import sd15  # noqa: E402
from support.factories.dataset import make_dataset  # noqa: E402
from support.server import ComfyServer  # noqa: E402
from support.train_prompt import prompt  # noqa: E402


async def _run(srv: ComfyServer, body: dict) -> tuple[float, dict | None]:
    """Queue ``body``; (seconds until it finished, the last loss event)."""
    import aiohttp

    last = None
    async with aiohttp.ClientSession() as s, s.ws_connect(f"ws://127.0.0.1:{srv.port}/ws?clientId={srv.client_id}",
                                                          max_msg_size=0) as ws:
        t0 = time.perf_counter()
        pid = srv.queue(body)
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            d = json.loads(msg.data)
            data = d.get("data") or {}
            if d["type"] == "aligned_trainer.loss":
                last = data
            if data.get("prompt_id") == pid and (d["type"] == "execution_error" or
                                                 (d["type"] == "executing" and data.get("node") is None)):
                break
        seconds = time.perf_counter() - t0
    entry = srv.wait(pid)
    if entry["status"]["status_str"] != "success":
        raise RuntimeError(f"the run failed: {json.dumps(entry['status'])[:3000]}")
    return seconds, last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads per process (OMP_NUM_THREADS for the server and, inherited, the workers; "
                         "torchrun's own default is 1): the same for both runs, or the comparison measures threads")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        base = Path(tmp)
        ckpts = base / "models" / "checkpoints"
        ckpts.mkdir(parents=True)
        (ckpts / "tiny-sd15.safetensors").symlink_to(sd15.checkpoint())
        srv = ComfyServer(base, model_folders={"checkpoints": ckpts}, cpu=a.device == "cpu",
                          env={"OMP_NUM_THREADS": str(a.threads)}).start()
        try:
            make_dataset(srv.input_dir / "ddp_ds", n=4, sizes=((64, 64),))
            srv.run(prompt("warm", 1, 1, 1, batch_size=a.batch))  # model load and caches, outside the timings
            rows = []
            for name, processes, accum in (("1 process, grad_accum 2", 1, 2), ("2 processes, grad_accum 1", 2, 1)):
                print(f"{name} ...", flush=True)
                seconds, last = asyncio.run(_run(srv, prompt(name.replace(" ", "_").replace(",", ""), a.steps,
                                                             processes, accum, batch_size=a.batch)))
                step_s = 1.0 / last["its"] if last and last.get("its") else float("nan")
                rows.append((name, seconds, step_s))
        finally:
            srv.stop()
    samples = a.batch * 2
    print(f"\nbench_ddp: tiny SD1.5, {a.steps} steps, {samples} samples per step, device {a.device}, "
          f"{a.threads} CPU thread(s) per process\n")
    print("| run | Train Steps wall s | steady s/step | step time vs 1 process |")
    print("|---|---|---|---|")
    for name, seconds, step_s in rows:
        print(f"| {name} | {seconds:.1f} | {step_s:.3f} | {step_s / rows[0][2]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
