"""Our trainer's per-step time on the same model/latents/conditioning as the floor and TrainLoraNode: same
rank, the same layers as the floor (every patchable >= 2-D weight: all-linear+conv), AdamW, no gradient
clipping, the same precision. Timed between consecutive steps through the engine's per-step callback (after a
device synchronise on CUDA)."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path


def run_ours(engine, model, latents, cond, rank, steps, warmup, batch, gc_on, dataset_size: int | None = None,
             precision: str = "fp32", on_trainer=None, speed: dict | None = None) -> list[float]:
    """``engine(name)`` imports an engine module (``Comfy.engine`` or ``common.light_comfy``'s). ``on_trainer``
    is called once with the live Trainer after the first step (the GPU mode counts FLOPs with it). ``speed``:
    speed options of the run (train/speed.py field -> value; see :func:`speed_variant`)."""
    import torch

    types = engine("data.types")
    C = engine("train.config")
    st = engine("train.state")
    loop = engine("train.loop")
    n = dataset_size or latents.shape[0]
    samples = tuple(types.Sample(key=str(i), latent=latents[i % latents.shape[0]],
                                 captions=(types.CaptionVariant("bench", cond),)) for i in range(n))
    ts = types.TrainingSet(samples)
    run = loop.init_run(model, ts, C.LoraConfig(rank=rank, alpha=float(rank), preset="all-linear+conv"),
                        C.TimestepConfig(), C.OptimizerConfig(lr=1e-4, grad_clip=0.0, weight_decay=0.0),
                        st.RunSettings(batch_size=batch, gradient_checkpointing=gc_on, run_name="bench",
                                       precision=precision, **(speed or {})),
                        runs_root=Path(tempfile.mkdtemp()))
    stamps = []
    cuda = torch.device(getattr(model, "load_device", "cpu")).type == "cuda"

    def on_step(r, trainer):
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if on_trainer is not None and len(stamps) == 1:
            on_trainer(trainer)

    loop.train_steps(run, steps + warmup + 1, on_step=on_step)
    d = [b - a for a, b in zip(stamps, stamps[1:])]
    return d[warmup:]


def speed_variant(name: str) -> dict | None:
    """The speed options of a benchmark trainer name: ``ours`` -> {} (the plain path), ``ours:<option>=<value>``
    (e.g. ``ours:optimizer_impl=fused``, ``ours:channels_last=true``; several joined by ``+``) -> those options;
    any other name -> None."""
    if name == "ours":
        return {}
    if not name.startswith("ours:"):
        return None
    out = {}
    for kv in name[len("ours:"):].split("+"):
        k, _, v = kv.partition("=")
        out[k] = {"true": True, "false": False}.get(v.lower(), v)
    return out
