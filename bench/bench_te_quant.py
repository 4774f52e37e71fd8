#!/usr/bin/env python3
"""Text encoders quantized while captions are cached (issue #19; Cache Text Embeddings ``quantize``): peak device
memory and ms per caption of FLUX.1's encoders (CLIP-L + T5-XXL, ComfyUI's own classes, random bf16 weights of the
released shapes: no download) per mode, and how far each mode's embeddings are from full precision.

    .work/venv/bin/python bench/bench_te_quant.py [--modes none,int8,int4] [--captions 8] [--write]
    .work/venv/bin/python bench/bench_te_quant.py --tiny --device cpu          # smoke test, no GPU

Each mode runs in a child process of its own (nothing one leaves on the device counts against the next); the
encoder starts in CPU memory, as ComfyUI's loaders leave it, and is loaded through ComfyUI's memory manager, so
the peak includes the load. GPU peak = ``torch.cuda.max_memory_allocated`` from the load to the last caption.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

CAPTIONS = ["ohwx, a woman in a red coat walking through a snowy forest at dusk, cinematic light",
            "a close-up photo of a cat's face, green eyes, shallow depth of field",
            "an oil painting of a harbour with fishing boats, morning fog, muted colours",
            "a product shot of a glass bottle on a white table, soft shadows",
            "ohwx, portrait, looking at the camera, studio lighting, 85mm",
            "a city street at night in the rain, neon signs reflected in puddles",
            "a watercolour of mountains above a lake, pine trees in the foreground",
            "a bowl of ramen with an egg and spring onions, top-down view"]


def build_clip(device: str, tiny: bool):
    """FLUX.1's CLIP (CLIP-L + T5-XXL) as ComfyUI builds it, bf16 weights in CPU memory, random values drawn on
    ``device`` one tensor at a time."""
    import torch

    import comfy.sd
    import comfy.supported_models as sm

    if tiny:
        from support.factories import families

        return families.build_clip("flux1-dev")
    target = sm.Flux({"image_model": "flux"}).clip_target({})
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.bfloat16, "load_device": torch.device(device),
                                                         "initial_device": torch.device("cpu")})
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in clip.cond_stage_model.named_parameters():
            v = torch.empty(p.shape, device=device, dtype=torch.float32)
            if p.ndim >= 2:
                v.normal_(0.0, 0.02, generator=g)
            else:
                v.fill_(1.0)
            p.copy_(v.to(p.dtype))
    return clip


def one(mode: str, args) -> dict:
    import torch
    from safetensors.torch import save_file

    engine = common.light_comfy(cpu=args.device == "cpu")
    q, cache = engine("train.quantize"), engine("data.cache")
    cuda = args.device == "cuda"
    clip = build_clip(args.device, args.tiny)
    n_params = sum(p.numel() for p in clip.cond_stage_model.parameters())
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    t0 = time.perf_counter()
    times, first = [], None
    with q.quantized_text_encoder(clip, mode, cache.unload_patcher):
        load_s = time.perf_counter() - t0
        for text in CAPTIONS[:args.captions]:
            t = time.perf_counter()
            cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            if first is None:
                first = {"cond": cond[0][0].float().cpu().contiguous(),
                         "pooled": cond[0][1]["pooled_output"].float().cpu().contiguous()}
    peak = (torch.cuda.max_memory_allocated() - base) if cuda else None
    save_file(first, str(Path(args.tmp) / f"{mode}.safetensors"))
    times = times[1:] or times  # the first caption warms up
    return {"mode": mode, "params": n_params, "peak": peak, "load_s": load_s,
            "ms": 1000 * sorted(times)[len(times) // 2]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="none,int8,int4")
    ap.add_argument("--captions", type=int, default=8)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny FLUX.1 encoders (smoke test)")
    ap.add_argument("--write", action="store_true", help="append the table to BENCHMARKS.md")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args)), flush=True)
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_te_quant.py: no CUDA GPU here; smoke-test with --tiny --device cpu", file=sys.stderr)
        return 2
    from safetensors.torch import load_file

    tmp = tempfile.mkdtemp(prefix="at-teq-")
    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--one", mode, "--tmp", tmp, "--device", args.device,
               "--captions", str(args.captions)] + (["--tiny"] if args.tiny else [])
        p = subprocess.run(cmd, capture_output=True, text=True)
        r = next((json.loads(x[7:]) for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if r is None:
            sys.stderr.write(p.stderr[-3000:])
            r = {"mode": mode, "error": f"child exited {p.returncode}"}
        rows.append(r)
        print(r, flush=True)
    ref = load_file(str(Path(tmp) / "none.safetensors")) if (Path(tmp) / "none.safetensors").exists() else None
    gib = lambda b: "" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
    base = next((r for r in rows if r["mode"] == "none" and "error" not in r), None)
    lines = [f"### Text encoders quantized while caching, {common.stamp()}, {common.machine()}", "",
             f"FLUX.1 CLIP-L + T5-XXL ({'tiny' if args.tiny else 'full size'}, random bf16 weights), "
             f"{args.captions} captions, ms = median per caption after the first", "",
             "| mode | ms/caption | peak GiB (load + encode) | x none | embedding rel. error | pooled rel. error | result |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | | | | | | {r['error']} |")
            continue
        err = perr = ""
        f = Path(tmp) / f"{r['mode']}.safetensors"
        if ref is not None and f.exists():
            e = load_file(str(f))
            rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
            err, perr = f"{rel(e['cond'], ref['cond']):.4f}", f"{rel(e['pooled'], ref['pooled']):.4f}"
        x = f"{r['peak'] / base['peak']:.2f}" if base and r["peak"] and base["peak"] else ""
        lines.append(f"| {r['mode']} | {r['ms']:.1f} | {gib(r['peak'])} | {x} | {err} | {perr} | ok |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        with open(common.REPO / "BENCHMARKS.md", "a") as fh:
            fh.write("\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
