"""Figures for README / docs/training.md (not a test): a tiny family bundle of support.factories.families (ComfyUI's
own classes) trained on 4 generated 64 px captioned images (support.factories.dataset's shapes on coloured
backgrounds), rank 8, batch 2, 50 steps at the learning rate given,
the family's own shift, logit-normal timesteps; the validation loss at fixed noise on the training images every 10
steps, one torch thread.

    COMFYUI_PATH=$PWD/.work/ComfyUI .work/venv/bin/python bench/family_val_figure.py qwen-image 1e-3 [steps]
"""
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import torch

torch.set_num_threads(1)
from support.boot import boot  # noqa: E402

c = boot()
import random  # noqa: E402

import numpy as np  # noqa: E402
from support.factories import dataset as ds, families  # noqa: E402

C, st, loop = (c.engine(m) for m in ("train.config", "train.state", "train.loop"))
types = c.engine("data.types")
name, lr = sys.argv[1], float(sys.argv[2])
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 50
model, clip, vae = families.build(name)
samples = []
rng = random.Random(0)
for i in range(4):
    shape, (fg, bg) = ds.SHAPES[i % 3], rng.sample(list(ds.COLORS), 2)
    pil = ds.draw(shape, ds.COLORS[fg], ds.COLORS[bg], (64, 64), rng)
    img = torch.from_numpy(np.asarray(pil)).float().unsqueeze(0) / 255
    with torch.no_grad():
        lat = vae.encode(img)[0]
    cap = f"ohwx, a {fg} {shape}, {bg} background"
    (cond,) = c.nodes.CLIPTextEncode().encode(clip, cap)
    samples.append(types.Sample(f"i{i}", lat, (types.CaptionVariant(cap, cond),), bucket=(64, 64)))
tset = types.TrainingSet(tuple(samples))
run = loop.init_run(model, tset, C.LoraConfig(rank=8, alpha=8, preset="attention+mlp"),
                    C.TimestepConfig(density="logit_normal", shift="model"),
                    C.OptimizerConfig(lr=lr, total_steps=steps),
                    st.RunSettings(run_name=name, val_count=0, batch_size=2), runs_root=Path(tempfile.mkdtemp()))
t0 = time.time()
done = loop.train_steps(run, steps, val_every=10)
vals = [(h["step"], round(h["val_loss"], 4)) for h in done.history if h.get("val_loss") is not None]
first, last = vals[0][1], vals[-1][1]
print(name, f"lr {lr}", "val", vals, f"change {100 * (last - first) / first:+.1f}% (step {vals[0][0]} -> {vals[-1][0]})",
      f"{time.time() - t0:.1f}s", flush=True)
