#!/usr/bin/env python3
"""Per-step training time and peak memory of each trainer: our Train Steps vs ComfyUI's built-in
TrainLoraNode vs the two plain-PyTorch floors (bench/floor.py: the LoRA merged into the weights, and the LoRA
on the activations), on the same generated tiny model, same rank, same layers, batch and dtype. Results are printed as Markdown tables with ratios (appended to BENCHMARKS.md with
--write).

    .work/venv/bin/python bench/bench_train.py [--family sd15|flux1] [--steps 20] [--warmup 3] [--write]

Each trainer run is a forked child of the booted process (``common.isolated``): its peak RSS over its start is
what that trainer needed (model pages are shared with the parent until written). ``--threads`` (default 1)
sets torch's CPU threads: on a machine shared with other jobs more threads than free cores distort the times.
"""
from __future__ import annotations

import argparse
import re
import statistics
import tempfile
from pathlib import Path

import common  # bench/common.py (sys.path has bench/ as the script's folder)

from common import REPO, StepClock, median_ms

TRAINERS = ("floor", "floor_act", "builtin", "ours")
NAMES = {"floor": "merge floor", "floor_act": "activation floor", "builtin": "TrainLoraNode", "ours": "ours"}


def time_floor(c, b, rank, steps, warmup, batch, gc_on, formulation="merge"):
    from floor import time_floor as tf

    return tf(b.model, b.latents, b.cond, rank, steps, warmup, batch, gradient_checkpointing=gc_on,
              formulation=formulation)


def time_floor_act(c, b, rank, steps, warmup, batch, gc_on):
    return time_floor(c, b, rank, steps, warmup, batch, gc_on, formulation="activation")


def time_builtin(c, b, rank, steps, warmup, batch, gc_on):
    """ComfyUI's TrainLoraNode, timed per step through its progress bar."""
    lat_list = [{"samples": b.latents[i:i + 1]} for i in range(b.latents.shape[0])]
    with StepClock() as clock:
        c.call("TrainLoraNode", model=[b.model], latents=lat_list, positive=[b.cond], batch_size=[batch],
               grad_accumulation_steps=[1], steps=[steps + warmup + 1], learning_rate=[1e-4], rank=[rank],
               optimizer=["AdamW"], loss_function=["MSE"], seed=[0], training_dtype=["fp32"],
               lora_dtype=["fp32"], algorithm=["LoRA"], gradient_checkpointing=[gc_on],
               existing_lora=["[None]"])
    return clock.step_times(warmup)


def time_ours(c, b, rank, steps, warmup, batch, gc_on, dataset_size=None):
    """Our engine's train_steps (what Train Init + Train Steps run), timed per step."""
    from bench_ours import run_ours

    return run_ours(c.engine, b.model, b.latents, b.cond, rank, steps, warmup, batch, gc_on, dataset_size=dataset_size)


TIMERS = {"floor": time_floor, "floor_act": time_floor_act, "builtin": time_builtin, "ours": time_ours}


def measure(isolate: bool, rounds: int, fn, *args, **kwargs) -> list:
    """One trainer run per round: [(step times, memory dict)], or {"error"} when the trainer fails."""
    out = []
    for _ in range(rounds):
        try:
            if isolate:
                out.append(common.isolated(fn, *args, **kwargs))
            else:
                out.append((fn(*args, **kwargs), {"delta": float("nan"), "peak": common.peak_rss_mb()}))
        except Exception as e:  # noqa: BLE001 - a trainer that cannot train this model is a result
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"  failed: {msg}\n{getattr(e, 'tb', '')}", flush=True)
            return {"error": msg}
    return out


def summary(runs) -> dict:
    """{"ms": median step ms over all rounds, "iqr", "mib": largest peak over start, "peak", "n"}."""
    if isinstance(runs, dict):
        return runs
    times = [t for ts, _ in runs for t in ts]
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [float("nan")] * 3
    return {"ms": median_ms(times), "iqr": 1000 * (q[2] - q[0]), "mib": max(m["delta"] for _, m in runs),
            "peak": max(m["peak"] for _, m in runs), "n": len(times),
            "round_ms": [round(median_ms(ts), 1) for ts, _ in runs]}


def _cell(r: dict, key: str, fmt: str) -> str:
    return "fails" if "error" in r else format(r[key], fmt)


def _ratio(a: dict, b: dict, key: str) -> str:
    if "error" in a or "error" in b or not b[key]:
        return "–"
    return f"{a[key] / b[key]:.2f}"


def profile_both(c, b, rank: int) -> None:
    """torch.profiler over 2 settled steps of each floor and of ours, same model and batch 1."""
    import torch

    from bench_gpu import profile
    from bench_ours import run_ours
    from floor import make_floor

    for formulation in ("merge", "activation"):
        with torch.inference_mode(False), torch.enable_grad():
            _, step, setup = make_floor(b.model, b.latents, b.cond, rank, 1, formulation=formulation)
            with setup(False):
                for _ in range(3):
                    step()
                profile(f"floor ({formulation})", lambda: [step() for _ in range(2)], "cpu", rows=25)

    def on_trainer(trainer):
        trainer.step()
        profile("ours", lambda: [trainer.step() for _ in range(2)], "cpu", rows=25)

    run_ours(c.engine, b.model, b.latents, b.cond, rank, 1, 0, 1, False, on_trainer=on_trainer)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="sd15", choices=("sd15", "flux1"))
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run (median reported)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--dataset-sizes", default="8,512")
    ap.add_argument("--rounds", type=int, default=2,
                    help="runs of each trainer, interleaved with the others (their steps pooled): load drift on a "
                         "shared machine then hits all trainers alike")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--profile", action="store_true",
                    help="only profile 2 steps of each floor and of ours (batch 1, no checkpointing): top ops by CPU "
                         "time, and where ours' extra time goes")
    ap.add_argument("--no-isolate", action="store_true", help="run all trainers in this process (no per-trainer memory)")
    ap.add_argument("--write", action="store_true", help="append the tables to BENCHMARKS.md")
    args = ap.parse_args()
    common.set_threads(args.threads)
    import torch

    import bundles

    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="at-bench-"))
    c = common.boot_comfy(tmp)
    b = bundles.tiny(c, tmp, args.family, n_images=8)
    iso = not args.no_isolate
    if args.profile:
        profile_both(c, b, args.rank)
        return 0
    rows = []
    configs = [(int(x), False) for x in args.batches.split(",")] + [(1, True)]
    null = common.isolated(lambda: None)[1]["delta"] if iso else float("nan")  # a child that trains nothing
    for batch, gc_on in configs:
        res = {t: [] for t in TRAINERS}
        for k in range(args.rounds):
            for t in TRAINERS:
                if isinstance(res[t], dict):
                    continue  # failed in an earlier round
                print(f"{args.family} batch {batch} grad ckpt {gc_on}: {NAMES[t]} (round {k + 1})", flush=True)
                r = measure(iso, 1, TIMERS[t], c, b, args.rank, args.steps, args.warmup, batch, gc_on)
                res[t] = r if isinstance(r, dict) else res[t] + r
        res = {t: summary(v) for t, v in res.items()}
        print(f"  {res}", flush=True)
        rows.append((batch, gc_on, res))
    sizes = {int(x): [] for x in args.dataset_sizes.split(",")}
    for k in range(args.rounds):
        for n in sizes:
            print(f"{args.family} dataset size {n}: ours (round {k + 1})", flush=True)
            r = measure(iso, 1, time_ours, c, b, args.rank, args.steps, args.warmup, 1, False, dataset_size=n)
            sizes[n] = r if isinstance(r, dict) or isinstance(sizes[n], dict) else sizes[n] + r
    sizes = [(n, summary(v)) for n, v in sizes.items()]
    print(f"  {sizes}", flush=True)

    cmd = (f".work/venv/bin/python bench/bench_train.py --family {args.family} --steps {args.steps} "
           f"--warmup {args.warmup} --rounds {args.rounds} --threads {args.threads}")
    lines = [f"### Per-step time and memory, {b.label}, 64 px, rank {args.rank}, fp32 — {common.stamp()}",
             f"Machine: {common.machine()}, {args.threads} torch thread(s)  ", f"Command: `{cmd}`", "",
             f"Time: ms per optimizer step, median of {args.rounds} x {args.steps} timed steps (each run after "
             f"{args.warmup} warm-up steps; the trainers' runs interleaved), interquartile range in brackets.", "",
             "| batch | grad ckpt | merge floor ms | activation floor ms | TrainLoraNode ms | ours ms | "
             "ours/merge floor | ours/activation floor | TrainLoraNode/ours |",
             "|---|---|---|---|---|---|---|---|---|"]
    errors = {}
    for batch, gc_on, r in rows:
        cells = []
        for t in TRAINERS:
            if "error" in r[t]:
                key = re.sub(r"\[[\d, ]+\]", "[...]", r[t]["error"])  # one note per error, whatever the shapes
                errors.setdefault(key, len(errors) + 1)
                cells.append(f"fails ({errors[key]})")
            else:
                cells.append(f"{r[t]['ms']:.1f} ({r[t]['iqr']:.1f})")
        lines.append(f"| {batch} | {'on' if gc_on else 'off'} | {' | '.join(cells)} | "
                     f"{_ratio(r['ours'], r['floor'], 'ms')} | {_ratio(r['ours'], r['floor_act'], 'ms')} | "
                     f"{_ratio(r['builtin'], r['ours'], 'ms')} |")
    if iso:
        lines += ["", "Memory: peak RSS of each trainer's own process over its start (MiB the trainer added: "
                      "adapters, optimizer state, activations, copies), same runs.", "",
                  "| batch | grad ckpt | merge floor MiB | activation floor MiB | TrainLoraNode MiB | ours MiB | "
                  "ours/merge floor | ours/activation floor | TrainLoraNode/ours |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for batch, gc_on, r in rows:
            cells = [_cell(r[t], "mib", ".0f") for t in TRAINERS]
            lines.append(f"| {batch} | {'on' if gc_on else 'off'} | {' | '.join(cells)} | "
                         f"{_ratio(r['ours'], r['floor'], 'mib')} | {_ratio(r['ours'], r['floor_act'], 'mib')} | "
                         f"{_ratio(r['builtin'], r['ours'], 'mib')} |")
        base = rows[0][2]["ours"].get("peak", float("nan")) - rows[0][2]["ours"].get("mib", float("nan"))
        lines.append(f"\nEach trainer's process starts at {base:.0f} MiB RSS (booted ComfyUI + the model); a process "
                     f"that trains nothing adds {null:.0f} MiB. Largest of the rounds.")
    lines += ["", "| dataset size | ours ms/step (batch 1) | ours MiB |", "|---|---|---|"]
    for n, r in sizes:
        ms = "fails" if "error" in r else f"{r['ms']:.1f} ({r['iqr']:.1f})"
        lines.append(f"| {n} | {ms} | {_cell(r, 'mib', '.0f')} |")
    for msg, i in errors.items():
        lines.append(f"\n({i}) {msg[:300]}")
    table = "\n".join(lines)
    print(table)
    if args.write:
        with open(REPO / "BENCHMARKS.md", "a", encoding="utf-8") as f:
            f.write("\n" + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
