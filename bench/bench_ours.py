"""Our trainer's per-step time on the same model/latents/conditioning as bench_train.py's other columns:
same rank, the same layers as TrainLoraNode trains (every patchable >= 2-D weight: all-linear+conv), fp32,
AdamW, no gradient clipping."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path


def run_ours(c, model, latents, cond, rank, steps, warmup, batch, gc_on, dataset_size: int | None = None) -> list[float]:
    types = c.engine("data.types")
    C = c.engine("train.config")
    st = c.engine("train.state")
    loop = c.engine("train.loop")
    n = dataset_size or latents.shape[0]
    samples = tuple(types.Sample(key=str(i), latent=latents[i % latents.shape[0]],
                                 captions=(types.CaptionVariant("bench", cond),)) for i in range(n))
    ts = types.TrainingSet(samples)
    run = loop.init_run(model, ts, C.LoraConfig(rank=rank, alpha=float(rank), preset="all-linear+conv"),
                        C.TimestepConfig(), C.OptimizerConfig(lr=1e-4, grad_clip=0.0, weight_decay=0.0),
                        st.RunSettings(batch_size=batch, gradient_checkpointing=gc_on, run_name="bench"),
                        runs_root=Path(tempfile.mkdtemp()))
    stamps = []
    loop.train_steps(run, steps + warmup + 1, on_step=lambda r, t: stamps.append(time.perf_counter()))
    d = [b - a for a, b in zip(stamps, stamps[1:])]
    return d[warmup:]
