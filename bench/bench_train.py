#!/usr/bin/env python3
"""Per-step training time and peak memory: our Train Steps vs ComfyUI's built-in TrainLoraNode vs the
plain-PyTorch floor, on the same generated tiny SD1.5 model, same rank, same layers, batch and dtype.
Results are printed as a Markdown table and ratios (and appended to BENCHMARKS.md with --write).

    .work/venv/bin/python bench/bench_train.py [--steps 20] [--warmup 3] [--write]
"""
from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path

import common  # bench/common.py (sys.path has bench/ as the script's folder)

from common import REPO, StepClock, median_ms


def build(c, tmp: Path, n_images: int):
    import torch
    from support.factories import sd15

    link = tmp / "models/checkpoints/tiny-sd15.safetensors"
    if not link.exists():
        link.symlink_to(sd15.checkpoint())
    model, clip, vae = c.nodes.CheckpointLoaderSimple().load_checkpoint(link.name)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(n_images, 4, 8, 8, generator=g)  # 64x64 px images
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("ohwx, a red circle, blue background"))
    return model, clip, vae, latents, cond


def time_builtin(c, model, latents, cond, rank, steps, warmup, batch, gc_on):
    """ComfyUI's TrainLoraNode, timed per step through its progress bar."""
    lat_list = [{"samples": latents[i:i + 1]} for i in range(latents.shape[0])]
    with StepClock() as clock:
        c.call("TrainLoraNode", model=[model], latents=lat_list, positive=[cond], batch_size=[batch],
               grad_accumulation_steps=[1], steps=[steps + warmup + 1], learning_rate=[1e-4], rank=[rank],
               optimizer=["AdamW"], loss_function=["MSE"], seed=[0], training_dtype=["fp32"],
               lora_dtype=["fp32"], algorithm=["LoRA"], gradient_checkpointing=[gc_on],
               existing_lora=["[None]"])
    return clock.step_times(warmup)


def time_ours(c, model, latents, cond, rank, steps, warmup, batch, gc_on):
    """Our Train Steps node (TrainInit + TrainSteps), timed per step through its progress bar."""
    from bench_ours import run_ours

    return run_ours(c, model, latents, cond, rank, steps, warmup, batch, gc_on)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--dataset-sizes", default="8,512")
    ap.add_argument("--write", action="store_true", help="append the table to BENCHMARKS.md")
    args = ap.parse_args()
    import torch
    from floor import time_floor

    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="at-bench-"))
    c = common.boot_comfy(tmp)
    model, clip, vae, latents, cond = build(c, tmp, n_images=8)
    context = cond[0][0]
    rows = []
    for gc_on in (False, True):
        for batch in [int(b) for b in args.batches.split(",")]:
            if gc_on and batch != 1:
                continue
            res = {}
            res["floor"] = median_ms(time_floor(model, latents, context, args.rank, args.steps, args.warmup, batch,
                                                gradient_checkpointing=gc_on))
            res["builtin"] = median_ms(time_builtin(c, model, latents, cond, args.rank, args.steps, args.warmup,
                                                    batch, gc_on))
            try:
                res["ours"] = median_ms(time_ours(c, model, latents, cond, args.rank, args.steps, args.warmup,
                                                  batch, gc_on))
            except ImportError as e:
                res["ours"] = float("nan")
                print(f"ours: not measured ({e})")
            gc.collect()
            rows.append((batch, gc_on, res))
            print(f"batch {batch} gc {gc_on}: {res}", flush=True)
    lines = [f"### Per-step time, tiny SD1.5 (64 px, rank {args.rank}, fp32) — {common.stamp()}",
             f"Machine: {common.machine()}  ",
             f"Command: `.work/venv/bin/python bench/bench_train.py --steps {args.steps} --warmup {args.warmup}`",
             "", "| batch | grad ckpt | floor ms | TrainLoraNode ms | ours ms | ours/floor | TrainLoraNode/ours |",
             "|---|---|---|---|---|---|---|"]
    for batch, gc_on, r in rows:
        lines.append(f"| {batch} | {'on' if gc_on else 'off'} | {r['floor']:.1f} | {r['builtin']:.1f} | "
                     f"{r['ours']:.1f} | {r['ours'] / r['floor']:.2f} | {r['builtin'] / r['ours']:.2f} |")
    from bench_ours import run_ours

    lines += ["", "| dataset size | ours ms/step (batch 1) |", "|---|---|"]
    for n in [int(x) for x in args.dataset_sizes.split(",")]:
        ms = median_ms(run_ours(c, model, latents, cond, args.rank, args.steps, args.warmup, 1, False, dataset_size=n))
        lines.append(f"| {n} | {ms:.1f} |")
    lines.append(f"\nPeak RSS of the benchmark process (all runs, one process): {common.peak_rss_mb():.0f} MiB")
    table = "\n".join(lines)
    print(table)
    if args.write:
        with open(REPO / "BENCHMARKS.md", "a", encoding="utf-8") as f:
            f.write("\n" + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
