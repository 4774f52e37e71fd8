#!/usr/bin/env python3
"""Text-encoder swap, the issue's figure: validation loss of the swapped tiny SD1.5, or with ``--model sdxl`` the tiny
SDXL of the family bundles (CLIP-L + a 320-wide CLIP-G, context 1088; its adm reads the swap's pooled vector: zero,
or with ``--pooled projected`` the T5's own, projected), with the tiny T5 of the Chroma bundle as the new encoder
(linear projection), before and after 50 steps, per reset mode, through the same engine calls
as the nodes (Text Encoder Swap Setup, Train Init with LoRA Config algorithm 'full' on the cross-attention, Train
Steps); min-SNR weighting, AdamW, constant lr. Validation: the loop's fixed-noise, fixed-timestep loss on the 4
training images (4 timesteps). Tiny seeded models: the figure shows the training works, not image quality.

    .work/venv/bin/python bench/te_swap_val_figure.py [--model sd15|sdxl] [--pooled zero|projected] [--steps 50] [--lr 1e-3]
        [--modes cross_attention,qk,all_attention]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--modes", default="cross_attention,qk,all_attention")
    ap.add_argument("--model", choices=("sd15", "sdxl"), default="sd15")
    ap.add_argument("--pooled", choices=("zero", "projected"), default="zero", help="SDXL's pooled input")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="at-swap-bench-"))
    c = common.boot_comfy(tmp)
    from support.factories import families, sd15
    from support.factories.dataset import make_dataset

    if args.model == "sdxl":
        model, clip, vae = families.build("sdxl")
    else:
        (tmp / "models/checkpoints/tiny.safetensors").symlink_to(sd15.checkpoint())
        model, clip, vae = c.nodes.CheckpointLoaderSimple().load_checkpoint("tiny.safetensors")
    D, caps, bk, cache, align = (c.engine(n) for n in ("data.dataset", "data.captions", "data.buckets", "data.cache",
                                                          "te.align"))
    S, C, loop, st = (c.engine(n) for n in ("train.te_swap", "train.config", "train.loop", "train.state"))
    new = align.align_clip(families.build_clip("chroma"), "chroma")
    old = align.align_clip(clip, args.model)
    folder = make_dataset(tmp / "data", n=4, sizes=((64, 64),))
    ds = D.from_folder(folder.parent, caps.CaptionConfig(trigger_word="ohwx"),
                       bk.BucketConfig(resolution=64, min_side=64, max_side=64, step=64))
    tset, _ = cache.cache_text(cache.cache_latents(ds, vae, tmp / "cache"), new, tmp / "cache", unload=False)
    print(f"| reset | trained layers | val loss step 0 | val loss step {args.steps} | change | seconds |")
    print("|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        t0 = time.perf_counter()
        swapped, swap = S.setup_from_dataset(model, new, old, ds, mode, "linear", 0, pooled=args.pooled)
        run = loop.init_run(swapped, tset, C.LoraConfig(algorithm="full", rank=1, alpha=1,
                                                        preset="cross-attention" if mode != "all_attention" else "attention"),
                            C.TimestepConfig(weighting="min_snr"), C.OptimizerConfig(lr=args.lr, weight_decay=0.0),
                            st.RunSettings(run_name=f"swap_{mode}", seed=0), runs_root=tmp / "runs")
        before = loop.validation_loss(run)
        run = loop.train_steps(run, args.steps)
        after = loop.validation_loss(run)
        print(f"| {mode} | {'attn1+attn2' if mode == 'all_attention' else 'attn2'} | {before:.5f} | {after:.5f} | "
              f"{(after - before) / before:+.1%} | {time.perf_counter() - t0:.0f} |", flush=True)
        print(f"  ({swap.report()})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
