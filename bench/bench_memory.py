#!/usr/bin/env python3
"""Memory modes (issue #19): peak memory and ms/step of our trainer per mode, as ratios against the bf16 run in
the same process, with Train Init's predicted peak (train/memory.py) next to the measured one.

Modes: ``bf16`` (base in bf16, autocast bf16), ``fp8`` (base loaded as ComfyUI's UNETLoader loads
``fp8_e4m3fn``: fp8 weights, manual-cast compute in bf16), ``int8`` / ``int4`` (Train Init ``quantize``),
``int4+offload`` (int4 and ``offload_blocks``). All with gradient checkpointing, rank 16 LoRA on the
attention+mlp layers, AdamW. Random weights built by ComfyUI's own ``supported_models`` configs (no download).

    .work/venv/bin/python bench/bench_memory.py --family flux1,sdxl --caps 24,16,12 [--write]
    .work/venv/bin/python bench/bench_memory.py --tiny --device cpu --steps 2 --warmup 1   # smoke test, no GPU

GPU: peak = ``torch.cuda.max_memory_allocated`` over the timed steps (reset before each mode); each cap runs
the mode again under ``torch.cuda.set_per_process_memory_fraction(cap / total)`` and reports ``fits`` or
``OOM``. CPU (smoke mode): peak = weights + the live bytes the steps allocate (``memory.LiveBytes``); caps are
not enforced. Qwen-Image is not built here yet (no ComfyUI config in bench/bundles.py).
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import common
from common import REPO, median_ms

MODES = ("bf16", "fp8", "int8", "int4", "int4+offload")


def build_model(family: str, mode: str, device: str, tiny: bool):
    """ModelPatcher with random weights: bf16 (or fp8 weights with bf16 manual cast for ``fp8``)."""
    import torch

    import bundles
    import comfy.model_patcher

    cfg, _ = bundles._config(family, tiny)
    wdtype = torch.float8_e4m3fn if mode == "fp8" else torch.bfloat16
    cfg.set_inference_dtype(wdtype, torch.bfloat16 if mode == "fp8" else None)
    model = cfg.get_model({}, "", device=torch.device(device))
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
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device(device), offload_device=torch.device("cpu"))


def run_mode(engine, family, mode, args, device):
    """(ms/step median, measured peak bytes, predicted peak bytes) of one mode."""
    import torch

    import bundles

    types = engine("data.types")
    C = engine("train.config")
    st = engine("train.state")
    loop = engine("train.loop")
    memory = engine("train.memory")
    model = build_model(family, mode, device, args.tiny)
    side = args.resolution // 8
    latents = torch.randn(1, bundles.latent_channels(family), side, side, generator=torch.Generator().manual_seed(0))
    cond = bundles.random_cond(family, args.tiny)
    ts = types.TrainingSet((types.Sample("0", latents[0], (types.CaptionVariant("bench", cond),)),))
    quant = {"int8": "int8", "int4": "int4", "int4+offload": "int4"}.get(mode, "none")
    offload = args.offload if mode.endswith("offload") else 0
    settings = st.RunSettings(run_name="bench", precision="bf16", gradient_checkpointing=True, quantize=quant,
                              offload_blocks=offload, memory_budget_gb=4096.0)
    run = loop.init_run(model, ts, C.LoraConfig(rank=args.rank, alpha=float(args.rank), preset="attention+mlp"),
                        C.TimestepConfig(), C.OptimizerConfig(lr=1e-4), settings, runs_root=Path(tempfile.mkdtemp()))
    predicted = float(run.meta["memory_plan"].split("peak ")[1].split(" GiB")[0]) * 2**30
    cuda = device == "cuda"
    stamps = []
    meter = memory.LiveBytes() if not cuda else None

    def on_step(r, trainer):
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if cuda and len(stamps) == args.warmup + 1:
            torch.cuda.reset_peak_memory_stats()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        loop.train_steps(run, args.steps + args.warmup + 1, on_step=on_step)
        peak = torch.cuda.max_memory_allocated()
    else:
        weights = sum(t.numel() * t.element_size() for t in model.model.diffusion_model.parameters())
        with meter:
            loop.train_steps(run, args.steps + args.warmup + 1, on_step=on_step)
        peak = weights + meter.peak
    d = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup:]
    del model, run
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return median_ms(d), peak, predicted


def report(engine, args) -> str:
    """The markdown table for ``args`` (family, modes, caps, ...); ``engine(name)`` imports an engine module."""
    import torch

    modes = args.modes.split(",")
    caps = [float(c) for c in args.caps.split(",") if c] if args.device == "cuda" else []
    total = torch.cuda.get_device_properties(0).total_memory if args.device == "cuda" else 0
    lines = [f"### Memory modes, {common.stamp()}, {common.machine()}", "",
             f"{'tiny' if args.tiny else 'full-size'}, {args.resolution} px, rank {args.rank}, batch 1, "
             f"gradient checkpointing, bf16 compute; offload_blocks {args.offload} in int4+offload", "",
             "| model | mode | ms/step | x bf16 | peak GiB | x bf16 | predicted GiB | predicted/measured |"
             + "".join(f" {c:g} GiB cap |" for c in caps),
             "|---|---|---|---|---|---|---|---|" + "---|" * len(caps)]
    for fam in args.family.split(","):
        base = None
        for mode in modes:
            print(f"{fam} {mode} ...", flush=True)
            ms, peak, pred = run_mode(engine, fam, mode, args, args.device)
            if mode == "bf16" or base is None:
                base = (ms, peak)
            fits = []
            for cap in caps:
                torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total))
                try:
                    run_mode(engine, fam, mode, args, args.device)
                    fits.append("fits")
                except torch.OutOfMemoryError:
                    fits.append("OOM")
                finally:
                    torch.cuda.set_per_process_memory_fraction(1.0)
                    gc.collect()
                    torch.cuda.empty_cache()
            lines.append(f"| {fam} | {mode} | {ms:.0f} | {ms / base[0]:.2f} | {peak / 2**30:.3f} | "
                         f"{peak / base[1]:.2f} | {pred / 2**30:.3f} | {pred / peak:.2f} |"
                         + "".join(f" {f} |" for f in fits))
    return "\n".join(lines)


def parse(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="flux1,sdxl", help="comma list of: sdxl, flux1")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny SDXL/FLUX configs (smoke test)")
    ap.add_argument("--resolution", type=int, default=None, help="image side in px (default 1024; --tiny: 64)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--offload", type=int, default=8, help="offload_blocks for int4+offload (--tiny: 1)")
    ap.add_argument("--caps", default="24,16,12", help="GiB caps (set_per_process_memory_fraction), GPU only")
    ap.add_argument("--write", action="store_true", help="append the table to BENCHMARKS.md")
    args = ap.parse_args(argv)
    args.resolution = args.resolution or (64 if args.tiny else 1024)
    if args.tiny and args.offload == 8:
        args.offload = 1
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
    table = report(engine, args)
    print(table)
    if args.write:
        with open(REPO / "BENCHMARKS.md", "a", encoding="utf-8") as f:
            f.write("\n" + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
