#!/usr/bin/env python3
"""GPU mode: full-size SDXL and FLUX.1-dev, random weights built by ComfyUI's own ``supported_models``
configs (no download), bf16, LoRA on every patchable >= 2-D weight. Reports per-step time and peak GPU memory
of the two plain-PyTorch floors (bench/floor.py: LoRA merged into the weights, LoRA on the activations) and of
our trainer, the FLOPs of one step (counted by
``torch.utils.flop_counter.FlopCounterMode``) and the model-FLOPs utilisation against the GPU's peak dense
bf16 rate.

    .work/venv/bin/python bench/bench_gpu.py [--family sdxl,flux1] [--resolution 1024] [--write]
    .work/venv/bin/python bench/bench_gpu.py --tiny --device cpu --steps 2 --warmup 1   # smoke test, no GPU

FLOPs: ``fwd`` = one forward of the diffusion model (no gradients); a floor ``step`` = everything one step of
that floor runs (forward, backward, AdamW; the merge floor also the LoRA merge), with gradient checkpointing
including the recomputed forward. **Model FLOPs** of a step = the activation floor's step (minus the recomputed
forward under checkpointing): what LoRA training needs, since a frozen base weight needs no gradient (about 2x
the forward). Merging the LoRA into the weight (ComfyUI's weight adapters, TrainLoraNode, the merge floor)
makes backward compute each full weight gradient as well (about 3x the forward): that is executed, not model,
work, and shows in the executed TFLOP/step and HFU columns. MFU = model FLOPs / step time / peak; HFU = what
the trainer executed (recomputation included) / step time / peak. Only ComfyUI's model code and the engine
are imported (no server, node API or TrainLoraNode), so a bare GPU machine needs only torch and ComfyUI's model
dependencies.
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import common
from common import REPO, median_ms

# Peak dense (no sparsity) bf16 tensor-core TFLOP/s from NVIDIA's datasheets, matched in order against
# torch.cuda.get_device_name(): more specific names first.
PEAK_BF16_TFLOPS = (
    ("H200 NVL", 835.5), ("H200", 989.5), ("GH200", 989.5), ("H100 NVL", 835.5), ("H100 PCIe", 756.5),
    ("H100", 989.5), ("A100", 312.0), ("L40S", 362.1), ("A10G", 70.0), ("L4", 121.0),
)


def peak_tflops(device_name: str) -> float | None:
    for key, tf in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tf
    return None


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def forward_flops(model, latents, cond, batch, precision, device) -> int:
    import torch

    from floor import diffusion_kwargs

    dm = model.model.diffusion_model
    wdtype = next(dm.parameters()).dtype
    x = latents[:1].expand(batch, *latents.shape[1:]).to(device=device, dtype=wdtype)
    kw = {k: (v.to(device=device, dtype=wdtype) if v.is_floating_point() else v.to(device))
          if isinstance(v, torch.Tensor) else v for k, v in diffusion_kwargs(model, cond, x).items()}
    t = torch.full((batch,), 0.5, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]

    def fwd():
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            dm(x, t, **kw)

    return count_flops(fwd)


def floor_step_flops(model, latents, cond, rank, batch, gc_on, precision, device, formulation="merge") -> int:
    import torch

    from floor import make_floor

    with torch.inference_mode(False), torch.enable_grad():
        _, step, setup = make_floor(model, latents, cond, rank, batch, precision=precision, device=device,
                                    formulation=formulation)
        with setup(gc_on):
            step()  # the first step may be redone (FLUX's in-place adds); count a settled one
            return count_flops(step)


PROFILE_DIR = None
PYPROFILE = False
SHOWN = {"floor": "merge floor", "floor_act": "activation floor", "ours": "ours", "peer": "diffusers+peft"}


def profile(tag: str, fn, device: str, rows: int = 18) -> None:
    """Run ``fn`` under torch.profiler; print the top ops by self device (or CPU) time."""
    import torch
    from torch.profiler import ProfilerActivity

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    keys = (["self_cuda_time_total"] if device == "cuda" else []) + ["self_cpu_time_total"]
    table = "\n".join(f"sorted by {k}:\n" + prof.key_averages().table(sort_by=k, row_limit=rows, max_name_column_width=60)
                      for k in keys)
    print(f"--- profile {tag} (2 steps) ---\n{table}", flush=True)
    if PROFILE_DIR:
        Path(PROFILE_DIR).mkdir(parents=True, exist_ok=True)
        (Path(PROFILE_DIR) / f"profile-{tag}.txt").write_text(table, encoding="utf-8")


def pyprofile(tag: str, fn, steps: int = 3, rows: int = 25) -> None:
    """cProfile over ``steps`` calls of ``fn``: the Python-side (host) cost, top functions by own time. On a
    GPU a launch-bound step's time is this host work."""
    import cProfile
    import io
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        fn()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(rows)
    print(f"--- python profile {tag} ({steps} steps) ---\n{buf.getvalue().strip()}", flush=True)


def floor_profile(model, latents, cond, rank, batch, gc_on, precision, device, fam,
                  formulations=("merge", "activation")) -> None:
    import torch

    from floor import make_floor

    for formulation in formulations:
        with torch.inference_mode(False), torch.enable_grad():
            _, step, setup = make_floor(model, latents, cond, rank, batch, precision=precision, device=device,
                                        formulation=formulation)
            with setup(gc_on):
                step()
                step()
                profile(f"floor-{formulation}-{fam}", lambda: [step() for _ in range(2)], device)
                if PYPROFILE:
                    pyprofile(f"floor-{formulation}-{fam}", step)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="sdxl,flux1", help="comma list of: sdxl, flux1")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny SDXL/FLUX configs (smoke test of this code)")
    ap.add_argument("--resolution", type=int, default=None, help="image side in px (default 1024; --tiny: 64)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--grad-ckpt", default="sdxl:off,flux1:on",
                    help="per family on/off, e.g. 'sdxl:off,flux1:on' (full FLUX.1 without it needs > 80 GB)")
    ap.add_argument("--tokens", type=int, default=None, help="text tokens (default: SDXL 77, FLUX 512)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's peak bf16 TFLOP/s")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler over 2 steps of each trainer: top ops by device time (printed, and saved "
                         "to $OUT or bench/profiles/ when --profile-dir is given)")
    ap.add_argument("--profile-dir", default=None)
    ap.add_argument("--pyprofile", action="store_true",
                    help="with --profile: also cProfile 3 steps of each trainer (host-side Python cost)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the trainers this many times, interleaved; medians over all rounds")
    ap.add_argument("--trainers", default="floor,floor_act,ours,peer",
                    help="comma list of: floor (merge floor), floor_act (activation floor), ours, peer (diffusers' "
                         "own LoRA training step with peft on diffusers' model classes: bench/peer.py); "
                         "ours:<option>=<value> runs ours with a speed option (train/speed.py), e.g. "
                         "ours:optimizer_impl=fused, ours:compile=blocks (several: ours:a=x+b=y)")
    ap.add_argument("--write", action="store_true", help="append the table to BENCHMARKS.md")
    args = ap.parse_args()
    global PROFILE_DIR, PYPROFILE
    PROFILE_DIR, PYPROFILE = args.profile_dir, args.pyprofile
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA GPU here (torch.cuda.is_available() is False). Run it on a machine with an "
              "NVIDIA GPU, or smoke-test the code path on the CPU with: "
              ".work/venv/bin/python bench/bench_gpu.py --tiny --device cpu --steps 2 --warmup 1", file=sys.stderr)
        return 2
    # CPU: one thread, since each trainer then runs in a forked child (common.isolated), which would hang in an
    # OpenMP pool the parent had started
    common.set_threads(1 if args.device == "cpu" else max(1, min(8, torch.get_num_threads())))
    engine = common.light_comfy(cpu=args.device == "cpu")
    import bundles
    from bench_ours import run_ours, speed_variant
    from floor import time_floor

    res = args.resolution or (64 if args.tiny else 1024)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    gc_map = dict(kv.split(":") for kv in args.grad_ckpt.split(","))
    dev_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    peak = args.peak_tflops or (peak_tflops(dev_name) if args.device == "cuda" else None)
    rows = []
    for fam in args.family.split(","):
        if fam not in bundles.GPU_FAMILIES:
            raise SystemExit(f"unknown family {fam!r}; use {', '.join(bundles.GPU_FAMILIES)}")
        gc_on = gc_map.get(fam, "off") == "on"
        print(f"== {fam}: building ({'tiny' if args.tiny else 'full size'}, {args.precision}, {args.device})", flush=True)
        model = bundles.random_model(fam, args.device, dtype, tiny_size=args.tiny)
        n_params = sum(p.numel() for p in model.model.diffusion_model.parameters())
        cond = bundles.random_cond(fam, args.tiny, args.tokens)
        g = torch.Generator().manual_seed(0)
        latents = torch.randn(4, bundles.latent_channels(fam), res // 8, res // 8, generator=g)
        dev_lat = latents.to(args.device)
        fwd = forward_flops(model, dev_lat, cond, args.batch, args.precision, args.device)
        step = floor_step_flops(model, dev_lat, cond, args.rank, args.batch, gc_on, args.precision, args.device)
        act_step = floor_step_flops(model, dev_lat, cond, args.rank, args.batch, gc_on, args.precision, args.device,
                                    "activation")
        model_flops = act_step - fwd if gc_on else act_step  # see the module docstring
        print(f"   {n_params / 1e9:.3f}B params; forward {fwd / 1e12:.4g} TFLOP, merge floor step {step / 1e12:.4g} "
              f"TFLOP (executed); activation floor step {act_step / 1e12:.4g} TFLOP (executed), model "
              f"{model_flops / 1e12:.4g} TFLOP", flush=True)
        ours_flops = {}
        pre = {}

        def on_ours(trainer):  # after ours' first step, first round only (inside its timed run; warm-up drops
            if pre.get("round"):  # that interval)
                return
            if args.device == "cuda":
                pre["peak"] = torch.cuda.max_memory_allocated() / 2**20
                print(f"   ours after step 1: {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated, "
                      f"peak {pre['peak'] / 1024:.1f} GiB", flush=True)
            try:
                ours_flops["step"] = count_flops(trainer.step)
            except torch.OutOfMemoryError as e:
                print(f"   ours: FLOP count ran out of memory ({str(e).splitlines()[0]})", flush=True)
            if args.profile:
                profile(f"ours-{fam}", lambda: [trainer.step() for _ in range(2)], args.device)
                if PYPROFILE:
                    pyprofile(f"ours-{fam}", trainer.step)
            if args.device == "cuda":  # FlopCounterMode's module tracking holds tensors: not a training peak
                torch.cuda.synchronize()
                print(f"   (FLOP count / profile peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, "
                      "left out)", flush=True)
                torch.cuda.reset_peak_memory_stats()

        out = {}
        runs = {"floor": (time_floor, (model, dev_lat, cond, args.rank, args.steps, args.warmup, args.batch),
                          dict(gradient_checkpointing=gc_on, precision=args.precision, device=args.device)),
                "floor_act": (time_floor, (model, dev_lat, cond, args.rank, args.steps, args.warmup, args.batch),
                              dict(gradient_checkpointing=gc_on, precision=args.precision, device=args.device,
                                   formulation="activation")),
                "ours": (run_ours, (engine, model, latents, cond, args.rank, args.steps, max(args.warmup, 1),
                                    args.batch, gc_on), dict(precision=args.precision, on_trainer=on_ours))}
        _, unet_cfg = bundles._config(fam, args.tiny)

        def run_peer():  # the peer builds its own model (ComfyUI's copy waits on the CPU meanwhile: see below)
            from peer import time_peer

            return time_peer(fam, unet_cfg, dev_lat, cond, args.rank, args.steps, args.warmup, args.batch, gc_on,
                             precision=args.precision, device=args.device)

        runs["peer"] = (run_peer, (), {})
        chosen = [t for t in args.trainers.split(",") if t]
        for t in chosen:  # ours with speed options: its own row, timed like ours (no FLOP count)
            if t not in runs and speed_variant(t) is not None:
                runs[t] = (run_ours, runs["ours"][1], dict(precision=args.precision, speed=speed_variant(t)))
        unknown = [t for t in chosen if t not in runs]
        if unknown:
            raise SystemExit(f"unknown trainer(s) {unknown}; see --trainers")
        if args.profile:
            floor_profile(model, dev_lat, cond, args.rank, args.batch, gc_on, args.precision, args.device, fam,
                          [f for t, f in (("floor", "merge"), ("floor_act", "activation")) if t in chosen])
        for r_ in range(args.rounds):
            pre["round"] = r_  # set before the run (on the CPU each run is a forked child)
            for name in chosen:
                fn, a, kw = runs[name]
                if out.get(name, ()) is None:
                    continue  # ran out of memory before
                print(f"   {name} ..." + (f" (round {r_ + 1}/{args.rounds})" if args.rounds > 1 else ""), flush=True)
                away = name == "peer" and args.device == "cuda"
                if away:  # the peak then counts the peer's own weights once, as the others count ComfyUI's
                    model.model.diffusion_model.to("cpu")
                    torch.cuda.empty_cache()
                try:
                    times, mem = common.measured(args.device, fn, *a, **kw)
                    if name == "ours" and "peak" in pre:  # the peak before the FLOP count, and after it
                        mem["peak"] = max(mem["peak"], pre["peak"])
                        mem["delta"] = mem["peak"] - mem["base"]
                    print(f"   {name} {median_ms(times):.1f} ms, peak {mem['peak'] / 1024:.1f} GiB", flush=True)
                    if name in out:  # later rounds: all step times, the largest peak
                        t0, m0 = out[name]
                        mem = mem if mem["peak"] >= m0["peak"] else m0
                        times = list(t0) + list(times)
                    out[name] = (times, mem)
                except torch.OutOfMemoryError as e:
                    print(f"   {name}: out of memory: {str(e).splitlines()[0]}", flush=True)
                    out[name] = None
                except Exception as e:  # noqa: BLE001 - one trainer failing must not lose the others' rows
                    import traceback

                    traceback.print_exc()
                    print(f"   {name}: failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
                    out[name] = None
                gc.collect()
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                if away:
                    model.model.diffusion_model.to(args.device)
        for name, res_ in out.items():
            if res_ is None:
                rows.append(dict(fam=fam, params=n_params, gc=gc_on, trainer=name, oom=True))
                continue
            times, mem = res_
            ms = median_ms(times)
            tfs = model_flops / (ms / 1000) / 1e12
            executed = {"ours": ours_flops.get("step"), "floor": step, "floor_act": act_step}.get(name)  # ours: None when
            # counted in a forked child (CPU)
            rows.append(dict(fam=fam, params=n_params, gc=gc_on, trainer=name, ms=ms, mib=mem["delta"],
                             peak=mem["peak"], model_tflop=model_flops / 1e12, exec_tflop=executed / 1e12 if executed else None, tfs=tfs,
                             mfu=tfs / peak if peak else None,
                             hfu=executed / 1e12 / (ms / 1000) / peak if peak and executed else None))
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    size = "tiny (tests' configs)" if args.tiny else "full size"
    cmd = " ".join(["bench/bench_gpu.py", *sys.argv[1:]])
    lines = [f"### GPU mode: {size} SDXL / FLUX.1-dev, random weights, {args.precision}, {res} px, batch {args.batch}, "
             f"rank {args.rank} — {common.stamp()}",
             f"Machine: {common.machine()}; peak dense bf16: {f'{peak:.0f} TFLOP/s' if peak else 'unknown'}  ",
             f"Command: `python {cmd}`", "",
             "| model | params | grad ckpt | trainer | ms/step | ours/floor (merge / activation) | peak mem GiB (over start) | model TFLOP/step "
             "| TFLOP/s | MFU | executed TFLOP/step | HFU |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    floor_ms = {(r["fam"], r["trainer"]): r["ms"] for r in rows if r["trainer"] in ("floor", "floor_act", "peer")
                and "ms" in r}
    plain_ms = {(r["fam"], r["trainer"]): r["ms"] for r in rows if r["trainer"] == "ours" and "ms" in r}
    for r in rows:
        if r.get("oom"):
            lines.append(f"| {r['fam']} | {r['params'] / 1e9:.2f}B | {'on' if r['gc'] else 'off'} | {SHOWN.get(r['trainer'], r['trainer'])} | "
                         "out of memory or failed | | | | | | | |")
            continue
        pct = lambda v: f"{100 * v:.1f}%" if v is not None else "n/a"  # noqa: E731
        ours = r["trainer"] == "ours" or r["trainer"].startswith("ours:")
        ratio = " / ".join(f"{r['ms'] / floor_ms[(r['fam'], f)]:.2f}" if (r["fam"], f) in floor_ms else "–"
                           for f in ("floor", "floor_act")) if ours else ""
        if ours and (r["fam"], "peer") in floor_ms:
            ratio += f"; peer/ours {floor_ms[(r['fam'], 'peer')] / r['ms']:.2f}x"
        if r["trainer"].startswith("ours:") and (r["fam"], "ours") in plain_ms:
            ratio += f"; x plain ours {r['ms'] / plain_ms[(r['fam'], 'ours')]:.2f}"
        lines.append(f"| {r['fam']} | {r['params'] / 1e9:.2f}B | {'on' if r['gc'] else 'off'} | {SHOWN.get(r['trainer'], r['trainer'])} | "
                     f"{r['ms']:.1f} | {ratio} | {r['peak'] / 1024:.2f} ({r['mib'] / 1024:.2f}) | {r['model_tflop']:.4g} | "
                     f"{r['tfs']:.4g} | {pct(r['mfu'])} | {'n/a' if r['exec_tflop'] is None else format(r['exec_tflop'], '.4g')} | "
                     f"{pct(r['hfu'])} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        with open(REPO / "BENCHMARKS.md", "a", encoding="utf-8") as f:
            f.write("\n" + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
