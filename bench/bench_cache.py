#!/usr/bin/env python3
"""Text-embedding and latent caches, cold (encode + write) vs warm (read + verify), through the same
engine calls the Cache Latents / Cache Text Embeddings nodes make, on the tiny SD1.5 (full-size CLIP-L and
SD VAE; images at 64 px).

    .work/venv/bin/python bench/bench_cache.py [--captions 1000] [--images 200] [--write]

The caption set is the real thing: ``images`` captioned images with tag shuffling and
``captions / images`` cached variants each (all distinct), plus the empty caption for dropout.
"""
from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import common
from common import REPO


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--captions", type=int, default=1000)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--write", action="store_true", help="append the table to BENCHMARKS.md")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (images and caches)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="at-cache-bench-"))
    c = common.boot_comfy(tmp)
    import torch
    from support.factories import sd15
    from support.factories.dataset import make_dataset

    (tmp / "models/checkpoints/tiny.safetensors").symlink_to(sd15.checkpoint())
    _, clip, vae = c.nodes.CheckpointLoaderSimple().load_checkpoint("tiny.safetensors")
    D, caps, bk, cache = (c.engine(n) for n in ("data.dataset", "data.captions", "data.buckets", "data.cache"))
    bcfg = bk.BucketConfig(resolution=64, min_side=64, max_side=64, step=64)
    folder = make_dataset(tmp / "imgs", n=args.images, sizes=((64, 64),))
    per_image = max(1, math.ceil(args.captions / args.images))
    for i, p in enumerate(sorted(folder.glob("*.txt"))):  # distinct tags per image: variants never collide
        p.write_text(f"ohwx, item {i}, " + ", ".join(f"tag{i}_{k}" for k in range(6)), encoding="utf-8")
    ccfg = caps.CaptionConfig(shuffle_tags=True, keep_tokens=2, variants=per_image)
    root = tmp / "output" / "aligned_trainer" / "cache"

    with torch.inference_mode():  # as inside ComfyUI's executor
        ds = D.from_folder(folder.parent, ccfg, bcfg)
        t = time.perf_counter()
        lc = cache.cache_latents(ds, vae, root, unload=True)
        lat_cold = time.perf_counter() - t
        t = time.perf_counter()
        lc2 = cache.cache_latents(ds, vae, root)
        lat_warm = time.perf_counter() - t
        assert lc.stats[1] == args.images and lc2.stats == (args.images, 0, 0), (lc.stats, lc2.stats)
        assert all(torch.equal(a, b) for a, b in zip(lc.latents, lc2.latents))

        n_texts = len({t for i in ds.items for t in i.captions} | {""})
        t = time.perf_counter()
        ts, st = cache.cache_text(lc, clip, root)
        txt_cold = time.perf_counter() - t
        unloaded = not cache.is_loaded(clip)
        t = time.perf_counter()
        ts2, st2 = cache.cache_text(lc, clip, root)
        txt_warm = time.perf_counter() - t
        assert st[1] == n_texts and st2 == (n_texts, 0, 0), (st, st2)

    rows = [("latents (VAE encode)", args.images, lat_cold, lat_warm),
            ("text embeddings (CLIP-L)", n_texts, txt_cold, txt_warm)]
    lines = [f"### Caches, tiny SD1.5 (CLIP-L, SD VAE at 64 px) — {common.stamp()}",
             f"Machine: {common.machine()}  ", "Command: `.work/venv/bin/python bench/bench_cache.py`", "",
             "| what | items | cold s | warm s | cold ms/item | warm ms/item | speed-up |", "|---|---|---|---|---|---|---|"]
    for name, n, cold, warm in rows:
        lines.append(f"| {name} | {n} | {cold:.2f} | {warm:.2f} | {1000 * cold / n:.1f} | {1000 * warm / n:.2f} | "
                     f"{cold / warm:.0f}x |")
    lines += ["", f"Text encoder unloaded after caching: {unloaded}. Warm runs read, verify (digest) and rebuild "
                  "the TrainingSet; cold runs encode and write atomically."]
    table = "\n".join(lines)
    print(table)
    if args.write:
        with open(REPO / "BENCHMARKS.md", "a", encoding="utf-8") as f:
            f.write("\n" + table + "\n")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
