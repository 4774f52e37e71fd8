#!/usr/bin/env python3
"""Text-embedding and latent caches, cold vs warm, on the tiny SD1.5 (full-size CLIP-L and SD VAE).

    .work/venv/bin/python bench/bench_cache.py [--captions 1000] [--images 200] [--write]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common
from common import REPO


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--captions", type=int, default=1000)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="at-cache-bench-"))
    c = common.boot_comfy(tmp)
    from support.factories import sd15
    from support.factories.dataset import make_dataset

    (tmp / "models/checkpoints/tiny.safetensors").symlink_to(sd15.checkpoint())
    model, clip, vae = c.nodes.CheckpointLoaderSimple().load_checkpoint("tiny.safetensors")
    D, caps, bk, cache = (c.engine(n) for n in ("data.dataset", "data.captions", "data.buckets", "data.cache"))
    make_dataset(tmp / "imgs", n=args.images, sizes=((64, 64),))
    ds = D.from_folder(tmp / "imgs", caps.CaptionConfig(),
                       bk.BucketConfig(resolution=64, min_side=64, max_side=64, step=64))
    rows = []
    t = time.perf_counter(); lc = cache.cache_latents(ds, vae, tmp / "c"); cold = time.perf_counter() - t
    t = time.perf_counter(); lc2 = cache.cache_latents(ds, vae, tmp / "c"); warm = time.perf_counter() - t
    assert lc2.stats[0] == args.images
    rows.append(("latents", args.images, cold, warm))
    # captions: a dataset whose items carry many distinct caption variants
    words = ["red", "blue", "green", "circle", "square", "photo", "flat", "bright", "dark", "small", "large"]
    texts = [", ".join(words[(i * k) % len(words)] for k in range(1, 6)) + f", item {i}" for i in range(args.captions)]
    t = time.perf_counter()
    hits = misses = 0
    for ok_pass in ("cold", "warm"):
        t = time.perf_counter()
        dc = cache.DiskCache(tmp / "c" / "text")
        cid = cache.clip_identity(clip)
        for text in texts:
            dc.get_or_compute(cache._key("text", cid, text),
                              lambda text=text: cache._cond_to_tensors(clip.encode_from_tokens_scheduled(clip.tokenize(text))))
        dt = time.perf_counter() - t
        rows.append((f"text embeddings ({ok_pass})", args.captions, dt, None))
        hits, misses = dc.hits, dc.misses
    assert hits == args.captions and misses == 0
    lines = [f"### Caches, tiny SD1.5 (CLIP-L, SD VAE at 64 px) — {common.stamp()}",
             f"Machine: {common.machine()}  ", "Command: `.work/venv/bin/python bench/bench_cache.py`", "",
             "| what | items | cold s | warm s | speed-up |", "|---|---|---|---|---|"]
    lines.append(f"| latents | {args.images} | {rows[0][2]:.2f} | {rows[0][3]:.2f} | {rows[0][2] / rows[0][3]:.0f}x |")
    tc, tw = rows[1][2], rows[2][2]
    lines.append(f"| text embeddings | {args.captions} | {tc:.2f} | {tw:.2f} | {tc / tw:.0f}x |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        with open(REPO / "BENCHMARKS.md", "a", encoding="utf-8") as f:
            f.write("\n" + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
