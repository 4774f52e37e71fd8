"""One-off figure for docs/video.md (not a test): the tiny HunyuanVideo 1.5 transformer (support.factories.hunyuan_video15,
ComfyUI's classes, at the tiny Qwen2.5-VL's text width) on 4 generated 5-frame 32 px clips cached through the tiny
HunyuanVideo 1.5 VAE (ComfyUI's detected VAE holding the small vae_refiner module), captions through the aligned
encoders (spec hunyuan-video-1.5), rank 8 attention+mlp, batch 2, 50 steps at the learning rate given, the shipped
workflow's timesteps (sigmoid + FLUX's resolution shift = musubi-tuner's flux_shift); the validation loss at fixed
noise on the training clips every 10 steps, one torch thread.

    COMFYUI_PATH=$PWD/.work/ComfyUI .work/venv/bin/python bench/hv15_val_figure.py 2e-3
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
from support.factories import clips as clipsf, hunyuan_video15 as hv15, te_hunyuan_video15 as hv15_te  # noqa: E402

C, st, loop = (c.engine(m) for m in ("train.config", "train.state", "train.loop"))
types = c.engine("data.types")
lr = float(sys.argv[1])
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 50
clip = c.engine("te.align").align_clip(
    hv15_te.shared_hv15_clip(hv15_te.qwen25vl_tiny_file(), hv15_te.byt5_tiny_file()), "hunyuan-video-1.5")
vae = hv15.comfy_vae()
samples = []
for i, lat in enumerate(clipsf.encoded_clips(vae)):
    with torch.no_grad():
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(f"ohwx clip {i}"))
    samples.append(types.Sample(f"c{i}", lat, (types.CaptionVariant(f"ohwx clip {i}", cond),), bucket=(32, 32)))
tset = types.TrainingSet(tuple(samples))
model = hv15.Bundle.build_model()
run = loop.init_run(model, tset, C.LoraConfig(rank=8, alpha=8, preset="attention+mlp"),
                    C.TimestepConfig(density="sigmoid", shift="flux_resolution"),
                    C.OptimizerConfig(lr=lr, total_steps=steps),
                    st.RunSettings(run_name="hv15", val_count=0, batch_size=2), runs_root=Path(tempfile.mkdtemp()))
t0 = time.time()
done = loop.train_steps(run, steps, val_every=10)
vals = [(h["step"], round(h["val_loss"], 4)) for h in done.history if h.get("val_loss") is not None]
first, last = vals[0][1], vals[-1][1]
print("hv15", f"lr {lr}", "latent", tuple(samples[0].latent.shape), "val", vals,
      f"change {100 * (last - first) / first:+.1f}% (step {vals[0][0]} -> {vals[-1][0]})", f"{time.time() - t0:.1f}s",
      flush=True)
