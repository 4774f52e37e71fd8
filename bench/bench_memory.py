#!/usr/bin/env python3
"""Memory modes (issue #19): peak memory and ms/step of our trainer per mode, as ratios against the bf16 run in
the same process, with Train Init's predicted peak (train/memory.py) next to the measured one, each run under a
memory cap that emulates a smaller card.

Modes: ``bf16`` (base in bf16, autocast bf16), ``fp8`` (base loaded as ComfyUI's UNETLoader loads
``fp8_e4m3fn``: fp8 weights, manual-cast compute in bf16), ``int8`` / ``int4`` (Train Init ``quantize``),
``int4+offload`` (int4 and ``offload_blocks``). All with gradient checkpointing, rank 16 LoRA on the
attention+mlp layers, AdamW. Random weights in the shapes of ComfyUI's own ``supported_models`` configs (no
download): SDXL, FLUX.1-dev and Qwen-Image (20B). The model starts where ComfyUI's loaders leave it, in CPU
memory, and the trainer loads it through ComfyUI's memory manager, so the load counts too.

    .work/venv/bin/python bench/bench_memory.py [--plan "flux1:bf16,fp8@24,int4+offload@16;sdxl:bf16@12"] [--write]
    .work/venv/bin/python bench/bench_memory.py --tiny --device cpu --steps 2 --warmup 1   # smoke test, no GPU

``--plan``: per family, the modes to run, each with an optional cap in GiB (``mode@cap``). A capped run has
``torch.cuda.set_per_process_memory_fraction(cap / total)`` from before the model is built to the end, and
reports ``fits`` or where it ran out of memory (load or steps). GPU: peaks = ``torch.cuda.max_memory_allocated``,
"steps" over the timed steps, "load" from the start through the warm-up steps (the load included). The cap limits
PyTorch's allocator (reserved memory, fragmentation included), not the CUDA context (~0.5 GiB on a real card).
CPU (smoke mode): peak = weights + the live bytes the steps allocate (``memory.LiveBytes``); caps are not enforced.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import traceback
from pathlib import Path

import common
from common import REPO, median_ms

MODES = ("bf16", "fp8", "int8", "int4", "int4+offload")


DEFAULT_PLAN = ("flux1:bf16,fp8@24,int8@24,int4@16,int4+offload@16;sdxl:bf16@12;"
                "qwen_image:bf16,fp8@24,int4@24")


def build_model(family: str, mode: str, device: str, tiny: bool):
    """ModelPatcher with random weights in CPU memory, where ComfyUI's loaders leave a model (bf16, or fp8 weights
    with bf16 manual cast for ``fp8``); values drawn on ``device`` one tensor at a time (fast), copied over."""
    import torch

    import bundles
    import comfy.model_patcher

    cfg, _ = bundles._config(family, tiny)
    wdtype = torch.float8_e4m3fn if mode == "fp8" else torch.bfloat16
    cfg.set_inference_dtype(wdtype, torch.bfloat16 if mode == "fp8" else None)
    model = cfg.get_model({}, "", device=torch.device("cpu"))
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.ndim >= 2:
                v = torch.empty(p.shape, device=device, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)
            elif name.endswith("bias"):
                v = torch.zeros(p.shape, device=device)
            else:
                v = torch.ones(p.shape, device=device)
            p.copy_(v.to(p.dtype))
            del v
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device(device),
                                            offload_device=torch.device("cpu"))


def parse_plan(text: str) -> list[tuple[str, list[tuple[str, float | None]]]]:
    """``"flux1:bf16,fp8@24;sdxl:bf16@12"`` -> [("flux1", [("bf16", None), ("fp8", 24.0)]), ("sdxl", ...)]."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        fam, _, modes = part.partition(":")
        runs = []
        for m in filter(None, modes.split(",")):
            mode, _, cap = m.partition("@")
            if mode not in MODES:
                raise SystemExit(f"unknown mode {mode!r} in --plan; use {', '.join(MODES)}")
            runs.append((mode, float(cap) if cap else None))
        out.append((fam.strip(), runs))
    return out


def run_mode(engine, family, mode, cap, args, device) -> dict:
    """One run: ms/step median, peaks (steps; load + warm-up), predicted peak, and the result under ``cap``."""
    import torch

    import bundles

    types = engine("data.types")
    C = engine("train.config")
    st = engine("train.state")
    loop = engine("train.loop")
    memory = engine("train.memory")
    cuda = device == "cuda"
    out = {"ms": None, "peak": None, "load_peak": None, "predicted": None, "probed": None, "result": ""}
    phase = "build"
    if cuda and cap:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total))
    model = run = meter = None
    try:
        model = build_model(family, mode, device, args.tiny)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        side = args.resolution // 8
        frames = (1,) if family == "qwen_image" else ()  # Qwen-Image's latents are one-frame video latents (Wan 2.1 VAE)
        latents = torch.randn(1, bundles.latent_channels(family), *frames, side, side,
                              generator=torch.Generator().manual_seed(0))
        cond = bundles.random_cond(family, args.tiny, args.tokens)
        ts = types.TrainingSet((types.Sample("0", latents[0], (types.CaptionVariant("bench", cond),)),))
        quant = {"int8": "int8", "int4": "int4", "int4+offload": "int4"}.get(mode, "none")
        offload = args.offload if mode.endswith("offload") else 0
        settings = st.RunSettings(run_name="bench", precision="bf16", gradient_checkpointing=True, quantize=quant,
                                  offload_blocks=offload, memory_budget_gb=4096.0)
        phase = "Train Init"
        run = loop.init_run(model, ts, C.LoraConfig(rank=args.rank, alpha=float(args.rank), preset="attention+mlp"),
                            C.TimestepConfig(), C.OptimizerConfig(lr=1e-4), settings, runs_root=Path(tempfile.mkdtemp()))
        plan_text = run.meta["memory_plan"]
        out["predicted"] = float(plan_text.split("peak ")[1].split(" GiB")[0]) * 2**30
        out["probed"] = "not probed" not in plan_text
        stamps = []
        meter = memory.LiveBytes() if not cuda else None

        def on_step(r, trainer):
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            if cuda and len(stamps) == args.warmup + 1:
                out["load_peak"] = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()

        phase = "load + steps"
        if cuda:
            loop.train_steps(run, args.steps + args.warmup + 1, on_step=on_step)
            out["peak"] = torch.cuda.max_memory_allocated()
        else:
            weights = sum(t.numel() * t.element_size() for t in model.model.diffusion_model.parameters())
            with meter:
                loop.train_steps(run, args.steps + args.warmup + 1, on_step=on_step)
            out["peak"] = out["load_peak"] = weights + meter.peak
        d = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup:]
        out["ms"] = median_ms(d)
        out["result"] = "fits" if cap else ""
    except torch.OutOfMemoryError as e:
        out["result"] = f"OOM in {phase}"
        print(f"   {family} {mode}: out of memory in {phase}: {str(e).splitlines()[0][:400]}", file=sys.stderr,
              flush=True)
    except Exception as e:  # noqa: BLE001 - one mode failing must not lose the other rows
        traceback.print_exc()
        out["result"] = f"error in {phase}: {type(e).__name__}"
    finally:
        import comfy.model_management as mm

        mm.unload_all_models()  # ComfyUI's memory manager lets go of this run's model before the next run's cap
        del model, run
        gc.collect()
        mm.cleanup_models()
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
    return out


def run_isolated(engine, family, mode, cap, args, device) -> dict:
    """``run_mode`` in a child process of its own: nothing one run leaves on the device (a model an out-of-memory
    error left referenced, the allocator's cache) counts against the next run's cap."""
    import json
    import subprocess

    cmd = [sys.executable, __file__, "--one", f"{family}:{mode}" + (f"@{cap:g}" if cap else ""), "--device", device,
           "--resolution", str(args.resolution), "--rank", str(args.rank), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--offload", str(args.offload)] + \
        (["--tiny"] if args.tiny else []) + (["--tokens", str(args.tokens)] if args.tokens else [])
    p = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(p.stderr[-4000:])
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"ms": None, "peak": None, "load_peak": None, "predicted": None, "probed": None,
            "result": f"error: child exited {p.returncode}"}


def report(engine, args) -> str:
    """The markdown table for ``args`` (plan or family x modes, ...); ``engine(name)`` imports an engine module."""
    gib = lambda b: "" if b is None else f"{b / 2**30:.3f}"  # noqa: E731
    cuda = args.device == "cuda"
    lines = [f"### Memory modes, {common.stamp()}, {common.machine()}", "",
             f"{'tiny' if args.tiny else 'full-size'}, {args.resolution} px, rank {args.rank}, batch 1, "
             f"gradient checkpointing, bf16 compute, {args.steps} timed steps after {args.warmup} warm-up; "
             f"offload_blocks {args.offload} in int4+offload", "",
             "| model | mode | ms/step | x bf16 | peak GiB (steps) | x bf16 | peak GiB (load + warm-up) | predicted GiB "
             "| predicted/measured | cap GiB | result |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for fam, runs in args.runs:
        base = None
        for mode, cap in runs:
            print(f"{fam} {mode}" + (f" under {cap:g} GiB" if cap and cuda else "") + " ...", flush=True)
            r = (run_isolated if args.isolate else run_mode)(engine, fam, mode, cap if cuda else None, args, args.device)
            if r["ms"] is not None and (mode == "bf16" or base is None):
                base = (r["ms"], r["peak"])
            ok = r["ms"] is not None
            pred = r["predicted"]
            probed = "" if r["probed"] is None else ("" if r["probed"] else " (not probed)")
            ms = f"{r['ms']:.0f}" if ok else ""
            x_ms = f"{r['ms'] / base[0]:.2f}" if ok and base else ""
            x_peak = f"{r['peak'] / base[1]:.2f}" if ok and base else ""
            ratio = f"{pred / r['peak']:.2f}" if ok and pred else ""
            cap_s = f"{cap:g}" if cap and cuda else ""
            lines.append(f"| {fam} | {mode} | {ms} | {x_ms} | {gib(r['peak'])} | {x_peak} | {gib(r['load_peak'])} | "
                         f"{gib(pred)}{probed} | {ratio} | {cap_s} | {r['result']} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def parse(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", default=None,
                    help=f"families, modes and caps, e.g. '{DEFAULT_PLAN}' (the default on a GPU)")
    ap.add_argument("--family", default=None, help="without --plan: comma list of sdxl, flux1, qwen_image")
    ap.add_argument("--modes", default=",".join(MODES), help="without --plan: the modes of each family (no cap)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny configs (smoke test)")
    ap.add_argument("--resolution", type=int, default=None, help="image side in px (default 1024; --tiny: 64)")
    ap.add_argument("--tokens", type=int, default=None, help="text tokens (default: SDXL 77, FLUX/Qwen-Image 512)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--offload", type=int, default=8, help="offload_blocks for int4+offload (--tiny: 1)")
    ap.add_argument("--write", action="store_true", help="append the table to BENCHMARKS.md")
    ap.add_argument("--isolate", default=None, choices=("on", "off"),
                    help="each run in a child process of its own (default: on for cuda)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child's single run: family:mode[@cap]
    args = ap.parse_args(argv)
    args.isolate = (args.isolate or ("on" if args.device == "cuda" else "off")) == "on" and not args.one
    if args.one:
        args.plan = args.one
    args.resolution = args.resolution or (64 if args.tiny else 1024)
    if args.tiny and args.offload == 8:
        args.offload = 1
    if args.plan is None:
        fams = args.family or ("flux1,sdxl" if args.tiny else None)
        args.plan = DEFAULT_PLAN if fams is None else ";".join(f"{f}:{args.modes}" for f in fams.split(","))
    args.runs = parse_plan(args.plan)
    return args


def main() -> int:
    args = parse()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_memory.py: no CUDA GPU here. Smoke-test on the CPU with: .work/venv/bin/python "
              "bench/bench_memory.py --tiny --device cpu --steps 2 --warmup 1", file=sys.stderr)
        return 2
    common.set_threads(1 if args.device == "cpu" else max(1, min(8, torch.get_num_threads())))
    engine = common.light_comfy(cpu=args.device == "cpu")
    if args.one:
        import json

        (fam, ((mode, cap),)), = args.runs
        print("RESULT " + json.dumps(run_mode(engine, fam, mode, cap, args, args.device)), flush=True)
        return 0
    table = report(engine, args)
    print(table)
    if args.write:
        with open(REPO / "BENCHMARKS.md", "a", encoding="utf-8") as f:
            f.write("\n" + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
