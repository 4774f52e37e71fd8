"""One-off figure for docs/video.md (not a test): each expert of the tiny Wan 2.2 A14B pair (support.factories.wan22)
on 4 generated 5-frame 32 px clips, rank 8, batch 2, 50 steps at the learning rate given, the validation loss at fixed
noise on the training clips every 10 steps, one torch thread.

    COMFYUI_PATH=$PWD/.work/ComfyUI .work/venv/bin/python bench/wan22_val_figure.py 3e-3
"""
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import torch
torch.set_num_threads(1)
from support.boot import boot
c = boot()
from support.factories import te_wan, wan, wan22, clips as clipsf
C, st, loop = (c.engine(m) for m in ("train.config", "train.state", "train.loop"))
types = c.engine("data.types")
clip = te_wan.wan_clip()
vae = wan.build_vae()
samples = []
for i, lat in enumerate(clipsf.encoded_clips(vae)):
    cap = f"ohwx clip {i}"
    (cond,) = c.nodes.CLIPTextEncode().encode(clip, cap)
    samples.append(types.Sample(f"c{i}", lat, (types.CaptionVariant(cap, cond),), bucket=(32, 32)))
tset = types.TrainingSet(tuple(samples))
for expert, pair in (("high_noise", wan22.HIGH), ("low_noise", wan22.LOW)):
    model = pair.build_model()
    run = loop.init_run(model, tset, C.LoraConfig(rank=8, alpha=8, preset="attention"),
                        C.TimestepConfig(shift="model", expert=expert), C.OptimizerConfig(lr=float(sys.argv[1]), total_steps=50),
                        st.RunSettings(run_name=expert, val_count=0, batch_size=2), runs_root=Path(tempfile.mkdtemp()))
    t0 = time.time()
    done = loop.train_steps(run, 50, val_every=10)
    vals = [(h["step"], round(h["val_loss"], 4)) for h in done.history if h.get("val_loss") is not None]
    print(expert, "boundary", run.timesteps.expert_boundary, "val", vals, f"{time.time() - t0:.1f}s", flush=True)
