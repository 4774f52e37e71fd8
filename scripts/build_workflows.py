#!/usr/bin/env python3
"""Regenerate the UI-format workflows in workflows/ from the definitions below, using the node schemas
of a real ComfyUI with this pack loaded (so widget order and types always match the nodes).

    .work/venv/bin/python scripts/build_workflows.py [NAME ...]   # only these workflows (default: all)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support.workflow import widget_names  # noqa: E402

P = "AlignedTrainer_"
TINY_VAE = "tiny-sd15-vae.safetensors"  # the tiny SD1.5's VAE as a standalone file (tests/support/demo.py)
UI_PANELS = {P + "TrainSteps": 290, P + "Dataset": 170}  # heights of the training panel and the dataset picker


class Graph:
    def __init__(self, info: dict):
        self.info = info
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.col = 0
        self.bottom: dict[int, int] = {}  # lowest y used in each column, so nodes never overlap

    def _place(self, col: int, height: int) -> list[int]:
        y = self.bottom.get(col, 40)
        self.bottom[col] = y + height + 40
        return [40 + col * 360, y]

    def add(self, node_type: str, title: str | None = None, col: int | None = None, **widgets) -> dict:
        info = self.info[node_type]
        wnames = widget_names(self.info, node_type)
        values = []
        height = 0
        for name, control in wnames:
            spec = info["input"].get("required", {}).get(name) or info["input"].get("optional", {}).get(name)
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if name in widgets:
                v = widgets.pop(name)
            elif "default" in opts:
                v = opts["default"]
            elif isinstance(spec[0], list):
                v = spec[0][0] if spec[0] else ""
            elif spec[0] == "COMBO":
                v = (opts.get("options") or [""])[0]
            else:
                v = {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[spec[0]]
            values.append(v)
            height += 100 if opts.get("multiline") else 24
            if control:
                values.append("fixed")
        if widgets:
            raise KeyError(f"{node_type} has no widgets {sorted(widgets)}")
        widget_set = {n for n, _ in wnames}
        inputs = []
        for section in ("required", "optional"):
            for name in (info.get("input_order") or info["input"]).get(section, []):
                spec = info["input"][section][name]
                if name not in widget_set:
                    inputs.append({"name": name, "type": spec[0] if isinstance(spec[0], str) else "COMBO", "link": None})
        names = info.get("output_name") or info["output"]
        outputs = [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(zip(names, info["output"]))]
        c = self.col if col is None else col
        height += 40 + 22 * max(len(inputs), len(outputs))
        if not outputs or any(t == "IMAGE" for t in info["output"]):
            height = max(height, 280)  # room for the image preview
        height += UI_PANELS.get(node_type, 0)  # the frontend's panels (js/aligned_trainer.js)
        node = {"id": len(self.nodes) + 1, "type": node_type, "pos": self._place(c, height), "size": [320, height],
                "flags": {}, "order": len(self.nodes), "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": node_type}, "widgets_values": values, "_col": c}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def link(self, src: dict, out: str | int, dst: dict, inp: str) -> None:
        ids = self.info[src["type"]].get("_output_ids") or []
        names = [o["name"] for o in src["outputs"]]
        slot = out if isinstance(out, int) else (ids.index(out) if out in ids else names.index(out))
        dslot = next(i for i, x in enumerate(dst["inputs"]) if x["name"] == inp)
        lid = len(self.links) + 1
        ltype = src["outputs"][slot]["type"]
        self.links.append([lid, src["id"], slot, dst["id"], dslot, ltype])
        src["outputs"][slot]["links"].append(lid)
        dst["inputs"][dslot]["link"] = lid

    def move_links(self, src: dict, out: str, new_src: dict, new_out: str) -> int:
        """Re-point every link leaving ``src``'s output ``out`` to ``new_src``'s ``new_out`` (link ids and the
        inputs they feed stay as they were); the number moved."""
        slot = [o["name"] for o in src["outputs"]].index(out)
        new_slot = [o["name"] for o in new_src["outputs"]].index(new_out)
        moved = 0
        for link in self.links:
            if link[1] == src["id"] and link[2] == slot:
                link[1], link[2], link[5] = new_src["id"], new_slot, new_src["outputs"][new_slot]["type"]
                src["outputs"][slot]["links"].remove(link[0])
                new_src["outputs"][new_slot]["links"].append(link[0])
                moved += 1
        return moved

    def note(self, text: str, col: int = 0) -> dict:
        node = {"id": len(self.nodes) + 1, "type": "Note", "pos": self._place(col, 240), "size": [340, 240],
                "flags": {}, "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [],
                "properties": {}, "widgets_values": [text], "_col": col}
        self.nodes.append(node)
        return node

    def to_json(self) -> dict:
        nodes = [{k: v for k, v in n.items() if k != "_col"} for n in self.nodes]
        return {"last_node_id": len(nodes), "last_link_id": len(self.links), "nodes": nodes, "links": self.links,
                "groups": [], "config": {}, "extra": {"ds": {"scale": 0.7, "offset": [0, 0]}}, "version": 0.4}


def training_chain(g: Graph, model, clip, vae, *, folder: str, resolution: int, trigger: str, steps: int,
                   density: str, shift: str, weighting: str, lr: float, rank: int, every_n: int, prompts: str,
                   sample_steps: int, cfg: float, guidance: float, size: int, run_name: str, lora_name: str,
                   image_prefix: str, targets: str = "attention+mlp", max_side: int | None = None,
                   checkpoint_every: int = 0, train_guidance: float = 1.0, spec: str = "auto",
                   init_widgets: dict | None = None, dataset_widgets: dict | None = None,
                   sample_widgets: dict | None = None, sample_saver: dict | None = None,
                   timestep_widgets: dict | None = None, optimizer_widgets: dict | None = None,
                   lora_widgets: dict | None = None, preview_control: str | None = None) -> dict:
    g.col = 1
    te = g.add(P + "LoadAlignedTextEncoders", spec=spec)
    g.link(clip, "CLIP", te, "clip")
    ds = g.add(P + "Dataset", **{"folder": folder, "resolution": resolution,
                                 "min_side": min(resolution, 256) if resolution > 128 else 64,
                                 "max_side": max_side or resolution * 2, "bucket_step": 64, "trigger_word": trigger,
                                 "caption_variants": 1, **(dataset_widgets or {})})
    lat = g.add(P + "CacheLatents")
    g.link(ds, "dataset", lat, "dataset")
    g.link(vae, "VAE", lat, "vae")
    txt = g.add(P + "CacheTextEmbeddings")
    g.link(lat, "latents", txt, "latents")
    g.link(te, "aligned_clip", txt, "clip")
    g.col = 2
    lc = g.add(P + "LoraConfig", rank=rank, alpha=float(rank), targets=targets, **(lora_widgets or {}))
    tcfg = g.add(P + "TimestepStrategy", density=density, shift=shift, weighting=weighting, **(timestep_widgets or {}))
    oc = g.add(P + "Optimizer", learning_rate=lr, total_steps=steps, **(optimizer_widgets or {}))
    hist = g.add("PreviewImage", title="timestep density")
    g.link(tcfg, "histogram", hist, "images")
    g.col = 3
    init = g.add(P + "TrainInit", run_name=run_name, guidance=train_guidance, **(init_widgets or {}))
    g.link(model, "MODEL", init, "model")
    g.link(txt, "training_set", init, "training_set")
    g.link(lc, "lora_config", init, "lora_config")
    g.link(tcfg, "timesteps", init, "timesteps")
    g.link(oc, "optimizer_config", init, "optimizer")
    sampling = {"width": size, "height": size, **(sample_widgets or {})}
    plan = g.add(P + "PreviewPlan", prompts=prompts, every_n=every_n, steps=sample_steps, cfg=cfg, guidance=guidance,
                 **sampling)
    g.link(te, "aligned_clip", plan, "clip")
    g.link(vae, "VAE", plan, "vae")
    ts = g.add(P + "TrainSteps", steps=steps, checkpoint_every=checkpoint_every, val_every=max(1, steps // 4))
    g.link(init, "run", ts, "run")
    g.link(plan, "preview_plan", ts, "preview_plan")
    g.col = 4
    save = g.add(P + "SaveLora", name=lora_name)
    g.link(ts, "trained_run", save, "run")
    sp = g.add(P + "SamplePreview", prompts=prompts, steps=sample_steps, cfg=cfg, guidance=guidance, step=steps,
               **sampling)
    g.link(ts, "model", sp, "model")
    g.link(te, "aligned_clip", sp, "clip")
    g.link(vae, "VAE", sp, "vae")
    if preview_control:  # an edit model's previews edit this image, scaled to about 1 megapixel (the edit models'
        # training size; ComfyUI's Kontext template snaps to its preferred sizes with FluxKontextImageScale)
        img = g.add("LoadImage", title="Input image for previews", col=2, image=preview_control)
        scaled = g.add("ImageScaleToTotalPixels", col=2, upscale_method="lanczos", megapixels=1.0)
        g.link(img, "IMAGE", scaled, "image")
        g.link(scaled, "IMAGE", plan, "control_image")
        g.link(scaled, "IMAGE", sp, "control_image")
    g.col = 5
    saver = dict(sample_saver or {"type": "SaveImage"})
    si = g.add(saver.pop("type"), filename_prefix=f"{image_prefix}/sample_grid", **saver)
    g.link(sp, "grid", si, "images")
    lg = g.add(P + "LossGraph")
    g.link(ts, "trained_run", lg, "run")
    sl = g.add("SaveImage", filename_prefix=f"{image_prefix}/loss_plot")
    g.link(lg, "plot", sl, "images")
    return {"te": te, "train": ts}


TRAINING_VAE_NOTE = "Training uses this VAE: pick the VAE you will sample with"


def training_vae(g: Graph, ckpt: dict, vae_name: str) -> dict:
    """A visible Load VAE (ComfyUI's VAELoader) feeding every VAE input the checkpoint's VAE fed (latent caching,
    previews, decoding), with a Note saying so. Added last, so the graph's other node and link ids stay stable."""
    vae = g.add("VAELoader", col=0, vae_name=vae_name)
    if not g.move_links(ckpt, "VAE", vae, "VAE"):
        raise ValueError("training_vae: the checkpoint loader's VAE feeds nothing")
    g.note(TRAINING_VAE_NOTE, col=0)
    return vae


# The split-file families: loader kind -> (text-encoder file, CLIPLoader type, VAE file), the files of ComfyUI's own
# templates for them (see the family table in build()).
SPLIT_LOADERS = {
    "wan": ("umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "wan_2.1_vae.safetensors"),
    "wan22": ("umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "wan_2.1_vae.safetensors"),
    "zimage": ("qwen_3_4b.safetensors", "lumina2", "ae.safetensors"),
    "lumina2": ("gemma_2_2b_fp16.safetensors", "lumina2", "ae.safetensors"),
    "qwen_image": ("qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image", "qwen_image_vae.safetensors"),
    "chroma": ("t5xxl_fp8_e4m3fn_scaled.safetensors", "chroma", "ae.safetensors"),
    "flux2": ("mistral_3_small_flux2_fp8.safetensors", "flux2", "flux2-vae.safetensors"),
}


# HiDream's LoRA targets beyond the attention+mlp preset, as ai-toolkit's train_lora_hidream_48.yaml trains them:
# every Linear of the blocks (their adaLN modulation too) except the routed experts and the gate (ignore_if_contains)
HIDREAM_INCLUDE = r"stream_blocks\.\d+\.block\.adaLN_modulation\.1$"
HIDREAM_EXCLUDE = r"ff_i\.experts|ff_i\.gate"


FAMILY_NOTE = ("Train a {name} LoRA with the text encoders aligned to {ref}.\n\n"
               "Change for your model: the loader file names ({files}), the Dataset folder (pick or upload it on the "
               "Dataset node; it lives in ComfyUI's input folder), trigger word, resolution, steps and learning rate. The LoRA is written to "
               "models/loras/{lora}.safetensors; checkpoints live in output/aligned_trainer/runs/{run} (set Train Init's "
               "resume to 'latest' to continue a run).\n"
               "Text encoders: spec '{spec}' (or 'auto' to detect it from the CLIP). Timesteps: {ts}.")


def build(info: dict) -> dict[str, dict]:
    out = {}
    # --- the demo on the generated tiny SD1.5 ----------------------------------------------------------------
    g = Graph(info)
    g.note("Demo on a generated tiny SD1.5 (scripts/demo.py makes the model and the dataset).\n\n"
           "For a real model: pick your SD1.5 checkpoint in the loader, point Dataset at your folder, use "
           "resolution 512, ~1500 steps, lr 1e-4, rank 16, previews every 250 steps.")
    ck = g.add("CheckpointLoaderSimple", ckpt_name="tiny-sd15.safetensors")
    chain = training_chain(g, ck, ck, ck, folder="demo_dataset", resolution=64, trigger="ohwx", steps=20,
                           density="uniform", shift="model", weighting="min_snr", lr=1e-2, rank=8, every_n=10,
                           prompts="ohwx, a red circle\nohwx, a blue square", sample_steps=4, cfg=2.0, guidance=3.5,
                           size=64, run_name="demo", lora_name="demo_lora", image_prefix="demo", max_side=128,
                           targets="all-linear+conv", checkpoint_every=10)
    g.col = 5
    ab = g.add(P + "ABCompare", prompts="ohwx, a red circle, " + ", ".join(f"detail {i}" for i in range(40)),
               steps=4, cfg=2.0, width=64, height=64)
    g.link(chain["train"], "model", ab, "model")
    g.link(ck, "VAE", ab, "vae")
    g.link(chain["te"], "aligned_clip", ab, "clip_a")
    g.link(chain["te"], "unaligned_clip", ab, "clip_b")
    sab = g.add("SaveImage", filename_prefix="demo/ab_compare")
    g.link(ab, "grid", sab, "images")
    training_vae(g, ck, TINY_VAE)
    out["demo_train_tiny"] = g.to_json()

    # --- one training workflow per family (real model files) ---------------------------------------------
    fam = {
        "train_lora_sd15": dict(name="SD1.5", ref="diffusers' StableDiffusionPipeline (CLIP-L, 77 tokens, truncated)",
                                files="v1-5-pruned-emaonly.safetensors", loader="ckpt", ckpt="v1-5-pruned-emaonly.safetensors",
                                resolution=512, density="uniform", shift="model", weighting="min_snr", lr=1e-4,
                                size=512, cfg=7.0, sample_steps=25, ts="uniform with min-SNR gamma 5 (kohya default)",
                                spec="sd15"),
        # SD2.1 768-v: the checkpoint of ComfyUI's own SD2 template (embedding_example: v2-1_768-ema-pruned, sampled
        # at 768 px, 20 steps, cfg 8, uni_pc_bh2/normal); training as the SD1.5 workflow's kohya defaults (rank 16,
        # lr 1e-4, uniform timesteps, min-SNR 5) with kohya's SD2 v flags' meaning (--v2 --v_parameterization: the
        # velocity target, which the trainer takes from the model ComfyUI detected as v) at 768 px.
        "train_lora_sd2": dict(name="SD2.1 768-v", ref="diffusers' StableDiffusionPipeline (OpenCLIP-H penultimate, "
                                                       "77 tokens, truncated)",
                               files="v2-1_768-ema-pruned.safetensors", loader="ckpt",
                               ckpt="v2-1_768-ema-pruned.safetensors", resolution=768, density="uniform",
                               shift="model", weighting="min_snr", lr=1e-4, size=768, cfg=8.0, sample_steps=20,
                               ts="uniform with min-SNR gamma 5 on the velocity target (kohya --v2 "
                                  "--v_parameterization --min_snr_gamma 5)", spec="sd2x",
                               sample=dict(sampler_name="uni_pc_bh2", scheduler="normal"),
                               note="\nSD2.x 768-v predicts velocity: ComfyUI detects it from the checkpoint and the "
                                    "trainer takes its target from the model (a ModelSamplingDiscrete v_prediction "
                                    "node before Train Init does the same for a file ComfyUI reads as eps). Previews "
                                    "as ComfyUI's SD2 template: 768 px, 20 steps, cfg 8, uni_pc_bh2, normal."),
        "train_lora_sdxl": dict(name="SDXL", ref="StableDiffusionXLPipeline (both CLIPs penultimate, empty caption = zeros)",
                                files="sd_xl_base_1.0.safetensors", loader="ckpt", ckpt="sd_xl_base_1.0.safetensors",
                                resolution=1024, density="uniform", shift="model", weighting="min_snr", lr=1e-4,
                                size=1024, cfg=7.0, sample_steps=25, ts="uniform with min-SNR gamma 5", spec="sdxl",
                                init=dict(precision="bf16", gradient_checkpointing=True)),
        "train_lora_sd35": dict(name="SD3.5", ref="Stability's SD3.5 reference (T5 min 77 tokens, 226-character cap)",
                                files="sd3.5_medium.safetensors + clip_l/clip_g/t5xxl", loader="sd3",
                                ckpt="sd3.5_medium.safetensors", resolution=1024, density="logit_normal", shift="fixed",
                                weighting="none", lr=1e-4, size=1024, cfg=4.5, sample_steps=28,
                                ts="logit-normal with shift 3, as SD3 was trained", spec="sd35:medium",
                                init=dict(precision="bf16", gradient_checkpointing=True)),
        "train_lora_flux1": dict(name="FLUX.1 [dev]", ref="FluxPipeline (T5 512 tokens, no mask)",
                                 files="flux1-dev.safetensors, clip_l.safetensors, t5xxl_fp16.safetensors, ae.safetensors",
                                 loader="flux", ckpt="flux1-dev.safetensors", resolution=1024, density="logit_normal",
                                 shift="flux_resolution", weighting="none", lr=1e-4, size=1024, cfg=1.0,
                                 sample_steps=20, ts="logit-normal with FLUX's resolution-dependent shift",
                                 spec="flux1-dev", init=dict(precision="bf16", gradient_checkpointing=True)),
        # FLUX.1 Kontext [dev]: the diffusion model file of ComfyUI's flux_kontext_dev_basic template (fp8 scaled,
        # trained as loaded), FLUX.1's text encoders and VAE; image-edit training: each image of my_dataset is the
        # edited result of the control image of its file stem in my_dataset_control, its caption the instruction
        # (ai-toolkit's Kontext layout: a dataset folder and a control_path folder with the same file names)
        "train_lora_flux1_kontext": dict(
            name="FLUX.1 Kontext [dev] image-edit", ref="FluxPipeline (T5 512 tokens, no mask)",
            files="flux1-dev-kontext_fp8_scaled.safetensors, clip_l.safetensors, t5xxl_fp16.safetensors, "
                  "ae.safetensors", loader="flux", ckpt="flux1-dev-kontext_fp8_scaled.safetensors", resolution=1024,
            density="logit_normal", shift="flux_resolution", weighting="none", lr=1e-4, size=1024, cfg=1.0,
            sample_steps=20, ts="logit-normal with FLUX's resolution-dependent shift", spec="flux1-dev",
            init=dict(precision="bf16", gradient_checkpointing=True), dataset=dict(control_folder="my_dataset_control"),
            preview_control="example.png",
            note="\nImage-edit training: my_dataset holds the edited images with the edit instruction as caption, "
                 "my_dataset_control the input image of each under the same file stem (photo_01.png -> "
                 "my_dataset_control/photo_01.png); training gives the control to the model as ComfyUI's "
                 "ReferenceLatent node does. The previews edit the image of 'Input image for previews' (ComfyUI's "
                 "example.png: load one of your own inputs), scaled to 1 megapixel (ComfyUI's Kontext template "
                 "snaps to Kontext's preferred sizes with FluxKontextImageScale; swap it in for previews at exactly "
                 "those sizes); Preview Plan and Sample Preview attach it as a reference latent, as "
                 "VAE Encode -> ReferenceLatent do."),
        # Wan 2.1 T2V 1.3B: ComfyUI's own text_to_video_wan template's files; musubi-tuner's usual Wan LoRA settings
        # (rank 32, logit-normal "shift" sampling with discrete_flow_shift 3, 16 fps, 4k+1 frames); previews at the
        # template's 832x480, uni_pc/simple, cfg 6, 17 frames.
        "train_lora_wan": dict(name="Wan 2.1 T2V", ref="WanPipeline (UMT5-XXL, 512 tokens, pads zeroed)",
                               files="wan2.1_t2v_1.3B_fp16.safetensors, umt5_xxl_fp8_e4m3fn_scaled.safetensors, "
                                     "wan_2.1_vae.safetensors", loader="wan", ckpt="wan2.1_t2v_1.3B_fp16.safetensors",
                               resolution=512, max_side=832, density="logit_normal", shift="fixed", weighting="none",
                               lr=1e-4, rank=32, size=512, cfg=6.0, sample_steps=20, folder="my_videos",
                               ts="logit-normal with shift 3 (musubi-tuner's Wan setting); the model samples with "
                                  "its own shift 8", spec="wan",
                               init=dict(precision="bf16", gradient_checkpointing=True),
                               dataset=dict(kind="video", frames=33, fps=16.0, bucket_step=16),
                               sample=dict(width=832, height=480, sampler_name="uni_pc", scheduler="simple",
                                           frames=17, fps=16.0),
                               saver=dict(type="SaveAnimatedWEBP", fps=16.0),
                               note="\nVideo: the Dataset reads clips (mp4/webm/mov/mkv/gif or folders of frames, "
                                    ".txt captions) at 16 fps, 33 frames each (Wan takes 4k+1); still images train "
                                    "as one frame; set frame_buckets (e.g. 17, 33) to train each clip at the longest count it covers. "
                                    "Previews are 17-frame clips saved as animated WebP in the output "
                                    "folder. See docs/video.md."),
        # Wan 2.2 T2V A14B, one expert per run: ComfyUI's own video_wan2_2_14B_t2v template's files (high-noise
        # expert, UMT5 fp8, Wan 2.1 VAE; it samples both experts at ModelSamplingSD3 shift 8, 20 steps, cfg 3.5,
        # euler/simple, the high-noise expert for the first half). Training: rank 32 / alpha 32 (ai-toolkit
        # config/examples/train_lora_wan22_14b_24gb.yaml linear 32/32; musubi-tuner docs/wan.md network_dim 32), lr
        # 1e-4 and weight decay 1e-4 (ai-toolkit), uniform timesteps on the model's shift 8 kept in the expert's
        # window (musubi-tuner docs/wan.md: --min_timestep 875 --max_timestep 1000 --preserve_distribution_shape for
        # the T2V high-noise expert, 0-875 for the low-noise one), 16 fps clips (musubi-tuner docs/dataset_config.md)
        # of 33 frames (4k+1), 512 px area in 16 px buckets.
        "train_lora_wan22": dict(name="Wan 2.2 T2V A14B expert", ref="WanPipeline (UMT5-XXL, 512 tokens, pads zeroed)",
                                 files="wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors (or the low_noise one), "
                                       "umt5_xxl_fp8_e4m3fn_scaled.safetensors, wan_2.1_vae.safetensors",
                                 loader="wan22", ckpt="wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
                                 unet_title="Wan 2.2 expert (high_noise; low_noise for the other LoRA)",
                                 resolution=512, max_side=832, density="uniform", shift="model", weighting="none",
                                 lr=1e-4, rank=32, size=640, cfg=3.5, sample_steps=20, folder="my_videos",
                                 ts="uniform on the model's shift 8, inside the expert's window (Timestep Strategy "
                                    "expert)", spec="wan",
                                 init=dict(precision="bf16", gradient_checkpointing=True),
                                 timesteps=dict(expert="high_noise", expert_boundary=0.0,
                                                title="Timestep Strategy (expert: high_noise)"),
                                 optimizer=dict(weight_decay=1e-4),
                                 dataset=dict(kind="video", frames=33, fps=16.0, bucket_step=16),
                                 sample=dict(width=640, height=640, sampler_name="euler", scheduler="simple",
                                             frames=17, fps=16.0),
                                 saver=dict(type="SaveAnimatedWEBP", fps=16.0),
                                 note="\n\nWan 2.2 A14B is two models, split at the official T2V boundary 0.875 "
                                      "(Wan2.2 wan_t2v_A14B.py; train/experts.json): the high-noise expert denoises "
                                      "sigma >= 0.875, the low-noise expert the rest. Each expert is trained as its "
                                      "own LoRA, on its own part of the schedule. This workflow trains the "
                                      "high-noise expert (loader: the high_noise file; Timestep Strategy: expert "
                                      "high_noise, expert_boundary 0 = the official boundary; Train Init says what "
                                      "it took). To train the other: load "
                                      "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors, set expert to low_noise and "
                                      "rename the run and the LoRA (e.g. wan22_low_lora); then load each LoRA on its "
                                      "expert in ComfyUI's Wan 2.2 template.\n"
                                      "Settings of the reference trainers: rank 32 / alpha 32 and lr 1e-4 "
                                      "(ai-toolkit train_lora_wan22_14b_24gb.yaml; musubi-tuner docs/wan.md "
                                      "network_dim 32); uniform timesteps kept in the expert's window = musubi-tuner's "
                                      "--min_timestep 875 --max_timestep 1000 --preserve_distribution_shape (0-875 "
                                      "for the low-noise expert), on the model's shift 8 as the template samples; "
                                      "clips at 16 fps (musubi-tuner's Wan rate), 33 frames; previews as the template "
                                      "(euler, simple, cfg 3.5, 640 px, 17 frames). A preview runs the whole "
                                      "schedule on the one expert, so the high-noise expert's previews stay rough "
                                      "(it never learns the clean end). 14B on 24 GB: Train Init's quantize int8 "
                                      "or offload_blocks (ai-toolkit quantizes it to 4 bits). See docs/video.md."),
        # HunyuanVideo 1.5 T2V: ComfyUI's own video_hunyuan_video_1.5_720p_t2v template's files (720p T2V DiT fp16,
        # DualCLIPLoader type hunyuan_video_15 with Qwen2.5-VL 7B fp8 + byT5-small glyph, the HV1.5 VAE); it samples
        # 20 steps euler/simple, cfg 6, on the model's shift 7 (ModelSamplingSD3 7) and saves at 24 fps. Training as
        # musubi-tuner's docs/hunyuan_video_1_5.md T2V command: --timestep_sampling flux_shift (sigmoid of a normal
        # draw shifted by FLUX's resolution mu from the latent's (h // 2) * (w // 2): our sigmoid + flux_resolution),
        # --weighting_scheme none, lr 1e-4 (adamw8bit there), --network_dim 32, bf16, gradient checkpointing. Clips
        # of 33 frames (4k+1) at 24 fps, 512 px area in 16 px buckets (the VAE's 16x); previews 17 frames at
        # 848x480 (EmptyHunyuanVideo15Latent's default size).
        "train_lora_hunyuan_video15": dict(
            name="HunyuanVideo 1.5 T2V", ref="HunyuanVideo15Pipeline (Qwen2.5-VL under its chat template, "
            "hidden_states[-3], 1000 tokens; byT5 of the quoted text)",
            files="hunyuanvideo1.5_720p_t2v_fp16.safetensors, qwen_2.5_vl_7b_fp8_scaled.safetensors, "
                  "byt5_small_glyphxl_fp16.safetensors, hunyuanvideo15_vae_fp16.safetensors",
            loader="hunyuan_video15", ckpt="hunyuanvideo1.5_720p_t2v_fp16.safetensors", resolution=512, max_side=848,
            density="sigmoid", shift="flux_resolution", weighting="none", lr=1e-4, rank=32, size=512, cfg=6.0,
            sample_steps=20, folder="my_videos",
            ts="sigmoid with FLUX's resolution shift (musubi-tuner's flux_shift); the model samples with its own "
               "shift 7", spec="hunyuan-video-1.5:unpadded",
            init=dict(precision="bf16", gradient_checkpointing=True),
            dataset=dict(kind="video", frames=33, fps=24.0, bucket_step=16),
            sample=dict(width=848, height=480, sampler_name="euler", scheduler="simple", frames=17, fps=24.0),
            saver=dict(type="SaveAnimatedWEBP", fps=24.0),
            note="\nVideo: the Dataset reads clips (mp4/webm/mov/mkv/gif or folders of frames, .txt captions) at "
                 "24 fps (HunyuanVideo 1.5's rate: ComfyUI's template saves at 24), 33 frames each (4k+1); still "
                 "images train as one frame. Quoted text in a caption (\"OPEN\") also goes to byT5, as the "
                 "pipeline does. Settings of musubi-tuner's HunyuanVideo 1.5 T2V example (docs/hunyuan_video_1_5.md): "
                 "flux_shift timesteps, no weighting, lr 1e-4, network_dim 32, bf16 with gradient checkpointing "
                 "(alpha 32 here, as the other workflows; musubi-tuner's default network_alpha is 1). Previews: "
                 "17 frames at 848x480, 20 steps, euler, simple, cfg 6 (ComfyUI's template: 121 frames at "
                 "1280x720). Text-to-video only (no image conditioning). See docs/video.md."),
        # Z-Image Turbo: ComfyUI's own image_z_image_turbo template's files (CLIPLoader type lumina2 for its
        # Qwen3-4B); previews as that template samples (9 steps, cfg 1, res_multistep/simple). Training settings as
        # ai-toolkit trains the DiT families (rank 16, lr 1e-4, sigmoid = logit-normal timesteps, bf16 with
        # checkpointing); the shift is the model's own (3.0, ComfyUI's ZImage sampling settings).
        "train_lora_zimage": dict(name="Z-Image Turbo", ref="ZImagePipeline (Qwen3 chat template, hidden_states[-2], "
                                  "512 tokens, padding dropped)",
                                  files="z_image_turbo_bf16.safetensors, qwen_3_4b.safetensors, ae.safetensors",
                                  loader="zimage", ckpt="z_image_turbo_bf16.safetensors", resolution=1024,
                                  density="sigmoid", shift="model", weighting="none", lr=1e-4, size=1024, cfg=1.0,
                                  sample_steps=9, ts="sigmoid (logit-normal) with the model's shift 3",
                                  spec="z-image", init=dict(precision="bf16", gradient_checkpointing=True),
                                  sample=dict(sampler_name="res_multistep", scheduler="simple"),
                                  note="\nZ-Image Turbo is step-distilled: a LoRA trained on it directly slowly "
                                       "undoes the distillation (ai-toolkit trains it through a de-distillation "
                                       "adapter, which this pack does not have); keep runs short, or train on a "
                                       "non-distilled Z-Image when one is available."),
        # Qwen-Image: ComfyUI's own image_qwen_image template's files (the fp8 e4m3fn DiT, which trains as loaded;
        # CLIPLoader type qwen_image); previews as that template samples (20 steps, cfg 2.5, euler/simple). Training
        # as ai-toolkit's config/examples/train_lora_qwen_image_24gb.yaml (rank 16, alpha 16, lr 1e-4, bf16,
        # checkpointing, caption dropout 0.05) and seed 003's advice (sigmoid timesteps); the shift is musubi-tuner's
        # Qwen-Image default (docs/qwen_image.md: --timestep_sampling shift --discrete_flow_shift 2.2, about the
        # official resolution-dependent shift at 1328 px).
        "train_lora_qwen_image": dict(name="Qwen-Image", ref="QwenImagePipeline (Qwen2.5-VL under its system prompt, "
                                      "the first 34 template tokens dropped, 512 tokens, last layer)",
                                      files="qwen_image_fp8_e4m3fn.safetensors, qwen_2.5_vl_7b_fp8_scaled.safetensors, "
                                            "qwen_image_vae.safetensors",
                                      loader="qwen_image", ckpt="qwen_image_fp8_e4m3fn.safetensors", resolution=1024,
                                      density="sigmoid", shift="fixed", weighting="none", lr=1e-4, size=1024, cfg=2.5,
                                      sample_steps=20, ts="sigmoid (logit-normal) with shift 2.2 (musubi-tuner's "
                                                          "Qwen-Image default)",
                                      spec="qwen-image", timesteps=dict(shift_value=2.2),
                                      init=dict(precision="bf16", gradient_checkpointing=True),
                                      dataset=dict(caption_dropout=0.05),
                                      sample=dict(sampler_name="euler", scheduler="simple"),
                                      note="\nThe DiT file is ComfyUI's fp8 e4m3fn one: it trains as loaded (the LoRA "
                                           "trains in bf16 and applies to the bf16 model too), and a 20B model fits a "
                                           "24 GB card this way (docs/memory.md). The LoRA is written with "
                                           "musubi-tuner's key names and metadata."),
        # Qwen-Image-Edit: ComfyUI's own image_qwen_image_edit template's files (its fp8 e4m3fn edit DiT, trained as
        # loaded; Qwen-Image's CLIPLoader type qwen_image text encoder and VAE); the aligned qwen-image-edit spec encodes
        # each caption with its control image in the text. Training as ai-toolkit's
        # config/examples/train_lora_qwen_image_edit_32gb.yaml (rank 16, alpha 16, lr 1e-4, bf16, checkpointing,
        # caption dropout 0.05, timestep_type 'weighted', a control_path folder of same-named images); the shift is
        # musubi-tuner's Qwen-Image default (docs/qwen_image.md: shift + --discrete_flow_shift, qwen_shift about 2.2
        # at 1328 px). Previews as the template's fp8 row samples (20 steps, cfg 2.5, euler/simple), editing a 1 MP
        # input image as its ImageScaleToTotalPixels does.
        "train_lora_qwen_image_edit": dict(
            name="Qwen-Image-Edit", ref="QwenImageEditPipeline (Qwen2.5-VL reading the input image under its edit "
                                        "system prompt, the first 64 template tokens dropped, last layer)",
            files="qwen_image_edit_fp8_e4m3fn.safetensors, qwen_2.5_vl_7b_fp8_scaled.safetensors, "
                  "qwen_image_vae.safetensors",
            loader="qwen_image", ckpt="qwen_image_edit_fp8_e4m3fn.safetensors", resolution=1024,
            density="linear", shift="fixed", weighting="weighted", lr=1e-4, size=1024, cfg=2.5, sample_steps=20,
            ts="linear timesteps with ai-toolkit's 'weighted' loss weight, shift 2.2 (musubi-tuner's Qwen-Image "
               "default)",
            spec="qwen-image-edit", timesteps=dict(shift_value=2.2),
            init=dict(precision="bf16", gradient_checkpointing=True),
            dataset=dict(caption_dropout=0.05, control_folder="my_dataset_control"),
            sample=dict(sampler_name="euler", scheduler="simple"), preview_control="example.png",
            note="\nImage-edit training: my_dataset holds the edited images with the edit instruction as caption, "
                 "my_dataset_control the input image of each under the same file stem. The qwen-image-edit spec "
                 "encodes every caption (and the empty caption of dropout) with its control image in the text, as "
                 "QwenImageEditPipeline does, and the control also reaches the DiT as a reference latent. The "
                 "previews edit 'Input image for previews' (ComfyUI's example.png: load one of your own inputs), "
                 "scaled to 1 megapixel as the template does; every preview prompt and the negative are encoded "
                 "with it. Settings: ai-toolkit's Qwen-Image-Edit example (rank 16, lr 1e-4, bf16, 'weighted' "
                 "timesteps, caption dropout 0.05); the shift 2.2 is musubi-tuner's Qwen-Image value, not checked "
                 "for Edit; previews at the template's fp8 settings (20 steps, cfg 2.5) without its CFGNorm and "
                 "ModelSamplingAuraFlow nodes. Vision tokens make each caption about 1300 tokens longer: text "
                 "caching takes longer than for Qwen-Image."),
        # Lumina-Image 2.0: Comfy-Org's repackaged split files (CLIPLoader type lumina2 for Gemma-2 2B; FLUX's ae).
        # Training as kohya sd-scripts' docs/lumina_train_network.md example: rank 8, alpha 8, lr 1e-4, bf16,
        # checkpointing, --timestep_sampling nextdit_shift (uniform timesteps with FLUX's resolution-dependent shift,
        # library/lumina_train_util.py: our uniform + flux_resolution). Previews as ComfyUI's Lumina 2 template
        # (image_netayume_lumina_t2i) samples: 30 steps, cfg 4, res_multistep/simple.
        "train_lora_lumina2": dict(name="Lumina-Image 2.0", ref="Lumina2Pipeline (Gemma-2 on its system prompt, 256 "
                                   "tokens with masks, penultimate layer)",
                                   files="lumina_2_model_bf16.safetensors, gemma_2_2b_fp16.safetensors, ae.safetensors",
                                   loader="lumina2", ckpt="lumina_2_model_bf16.safetensors", resolution=1024,
                                   density="uniform", shift="flux_resolution", weighting="none", lr=1e-4, rank=8,
                                   size=1024, cfg=4.0, sample_steps=30,
                                   ts="uniform with FLUX's resolution shift (kohya's nextdit_shift)", spec="lumina2",
                                   init=dict(precision="bf16", gradient_checkpointing=True),
                                   sample=dict(sampler_name="res_multistep", scheduler="simple"),
                                   note="\nThe LoRA is written with kohya sd-scripts' Lumina key names "
                                        "(lora_unet_layers_N_attention_qkv...) and metadata."),
        # Chroma1-HD: ComfyUI's own image_chroma_text_to_image template's files (CLIPLoader type chroma, T5 fp8);
        # training as ai-toolkit's config/examples/train_lora_chroma_24gb.yaml (rank 16, alpha 16, lr 1e-4, EMA
        # 0.99, bf16, checkpointing; its default sigmoid timesteps); previews with guidance 4, 25 steps as there.
        "train_lora_chroma": dict(name="Chroma1-HD", ref="ChromaPipeline (T5 512 tokens with its mask, one pad "
                                  "token kept visible)",
                                  files="Chroma1-HD-fp8_scaled_rev2.safetensors, t5xxl_fp8_e4m3fn_scaled.safetensors, "
                                        "ae.safetensors",
                                  loader="chroma", ckpt="Chroma1-HD-fp8_scaled_rev2.safetensors", resolution=1024,
                                  density="sigmoid", shift="model", weighting="none", lr=1e-4, size=1024, cfg=4.0,
                                  sample_steps=25, ts="sigmoid (logit-normal), as ai-toolkit trains Chroma",
                                  spec="chroma", init=dict(precision="bf16", gradient_checkpointing=True,
                                                           ema_decay=0.99)),
        # HiDream-I1 Full: Comfy-Org's HiDream-I1_ComfyUI split files (the fp8 DiT, which trains as loaded;
        # QuadrupleCLIPLoader: CLIP-L, CLIP-G, T5-XXL, Llama-3.1-8B; FLUX's ae). ComfyUI 0.3.75's HiDream config
        # leaves the model's shift at 1.0 (its sampling_settings {"shift": 3.0} is overwritten by an empty dict), so
        # ModelSamplingSD3 sets HiDream-I1 Full's 3.0 (HiDream-I1 inference.py MODEL_CONFIGS "full": shift 3.0,
        # FlowUniPCMultistepScheduler, guidance 5.0; ai-toolkit's hidream scheduler_config shift 3.0) for training
        # and previews. Training as ai-toolkit's config/examples/train_lora_hidream_48.yaml: rank 32 / alpha 32, lr
        # 2e-4, caption dropout 0.05, bf16, gradient checkpointing, timestep_type shift (uniform timesteps on the
        # shift 3 schedule); its LoRA covers every Linear of double_/single_stream_blocks (transformer_only: the
        # attention of both streams, the SwiGLU MLPs and the blocks' adaLN modulation) except the routed experts
        # and the MoE gate (ignore_if_contains ff_i.experts, ff_i.gate): here the attention+mlp preset, the
        # modulation by include and the experts by exclude. Previews: cfg 5, uni_pc / simple (the Full model's
        # scheduler and guidance), 25 steps (ai-toolkit's sample_steps).
        "train_lora_hidream": dict(name="HiDream-I1 Full", ref="HiDreamImagePipeline (CLIP-L and CLIP-G pooled, "
                                   "T5 128 tokens, Llama-3.1 hidden states of every layer, 128 tokens)",
                                   files="hidream_i1_full_fp8.safetensors, clip_l_hidream.safetensors, "
                                         "clip_g_hidream.safetensors, t5xxl_fp8_e4m3fn_scaled.safetensors, "
                                         "llama_3.1_8b_instruct_fp8_scaled.safetensors, ae.safetensors",
                                   loader="hidream", ckpt="hidream_i1_full_fp8.safetensors", resolution=1024,
                                   density="uniform", shift="model", weighting="none", lr=2e-4, rank=32, size=1024,
                                   cfg=5.0, sample_steps=25,
                                   ts="uniform on the shift 3 schedule that ModelSamplingSD3 sets (ai-toolkit's "
                                      "timestep_type shift)", spec="hidream",
                                   init=dict(precision="bf16", gradient_checkpointing=True),
                                   dataset=dict(caption_dropout=0.05),
                                   lora=dict(include=HIDREAM_INCLUDE, exclude=HIDREAM_EXCLUDE),
                                   sample=dict(sampler_name="uni_pc", scheduler="simple"),
                                   note="\nModelSamplingSD3 sets shift 3.0, HiDream-I1 Full's (ComfyUI 0.3.75 loads "
                                        "HiDream at shift 1.0); it feeds Train Init, so training and previews use "
                                        "it. As ai-toolkit, the LoRA trains every Linear of the double- and "
                                        "single-stream blocks except the mixture's routed experts (LoRA Config "
                                        "exclude; the gate is no layer); train only on Full (Dev and Fast are "
                                        "distilled). The LoRA is written in ai-toolkit's layout (peft pairs under "
                                        "diffusion_model.), which ComfyUI and diffusers' HiDreamImagePipeline "
                                        "load."),
        # FLUX.2 [dev]: the files of ComfyUI's own image_flux2_fp8 template (comfyui-workflow-templates-media-image
        # templates/image_flux2_fp8.json: UNETLoader flux2_dev_fp8mixed, which trains as loaded; CLIPLoader
        # mistral_3_small_flux2_fp8 type flux2; VAELoader flux2-vae); previews as that template samples: guidance 4
        # (FluxGuidance), cfg 1 (BasicGuider), euler, 20 steps at 1024 px. Training as ai-toolkit's FLUX.2 job
        # defaults (ui/src/app/jobs/new/options.ts arch 'flux2': timestep_type 'weighted', qfloat8; jobConfig.ts:
        # linear 32 / alpha 32, lr 1e-4, bf16, gradient checkpointing, caption dropout 0.05): its 'weighted' is
        # linear timesteps with a bell-shaped loss weight (our linear + weighted); the shift is FLUX.2's own
        # resolution rule (diffusers Flux2Pipeline compute_empirical_mu at its default 50 steps: 2.02 at 1024 px, as
        # ComfyUI's Flux2 config), where ai-toolkit's FLUX.2 train scheduler keeps FLUX.1's linear constants.
        "train_lora_flux2": dict(name="FLUX.2 [dev]", ref="Flux2Pipeline (Mistral-Small-3.1 hidden states 10/20/30 "
                                 "under its system message, 512 tokens)",
                                 files="flux2_dev_fp8mixed.safetensors, mistral_3_small_flux2_fp8.safetensors, "
                                       "flux2-vae.safetensors",
                                 loader="flux2", ckpt="flux2_dev_fp8mixed.safetensors", resolution=1024,
                                 density="linear", shift="flux_resolution", weighting="weighted", lr=1e-4, rank=32,
                                 size=1024, cfg=1.0, guidance=4.0, sample_steps=20,
                                 ts="linear timesteps with ai-toolkit's 'weighted' bell-shaped loss weight, on "
                                    "FLUX.2's own resolution shift (Flux2Pipeline's empirical mu)",
                                 spec="flux2-dev", init=dict(precision="bf16", gradient_checkpointing=True),
                                 dataset=dict(caption_dropout=0.05),
                                 sample=dict(sampler_name="euler", scheduler="simple"),
                                 note="\nFiles: ComfyUI's FLUX.2 [dev] template (image_flux2_fp8); the fp8 DiT trains "
                                      "as loaded. Settings: ai-toolkit's FLUX.2 defaults (rank 32, lr 1e-4, bf16, "
                                      "'weighted' timesteps, caption dropout 0.05); the shift is FLUX.2's own "
                                      "per-resolution rule (2.02 at 1024 px; ai-toolkit's FLUX.2 scheduler keeps "
                                      "FLUX.1's constants). Previews as the template: guidance 4, euler, 20 steps "
                                      "(on the model's shift 2.02; the template's Flux2Scheduler gives the same mu at "
                                      "1024 px and 50 steps). The LoRA is written in ai-toolkit's FLUX.2 layout (peft "
                                      "pairs under diffusion_model.), which ComfyUI and diffusers' Flux2Pipeline "
                                      "load. For image-edit LoRAs with reference images, set the Dataset's "
                                      "control_folder (as the FLUX.1 Kontext workflow)."),
    }
    for wid, f in fam.items():
        g = Graph(info)
        run = wid.replace("train_lora_", "") + "_lora"
        g.note(FAMILY_NOTE.format(name=f["name"], ref=f["ref"], files=f["files"], lora=run, run=run, ts=f["ts"],
                                 spec=f["spec"]) + f.get("note", ""))
        if f["loader"] == "ckpt":
            m = c = v = g.add("CheckpointLoaderSimple", ckpt_name=f["ckpt"])
        elif f["loader"] == "sd3":
            m = v = g.add("CheckpointLoaderSimple", ckpt_name=f["ckpt"])
            c = g.add("TripleCLIPLoader", clip_name1="clip_l.safetensors", clip_name2="clip_g.safetensors",
                      clip_name3="t5xxl_fp16.safetensors")
        elif f["loader"] == "hidream":  # as ComfyUI's HiDream example: four text encoders, shift set on the model
            u = g.add("UNETLoader", unet_name=f["ckpt"])
            c = g.add("QuadrupleCLIPLoader", clip_name1="clip_l_hidream.safetensors",
                      clip_name2="clip_g_hidream.safetensors", clip_name3="t5xxl_fp8_e4m3fn_scaled.safetensors",
                      clip_name4="llama_3.1_8b_instruct_fp8_scaled.safetensors")
            v = g.add("VAELoader", vae_name="ae.safetensors")
            m = g.add("ModelSamplingSD3", title="ModelSamplingSD3 (HiDream-I1 Full: shift 3)", shift=3.0)
            g.link(u, "MODEL", m, "model")
        elif f["loader"] == "hunyuan_video15":  # as ComfyUI's HunyuanVideo 1.5 template: Qwen2.5-VL + byT5
            m = g.add("UNETLoader", unet_name=f["ckpt"])
            c = g.add("DualCLIPLoader", clip_name1="qwen_2.5_vl_7b_fp8_scaled.safetensors",
                      clip_name2="byt5_small_glyphxl_fp16.safetensors", type="hunyuan_video_15")
            v = g.add("VAELoader", vae_name="hunyuanvideo15_vae_fp16.safetensors")
        elif f["loader"] in SPLIT_LOADERS:  # UNETLoader + CLIPLoader(type) + VAELoader, as ComfyUI's templates
            clip_name, clip_type, vae_name = SPLIT_LOADERS[f["loader"]]
            m = g.add("UNETLoader", title=f.get("unet_title"), unet_name=f["ckpt"])
            c = g.add("CLIPLoader", clip_name=clip_name, type=clip_type)
            v = g.add("VAELoader", vae_name=vae_name)
        else:
            m = g.add("UNETLoader", unet_name=f["ckpt"])
            c = g.add("DualCLIPLoader", clip_name1="clip_l.safetensors", clip_name2="t5xxl_fp16.safetensors", type="flux")
            v = g.add("VAELoader", vae_name="ae.safetensors")
        training_chain(g, m, c, v, folder=f.get("folder", "my_dataset"), resolution=f["resolution"], trigger="ohwx",
                       steps=1500, density=f["density"], shift=f["shift"], weighting=f["weighting"], lr=f["lr"],
                       rank=f.get("rank", 16), every_n=250, prompts="ohwx, a photo", sample_steps=f["sample_steps"],
                       cfg=f["cfg"], guidance=f.get("guidance", 3.5), size=f["size"], run_name=run, lora_name=run,
                       image_prefix=run,
                       checkpoint_every=250, spec=f["spec"], init_widgets=f.get("init"), max_side=f.get("max_side"),
                       dataset_widgets=f.get("dataset"), sample_widgets=f.get("sample"), sample_saver=f.get("saver"),
                       timestep_widgets=f.get("timesteps"), optimizer_widgets=f.get("optimizer"),
                       lora_widgets=f.get("lora"), preview_control=f.get("preview_control"))
        out[wid] = g.to_json()

    # --- A/B aligned vs unaligned, and the alignment report (tiny SD1.5 names; swap in your checkpoint) --------
    g = Graph(info)
    g.note("A/B: the same prompts, seed and noise through the aligned and the unaligned (ComfyUI default) text "
           "encoders. Pick your checkpoint; long prompts show the difference most for SD1.5/SDXL (truncation vs "
           "chunking), any prompt for FLUX (T5 512 vs 256).")
    ck = g.add("CheckpointLoaderSimple", ckpt_name="tiny-sd15.safetensors")
    g.col = 1
    te = g.add(P + "LoadAlignedTextEncoders", spec="auto")
    g.link(ck, "CLIP", te, "clip")
    ab = g.add(P + "ABCompare", prompts="a red circle\n" + "a red circle, " + ", ".join(f"detail {i}" for i in range(40)),
               steps=4, cfg=2.0, width=64, height=64)
    for s_, o, i in ((ck, "MODEL", "model"), (ck, "VAE", "vae"), (te, "aligned_clip", "clip_a"), (te, "unaligned_clip", "clip_b")):
        g.link(s_, o, ab, i)
    g.col = 2
    pv = g.add("SaveImage", filename_prefix="ab/aligned_vs_unaligned")
    g.link(ab, "grid", pv, "images")
    out["ab_aligned_vs_unaligned"] = g.to_json()

    g = Graph(info)
    g.note("Text-encoder alignment report: tokens used and truncated, cosine of sequence and pooled embeddings, "
           "norms and padding statistics of the aligned vs the default encoder. Token Inspector checks a trigger "
           "word. Pick your checkpoint (or a CLIP loader for FLUX/SD3).")
    ck = g.add("CheckpointLoaderSimple", ckpt_name="tiny-sd15.safetensors")
    g.col = 1
    te = g.add(P + "LoadAlignedTextEncoders", spec="auto")
    g.link(ck, "CLIP", te, "clip")
    rep = g.add(P + "TextEncoderAlignmentReport",
                prompts="a photo of a cat\n\n" + "a photo, " + ", ".join(f"detail {i}" for i in range(40)))
    g.link(te, "aligned_clip", rep, "clip_a")
    g.link(te, "unaligned_clip", rep, "clip_b")
    tok = g.add(P + "TokenInspector", text="ohwx, a photo of a dog", trigger_word="ohwx")
    g.link(te, "aligned_clip", tok, "clip")
    g.col = 2
    pv = g.add("SaveImage", filename_prefix="report/alignment")
    g.link(rep, "table", pv, "images")
    out["te_alignment_report"] = g.to_json()

    # --- A/B training experiment: the same data and seed, aligned vs unaligned text encoders -------------------
    g = Graph(info)
    g.note("A/B training: the same dataset, LoRA, timesteps, optimizer and seed, trained twice: run A with the "
           "aligned text encoders (captions read literally, as the official trainers read them), run B with "
           "ComfyUI's default CLIP. A/B Training Report draws both validation-loss curves on one chart and a "
           "sample grid (rows: aligned LoRA + aligned CLIP, unaligned LoRA + unaligned CLIP, and the crossed "
           "pairs); its 'record' output lists where the two runs' configs differ (only the run name and the text "
           "encoder). Runs on the tiny SD1.5 demo; pick your checkpoint and dataset for a real comparison.")
    ck = g.add("CheckpointLoaderSimple", ckpt_name="tiny-sd15.safetensors")
    g.col = 1
    te = g.add(P + "LoadAlignedTextEncoders", spec="auto")
    g.link(ck, "CLIP", te, "clip")
    ds = g.add(P + "Dataset", folder="demo_dataset", resolution=64, min_side=64, max_side=128, bucket_step=64,
               trigger_word="ohwx", caption_variants=1)
    lat = g.add(P + "CacheLatents")
    g.link(ds, "dataset", lat, "dataset")
    g.link(ck, "VAE", lat, "vae")
    g.col = 2
    lc = g.add(P + "LoraConfig", rank=8, alpha=8.0, targets="attention+mlp")
    tcfg = g.add(P + "TimestepStrategy", density="uniform", shift="model", weighting="min_snr")
    oc = g.add(P + "Optimizer", learning_rate=1e-2, total_steps=8)
    runs = {}
    for k, (label, out_name) in enumerate((("aligned", "aligned_clip"), ("unaligned", "unaligned_clip"))):
        g.col = 3 + k
        txt = g.add(P + "CacheTextEmbeddings", title=f"Cache Text Embeddings ({label})")
        g.link(lat, "latents", txt, "latents")
        g.link(te, out_name, txt, "clip")
        init = g.add(P + "TrainInit", title=f"Train Init ({label})", run_name=f"ab_{label}", seed=0)
        for s_, o, i in ((ck, "MODEL", "model"), (txt, "training_set", "training_set"), (lc, "lora_config", "lora_config"),
                         (tcfg, "timesteps", "timesteps"), (oc, "optimizer_config", "optimizer")):
            g.link(s_, o, init, i)
        ts = g.add(P + "TrainSteps", title=f"Train Steps ({label})", steps=8, val_every=4)
        g.link(init, "run", ts, "run")
        save = g.add(P + "SaveLora", title=f"Save LoRA ({label})", name=f"ab_{label}_lora")
        g.link(ts, "trained_run", save, "run")
        runs[label] = ts
    g.col = 5
    rep = g.add(P + "ABTrainingReport", prompts="ohwx, a red circle\nohwx, a blue square", steps=2, cfg=2.0,
                width=64, height=64)
    for s_, o, i in ((runs["aligned"], "trained_run", "run_a"), (runs["unaligned"], "trained_run", "run_b"),
                     (runs["aligned"], "model", "model_a"), (runs["unaligned"], "model", "model_b"),
                     (te, "aligned_clip", "clip_a"), (te, "unaligned_clip", "clip_b"), (ck, "VAE", "vae")):
        g.link(s_, o, rep, i)
    g.col = 6
    for o, name in (("loss_chart", "validation_loss"), ("grid", "lora_clip_grid")):
        si = g.add("SaveImage", filename_prefix=f"ab_training/{name}")
        g.link(rep, o, si, "images")
    training_vae(g, ck, TINY_VAE)
    out["ab_training_aligned_vs_unaligned"] = g.to_json()

    # --- dataset tools: anti-AI-filter cleaning and the VAE round-trip (kohya LoRA guide) ------------------------
    g = Graph(info)
    g.note("Dataset tools from the kohya LoRA guide, before you train.\n\n"
           "Clean Dataset re-filters every image into a cleaned copy in output/aligned_trainer/cache/cleaned (your "
           "files are never written): against anti-AI noise, dithering and fine repeating motifs. Its report flags "
           "suspect images; compare before/after, since cleaning also softens real fine detail.\n\n"
           "VAE Round-Trip encodes and decodes each image as training sees it and lists PSNR/SSIM worst first: a "
           "LoRA learns the decoded image. Load VAE feeds both VAE Round-Trip and Cache Latents: pick the VAE you "
           "will sample with. Runs on the tiny SD1.5 demo; pick your checkpoint, its VAE and your dataset.")
    ck = g.add("CheckpointLoaderSimple", ckpt_name="tiny-sd15.safetensors")
    g.col = 1
    ds = g.add(P + "Dataset", folder="demo_dataset", resolution=64, min_side=64, max_side=128, bucket_step=64,
               trigger_word="ohwx", caption_variants=1)
    g.col = 2
    cl = g.add(P + "CleanDataset", preview_rows=4)
    g.link(ds, "dataset", cl, "dataset")
    g.col = 3
    rt = g.add(P + "VAERoundTrip", preview_rows=4)
    g.link(cl, "cleaned", rt, "dataset")
    g.link(ck, "VAE", rt, "vae")
    lat = g.add(P + "CacheLatents", title="Cache Latents (train on the cleaned set with this VAE)")
    g.link(cl, "cleaned", lat, "dataset")
    g.link(ck, "VAE", lat, "vae")
    g.col = 4
    for src, o, name in ((cl, "before_after", "cleaning"), (rt, "grid", "vae_roundtrip")):
        si = g.add("SaveImage", filename_prefix=f"dataset_tools/{name}")
        g.link(src, o, si, "images")
    for src in (cl, rt):
        pa = g.add("PreviewAny", title="Report")
        g.link(src, "report", pa, "source")
    training_vae(g, ck, TINY_VAE)
    out["dataset_tools"] = g.to_json()

    # --- token heatmaps (DAAM) ---------------------------------------------------------------------------------
    g = Graph(info)
    g.note("Token heatmaps (DAAM): where each chosen word of the prompt acts in the image, from the cross-attention "
           "maps summed over heads, layers and sampling steps. The image is the one a plain KSampler gives.\n\n"
           "Use it to see whether a trigger word bleeds into the outfit or the background: put a LoRA loader "
           "before the model input, and compare the aligned and the default encoder (Load Aligned Text Encoders' "
           "two outputs). UNet models (SD1.x, SD2.x, SDXL). Runs on the tiny SD1.5 demo; pick your checkpoint.")
    ck = g.add("CheckpointLoaderSimple", ckpt_name="tiny-sd15.safetensors")
    g.col = 1
    te = g.add(P + "LoadAlignedTextEncoders", spec="auto")
    g.link(ck, "CLIP", te, "clip")
    g.col = 2
    hm = g.add(P + "TokenHeatmaps", prompt="ohwx, a red circle on a blue background", words="ohwx, circle, background",
               steps=4, cfg=2.0, width=64, height=64)
    for s_, o, i in ((ck, "MODEL", "model"), (te, "aligned_clip", "clip"), (ck, "VAE", "vae")):
        g.link(s_, o, hm, i)
    g.col = 3
    si = g.add("SaveImage", filename_prefix="heatmaps/tokens")
    g.link(hm, "grid", si, "images")
    out["token_heatmaps"] = g.to_json()

    # --- concept slider (LECO): a LoRA from prompts alone ----------------------------------------------------
    g = Graph(info)
    g.note("Concept slider (LECO): a LoRA trained from prompts alone, no images. At +strength it moves the target "
           "prompt toward the positive prompt, at -strength toward the negative one; the anchor prompt (optional) "
           "stays as the base model draws it. Slider Sweep shows the target at strengths -2 ... +2.\n\n"
           "For a real model: pick your checkpoint, resolution 512 (SD1.5) or 1024 (SDXL/FLUX; denoise_cfg 1 for "
           "FLUX dev), rank 4-8, lr 1e-4 to 2e-4, 500-1000 steps, guidance_scale 1-4. Runs on the tiny SD1.5 demo.")
    ck = g.add("CheckpointLoaderSimple", ckpt_name="tiny-sd15.safetensors")
    g.col = 1
    te = g.add(P + "LoadAlignedTextEncoders", spec="auto")
    g.link(ck, "CLIP", te, "clip")
    sp = g.add(P + "SliderPrompts", target="a photo of a person", positive="a photo of a smiling person, happy",
               negative="a photo of a frowning person, sad", anchor="", width=64, height=64, denoise_steps=1,
               denoise_cfg=1.0)
    g.link(ck, "MODEL", sp, "model")
    g.link(te, "aligned_clip", sp, "clip")
    g.col = 2
    lc = g.add(P + "LoraConfig", rank=4, alpha=4.0, targets="attention")
    tcfg = g.add(P + "TimestepStrategy")
    oc = g.add(P + "Optimizer", learning_rate=2e-3, weight_decay=0.0, total_steps=4)
    g.col = 3
    init = g.add(P + "TrainInit", run_name="slider_smile")
    for src, o, i in ((ck, "MODEL", "model"), (sp, "training_set", "training_set"), (lc, "lora_config", "lora_config"),
                      (tcfg, "timesteps", "timesteps"), (oc, "optimizer_config", "optimizer")):
        g.link(src, o, init, i)
    ts = g.add(P + "TrainSteps", steps=4, checkpoint_every=0, val_every=0)
    g.link(init, "run", ts, "run")
    g.col = 4
    save = g.add(P + "SaveLora", name="slider_smile")
    g.link(ts, "trained_run", save, "run")
    sw = g.add(P + "SliderSweep", prompts="a photo of a person", strengths="-2, -1, 0, 1, 2", steps=2, cfg=1.0,
               width=64, height=64)
    g.link(ts, "trained_run", sw, "run")
    g.link(te, "aligned_clip", sw, "clip")
    g.link(ck, "VAE", sw, "vae")
    g.col = 5
    si = g.add("SaveImage", filename_prefix="slider/sweep")
    g.link(sw, "grid", si, "images")
    out["train_slider"] = g.to_json()
    out["train_te_swap_sd15"] = te_swap_workflow(info, "sd15")
    out["train_te_swap_sdxl"] = te_swap_workflow(info, "sdxl")
    return out


TE_SWAP_NOTE = (
    "Text-encoder swap: retrain an SD1.5 UNet to read T5 instead of CLIP-L. Text Encoder Swap Setup measures both "
    "encoders' per-token spread on the dataset's captions, adds a projection (T5 width -> 768) scaled to CLIP-L's "
    "spread, and re-initialises the reset layers; Train Init / Train Steps train the UNet's cross-attention as full "
    "weights (LoRA Config algorithm 'full') together with the projection; Save Text Encoder Swap writes the UNet's "
    "changed weights (models/loras, load with Load LoRA model-only on the original checkpoint) and the projection "
    "(models/te_projections). The Preview Plan (T5 prompts) shows the model as it trains: its prompts are projected by "
    "the projection of that step, as Apply Text Encoder Swap does. Sample with Apply Text Encoder Swap between the "
    "T5 prompt and a stock KSampler.\n\n"
    "Reset modes: cross_attention (attn2 q/k/v/out) relearns only the text-to-image mapping and keeps the visual "
    "knowledge: the seed author's only useful mode at lr 1e-5 (constant). qk (attn2 q/k only) broke attention and "
    "stayed noisy at 1e-5; it needs a higher lr or longer training. all_attention (attn1 + attn2) gave noise at "
    "1e-5; it needed about 4e-5 to 5e-5, ~20k images and batch 64. The seed's best single run (T5 + SDXL VAE): "
    "4e-5, batch 64, cosine, 10000 steps, min-SNR. Defaults here: cross_attention, lr 1e-5 constant, min-SNR 5, "
    "batch 4 x grad_accum 16 = 64. Only tested on tiny models: real-weight quality is not established.")


# The SDXL swap's Note: where each value comes from. The seed ("Notes on retraining Text Encoder") gives its settings
# for SD1.5 + T5 and, later, "T5 plus sdxl vae" (4e-5, bs64, cosine, 10000 steps, SNR); it gives no setting for an
# SDXL UNet. So the SDXL workflow keeps the SD1.5 swap workflow's choices and changes only what SDXL's size forces.
TE_SWAP_SDXL_NOTE = (
    "Text-encoder swap: retrain an SDXL UNet to read T5 instead of its CLIP-L + CLIP-G. Text Encoder Swap Setup measures "
    "the old encoders' per-token spread (SDXL's own CLIPs, the 2048-wide context) and T5's on the dataset's captions, "
    "adds a projection (T5 width -> 2048) scaled to that spread, and re-initialises SDXL's cross-attention (attn2 "
    "q/k/v/out of its 70 transformer blocks). pooled = projected: SDXL's adm also reads a pooled text vector (CLIP-G's, "
    "1280); here it is T5's mean valid token through a trainable Linear (T5 width -> 1280) scaled to CLIP-G's pooled "
    "spread, trained with the projection and saved in the projection file (pooled = zero gives the adm zeros). Train "
    "Init / Train Steps train the cross-attention as full weights (LoRA Config algorithm 'full') with the projection; "
    "Save Text Encoder Swap writes the UNet's changed weights (models/loras: Load LoRA model-only, strength 1, on "
    "sd_xl_base_1.0) and the projection (models/te_projections). Sample: T5 prompt -> Apply Text Encoder Swap -> "
    "stock KSampler.\n\n"
    "Where each value comes from: reset cross_attention, lr 1e-5 constant, min-SNR 5, effective batch 64, 2000 steps, "
    "checkpoints every 500, previews and validation every 250: the SD1.5 swap workflow, i.e. the seed's only useful "
    "setting (cross-attention reset at 1e-5, batch 64). The seed gives no lr for an SDXL UNet (its later 'T5 plus SDXL "
    "VAE' run: 4e-5, batch 64, cosine, 10000 steps, min-SNR, 20k images), so 1e-5 is kept. Batch 1 x grad_accum 64 "
    "(SD1.5: 4 x 16): SDXL's cross-attention is about 546M weights trained in full (fp32 difference, gradient and two "
    "AdamW moments: about 8.7 GB) beside the 2.6B-weight UNet, so one 1024 px image a pass. bf16 with gradient "
    "checkpointing, 1024 px buckets 256-2048, previews 25 steps cfg 7: this pack's SDXL LoRA workflow. Only tested on "
    "tiny models: real-weight quality is not established.")

# per base model: (Note, checkpoint, old encoder's spec, run/file name, Dataset, Train Init, Preview Plan and sample
# settings, Setup extras)
TE_SWAP_MODELS = {
    "sd15": dict(note=TE_SWAP_NOTE, ckpt="v1-5-pruned-emaonly.safetensors", old_spec="sd15", old_title="CLIP-L",
                 dataset=dict(resolution=512, min_side=256, max_side=1024),
                 init=dict(batch_size=4, grad_accum=16, gradient_checkpointing=True),
                 size=512, cfg=6.0, setup={}, images="te_swap"),
    "sdxl": dict(note=TE_SWAP_SDXL_NOTE, ckpt="sd_xl_base_1.0.safetensors", old_spec="sdxl", old_title="CLIP-L + CLIP-G",
                 dataset=dict(resolution=1024, min_side=256, max_side=2048),
                 init=dict(batch_size=1, grad_accum=64, gradient_checkpointing=True, precision="bf16"),
                 size=1024, cfg=7.0, setup=dict(pooled="projected"), images="te_swap_sdxl"),
}


def te_swap_workflow(info: dict, base: str = "sd15") -> dict:
    """SD1.5 or SDXL + T5 text-encoder swap with the cross-attention reset and the seed's settings
    (TE_SWAP_MODELS)."""
    m = TE_SWAP_MODELS[base]
    name = f"te_swap_{base}"
    g = Graph(info)
    g.note(m["note"])
    ck = g.add("CheckpointLoaderSimple", ckpt_name=m["ckpt"])
    t5 = g.add("CLIPLoader", clip_name="t5xxl_fp16.safetensors", type="chroma")
    g.col = 1
    te_new = g.add(P + "LoadAlignedTextEncoders", title="T5 (new encoder), aligned", spec="chroma")
    g.link(t5, "CLIP", te_new, "clip")
    te_old = g.add(P + "LoadAlignedTextEncoders", title=f"{m['old_title']} (old encoder), aligned", spec=m["old_spec"])
    g.link(ck, "CLIP", te_old, "clip")
    ds = g.add(P + "Dataset", folder="my_dataset", **m["dataset"], bucket_step=64, trigger_word="", caption_variants=1)
    lat = g.add(P + "CacheLatents")
    g.link(ds, "dataset", lat, "dataset")
    g.link(ck, "VAE", lat, "vae")
    txt = g.add(P + "CacheTextEmbeddings")
    g.link(lat, "latents", txt, "latents")
    g.link(te_new, "aligned_clip", txt, "clip")
    g.col = 2
    setup = g.add(P + "TextEncoderSwapSetup", reset="cross_attention", projection="linear", seed=0, **m["setup"])
    g.link(ck, "MODEL", setup, "model")
    g.link(te_new, "aligned_clip", setup, "new_clip")
    g.link(te_old, "aligned_clip", setup, "old_clip")
    g.link(ds, "dataset", setup, "dataset")
    lc = g.add(P + "LoraConfig", algorithm="full", rank=1, alpha=1.0, targets="cross-attention")
    tcfg = g.add(P + "TimestepStrategy", weighting="min_snr", min_snr_gamma=5.0)
    oc = g.add(P + "Optimizer", learning_rate=1e-5, weight_decay=0.01, scheduler="constant", total_steps=2000)
    g.col = 3
    init = g.add(P + "TrainInit", run_name=name, **m["init"])
    for src, o, i in ((setup, "swap_model", "model"), (txt, "training_set", "training_set"),
                      (lc, "lora_config", "lora_config"), (tcfg, "timesteps", "timesteps"),
                      (oc, "optimizer_config", "optimizer")):
        g.link(src, o, init, i)
    size, cfg = m["size"], m["cfg"]
    plan = g.add(P + "PreviewPlan", title="Preview Plan (T5 prompts, projected)", prompts="a photo of a woman, solo",
                 every_n=250, steps=25, cfg=cfg, width=size, height=size)
    g.link(te_new, "aligned_clip", plan, "clip")
    g.link(ck, "VAE", plan, "vae")
    ts = g.add(P + "TrainSteps", steps=2000, checkpoint_every=500, val_every=250)
    g.link(init, "run", ts, "run")
    g.link(plan, "preview_plan", ts, "preview_plan")
    save = g.add(P + "SaveTextEncoderSwap", name=name)
    g.link(ts, "trained_run", save, "run")
    g.col = 4
    pos = g.add("CLIPTextEncode", title="prompt (T5)", text="a photo of a woman, solo")
    g.link(te_new, "aligned_clip", pos, "clip")
    neg = g.add("CLIPTextEncode", title="negative (T5)", text="")
    g.link(te_new, "aligned_clip", neg, "clip")
    ap = g.add(P + "ApplyTextEncoderSwap", title="Apply Text Encoder Swap (prompt)")
    g.link(pos, "CONDITIONING", ap, "conditioning")
    g.link(save, "swap", ap, "swap")
    an = g.add(P + "ApplyTextEncoderSwap", title="Apply Text Encoder Swap (negative)")
    g.link(neg, "CONDITIONING", an, "conditioning")
    g.link(save, "swap", an, "swap")
    g.col = 5
    el = g.add("EmptyLatentImage", width=size, height=size, batch_size=1)
    ks = g.add("KSampler", seed=0, steps=25, cfg=cfg)
    g.link(ts, "model", ks, "model")
    g.link(ap, "projected", ks, "positive")
    g.link(an, "projected", ks, "negative")
    g.link(el, "LATENT", ks, "latent_image")
    dec = g.add("VAEDecode")
    g.link(ks, "LATENT", dec, "samples")
    g.link(ck, "VAE", dec, "vae")
    g.col = 6
    si = g.add("SaveImage", filename_prefix=f"{m['images']}/sample")
    g.link(dec, "IMAGE", si, "images")
    lg = g.add(P + "LossGraph")
    g.link(ts, "trained_run", lg, "run")
    sl = g.add("SaveImage", filename_prefix=f"{m['images']}/loss_plot")
    g.link(lg, "plot", sl, "images")
    return g.to_json()


# Model files the family workflows name: where ComfyUI expects them and where to get them. Written into each
# loader's properties.models (name, url, directory): the frontend's missing-models dialog reads it when the
# workflow loads and lists what is not installed.
# Sources (checked 2026-11-30; the same name, folder and download file as ComfyUI's own templates, package
# comfyui-workflow-templates 0.7.25, and ComfyUI_examples):
# - v2-1_768-ema-pruned: templates/embedding_example.json (comfyui-workflow-templates-media-other, properties.models,
#   with "?download=true"), ComfyUI's SD2 template;
# - sd_xl_base_1.0: templates/sdxl_simple_example.json (properties.models, with "?download=true");
# - flux1-dev, clip_l, t5xxl_fp16, ae: templates/flux_dev_full_text_to_image.json (identical URLs and folders);
# - flux1-dev-kontext_fp8_scaled: templates/flux_kontext_dev_basic.json (comfyui-workflow-templates-media-image,
#   properties.models of its UNETLoader);
# - clip_g: ComfyUI_examples sd3/README.md links Comfy-Org/stable-diffusion-3.5-fp8 text_encoders/clip_g.safetensors
#   (a /blob/ page; /resolve/ is its download URL);
# - sd3.5_medium: the file at the root of stabilityai/stable-diffusion-3.5-medium (gated: accept the licence on
#   the page first; ComfyUI's templates name no SD3.5 Medium file); loaded, like sd3.5_large in
#   ComfyUI_examples, with the three text encoders from their own files (TripleCLIPLoader);
# - v1-5-pruned-emaonly: Comfy-Org/stable-diffusion-v1-5-archive holds it (fp32, the RunwayML upload) beside the
#   v1-5-pruned-emaonly-fp16 that ComfyUI's default template (templates/default.json) names;
# - wan2.1_t2v_1.3B_fp16, umt5_xxl_fp8_e4m3fn_scaled, wan_2.1_vae: ComfyUI's Wan 2.1 text-to-video template
#   (comfyui-workflow-templates-media-video, templates/text_to_video_wan.json; the same URLs without their
#   "?download=true", and folders).
# - wan2.2_t2v_high_noise_14B_fp8_scaled, wan2.2_t2v_low_noise_14B_fp8_scaled: ComfyUI's Wan 2.2 14B text-to-video
#   template (comfyui-workflow-templates-media-video, templates/video_wan2_2_14B_t2v.json), which loads them with
#   the same umt5_xxl_fp8_e4m3fn_scaled and wan_2.1_vae as Wan 2.1.
# - hunyuanvideo1.5_720p_t2v_fp16, byt5_small_glyphxl_fp16, hunyuanvideo15_vae_fp16 (and qwen_2.5_vl_7b_fp8_scaled,
#   which it names from Comfy-Org/HunyuanVideo_1.5_repackaged; the same file as Qwen-Image's): ComfyUI's HunyuanVideo
#   1.5 720p text-to-video template (comfyui-workflow-templates-media-video, templates/
#   video_hunyuan_video_1.5_720p_t2v.json, properties.models).
# - qwen_image_edit_fp8_e4m3fn: ComfyUI's Qwen-Image-Edit template (comfyui-workflow-templates-media-image,
#   templates/image_qwen_image_edit.json, properties.models of its UNETLoader; its text encoder and VAE are Qwen-Image's).
# - flux2_dev_fp8mixed, mistral_3_small_flux2_fp8, flux2-vae: ComfyUI's FLUX.2 [dev] fp8 template
#   (comfyui-workflow-templates-media-image, templates/image_flux2_fp8.json, properties.models).
MODELS = {
    "v1-5-pruned-emaonly.safetensors": ("checkpoints", "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly.safetensors"),
    "v2-1_768-ema-pruned.safetensors": ("checkpoints", "https://huggingface.co/stabilityai/stable-diffusion-2-1/resolve/main/v2-1_768-ema-pruned.safetensors"),
    "sd_xl_base_1.0.safetensors": ("checkpoints", "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors"),
    "sd3.5_medium.safetensors": ("checkpoints", "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium/resolve/main/sd3.5_medium.safetensors"),
    "clip_l.safetensors": ("text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors"),
    "clip_g.safetensors": ("text_encoders", "https://huggingface.co/Comfy-Org/stable-diffusion-3.5-fp8/resolve/main/text_encoders/clip_g.safetensors"),
    "t5xxl_fp16.safetensors": ("text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"),
    "flux1-dev.safetensors": ("diffusion_models", "https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/flux1-dev.safetensors"),
    "flux1-dev-kontext_fp8_scaled.safetensors": ("diffusion_models", "https://huggingface.co/Comfy-Org/flux1-kontext-dev_ComfyUI/resolve/main/split_files/diffusion_models/flux1-dev-kontext_fp8_scaled.safetensors"),
    "wan2.1_t2v_1.3B_fp16.safetensors": ("diffusion_models", "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors"),
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": ("text_encoders", "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
    "wan_2.1_vae.safetensors": ("vae", "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/vae/wan_2.1_vae.safetensors"),
    "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors": ("diffusion_models", "https://huggingface.co/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"),
    "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors": ("diffusion_models", "https://huggingface.co/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/diffusion_models/wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"),
    "hunyuanvideo1.5_720p_t2v_fp16.safetensors": ("diffusion_models", "https://huggingface.co/Comfy-Org/HunyuanVideo_1.5_repackaged/resolve/main/split_files/diffusion_models/hunyuanvideo1.5_720p_t2v_fp16.safetensors"),
    "byt5_small_glyphxl_fp16.safetensors": ("text_encoders", "https://huggingface.co/Comfy-Org/HunyuanVideo_1.5_repackaged/resolve/main/split_files/text_encoders/byt5_small_glyphxl_fp16.safetensors"),
    "hunyuanvideo15_vae_fp16.safetensors": ("vae", "https://huggingface.co/Comfy-Org/HunyuanVideo_1.5_repackaged/resolve/main/split_files/vae/hunyuanvideo15_vae_fp16.safetensors"),
    "z_image_turbo_bf16.safetensors": ("diffusion_models", "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files/diffusion_models/z_image_turbo_bf16.safetensors"),
    "qwen_3_4b.safetensors": ("text_encoders", "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files/text_encoders/qwen_3_4b.safetensors"),
    "Chroma1-HD-fp8_scaled_rev2.safetensors": ("diffusion_models", "https://huggingface.co/silveroxides/Chroma1-HD-fp8-scaled/resolve/main/Chroma1-HD-fp8_scaled_rev2.safetensors"),
    "t5xxl_fp8_e4m3fn_scaled.safetensors": ("text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp8_e4m3fn_scaled.safetensors"),
    "qwen_image_fp8_e4m3fn.safetensors": ("diffusion_models", "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/diffusion_models/qwen_image_fp8_e4m3fn.safetensors"),
    "qwen_2.5_vl_7b_fp8_scaled.safetensors": ("text_encoders", "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors"),
    "qwen_image_vae.safetensors": ("vae", "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/vae/qwen_image_vae.safetensors"),
    "qwen_image_edit_fp8_e4m3fn.safetensors": ("diffusion_models", "https://huggingface.co/Comfy-Org/Qwen-Image-Edit_ComfyUI/resolve/main/split_files/diffusion_models/qwen_image_edit_fp8_e4m3fn.safetensors"),
    "lumina_2_model_bf16.safetensors": ("diffusion_models", "https://huggingface.co/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/diffusion_models/lumina_2_model_bf16.safetensors"),
    "gemma_2_2b_fp16.safetensors": ("text_encoders", "https://huggingface.co/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/text_encoders/gemma_2_2b_fp16.safetensors"),
    "hidream_i1_full_fp8.safetensors": ("diffusion_models", "https://huggingface.co/Comfy-Org/HiDream-I1_ComfyUI/resolve/main/split_files/diffusion_models/hidream_i1_full_fp8.safetensors"),
    "clip_l_hidream.safetensors": ("text_encoders", "https://huggingface.co/Comfy-Org/HiDream-I1_ComfyUI/resolve/main/split_files/text_encoders/clip_l_hidream.safetensors"),
    "clip_g_hidream.safetensors": ("text_encoders", "https://huggingface.co/Comfy-Org/HiDream-I1_ComfyUI/resolve/main/split_files/text_encoders/clip_g_hidream.safetensors"),
    "llama_3.1_8b_instruct_fp8_scaled.safetensors": ("text_encoders", "https://huggingface.co/Comfy-Org/HiDream-I1_ComfyUI/resolve/main/split_files/text_encoders/llama_3.1_8b_instruct_fp8_scaled.safetensors"),
    "ae.safetensors": ("vae", "https://huggingface.co/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors"),
    "flux2_dev_fp8mixed.safetensors": ("diffusion_models", "https://huggingface.co/Comfy-Org/flux2-dev/resolve/main/split_files/diffusion_models/flux2_dev_fp8mixed.safetensors"),
    "mistral_3_small_flux2_fp8.safetensors": ("text_encoders", "https://huggingface.co/Comfy-Org/flux2-dev/resolve/main/split_files/text_encoders/mistral_3_small_flux2_fp8.safetensors"),
    "flux2-vae.safetensors": ("vae", "https://huggingface.co/Comfy-Org/flux2-dev/resolve/main/split_files/vae/flux2-vae.safetensors"),
}

# What each workflow is for and what it needs: shown on its template card (the frontend 1.32.9 gives a custom
# node pack's templates no description of their own; the card image carries it) and kept in extra.aligned_trainer.
DESCRIPTIONS = {
    "demo_train_tiny": ("Demo: train a tiny LoRA", "Trains a LoRA on a generated tiny SD1.5 in seconds, on a CPU: "
                        "live loss chart, previews, A/B of aligned vs default text encoders.",
                        ["tiny-sd15.safetensors (scripts/demo.py)", "vae/tiny-sd15-vae.safetensors (scripts/demo.py)",
                         "input/demo_dataset"]),
    "train_lora_sd15": ("Train an SD1.5 LoRA", "CLIP-L as SD1.5 was trained (77 tokens, truncated); uniform "
                        "timesteps, min-SNR 5; 512 px.", ["checkpoints/v1-5-pruned-emaonly.safetensors",
                                                           "input/my_dataset (images + .txt captions)"]),
    "train_lora_sd2": ("Train an SD2.1 768-v LoRA", "OpenCLIP-H penultimate, 77 tokens, truncated, as SD2 was "
                       "trained; the velocity target ComfyUI detects; uniform timesteps, min-SNR 5; 768 px.",
                       ["checkpoints/v2-1_768-ema-pruned.safetensors", "input/my_dataset (images + .txt captions)"]),
    "train_lora_sdxl": ("Train an SDXL LoRA", "Both CLIPs penultimate, empty caption as zeros, as SDXL was "
                        "trained; min-SNR 5; 1024 px.", ["checkpoints/sd_xl_base_1.0.safetensors",
                                                         "input/my_dataset (images + .txt captions)"]),
    "train_lora_sd35": ("Train an SD3.5 Medium LoRA", "CLIP-L + CLIP-G + T5 as Stability's reference; "
                        "logit-normal timesteps, shift 3; 1024 px.",
                        ["checkpoints/sd3.5_medium.safetensors", "text_encoders/clip_l, clip_g, t5xxl_fp16",
                         "input/my_dataset (images + .txt captions)"]),
    "train_lora_flux1": ("Train a FLUX.1 [dev] LoRA", "T5 at 512 tokens as FluxPipeline; logit-normal timesteps "
                         "with FLUX's resolution shift; 1024 px.",
                         ["diffusion_models/flux1-dev.safetensors", "text_encoders/clip_l, t5xxl_fp16",
                          "vae/ae.safetensors", "input/my_dataset (images + .txt captions)"]),
    "train_lora_flux1_kontext": ("Train a FLUX.1 Kontext edit LoRA", "Image-edit pairs: control image + edited "
                                 "image + instruction; the control reaches the model as ReferenceLatent gives it; "
                                 "T5 at 512 tokens as FluxPipeline; 1024 px.",
                                 ["diffusion_models/flux1-dev-kontext_fp8_scaled.safetensors",
                                  "text_encoders/clip_l, t5xxl_fp16, vae/ae.safetensors",
                                  "input/my_dataset (edited images + .txt instructions)",
                                  "input/my_dataset_control (input images, same names)"]),
    "train_lora_wan": ("Train a Wan 2.1 video LoRA", "UMT5 at 512 tokens as WanPipeline; video clips at 16 fps, "
                       "33 frames; logit-normal timesteps, shift 3; bf16 with checkpointing; animated previews (17 frames).",
                       ["diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors",
                        "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors", "vae/wan_2.1_vae.safetensors",
                        "input/my_videos (clips + .txt captions)"]),
    "train_lora_wan22": ("Train a Wan 2.2 A14B expert LoRA", "One expert per run (high-noise here, low-noise "
                         "for the other LoRA) at the official boundary 0.875; UMT5 as WanPipeline; rank 32, lr "
                         "1e-4; 33-frame clips at 16 fps; bf16 with checkpointing; animated previews.",
                         ["diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled",
                          "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors", "vae/wan_2.1_vae.safetensors",
                          "input/my_videos (clips + .txt captions)"]),
    "train_lora_hunyuan_video15": ("Train a HunyuanVideo 1.5 LoRA", "Qwen2.5-VL and byT5 as "
                                   "HunyuanVideo15Pipeline; musubi-tuner's settings: rank 32, lr 1e-4, flux_shift "
                                   "timesteps; 33-frame clips at 24 fps; bf16 with checkpointing; animated previews.",
                                   ["diffusion_models/hunyuanvideo1.5_720p_t2v_fp16.safetensors",
                                    "text_encoders/qwen_2.5_vl_7b_fp8_scaled, byt5_small_glyphxl_fp16",
                                    "vae/hunyuanvideo15_vae_fp16.safetensors",
                                    "input/my_videos (clips + .txt captions)"]),
    "train_lora_zimage": ("Train a Z-Image Turbo LoRA", "Qwen3 under its chat template, penultimate layer, 512 "
                          "tokens as ZImagePipeline; logit-normal timesteps, the model's shift 3; bf16 with "
                          "checkpointing; previews at 9 steps, cfg 1.",
                          ["diffusion_models/z_image_turbo_bf16.safetensors", "text_encoders/qwen_3_4b.safetensors",
                           "vae/ae.safetensors", "input/my_dataset (images + .txt captions)"]),
    "train_lora_qwen_image": ("Train a Qwen-Image LoRA", "Qwen2.5-VL under its system prompt, template tokens "
                              "dropped, as QwenImagePipeline; rank 16, lr 1e-4, sigmoid timesteps with shift 2.2; "
                              "trains the fp8 DiT as loaded (24 GB cards).",
                              ["diffusion_models/qwen_image_fp8_e4m3fn.safetensors",
                               "text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors", "vae/qwen_image_vae.safetensors",
                               "input/my_dataset (images + .txt captions)"]),
    "train_lora_qwen_image_edit": ("Train a Qwen-Image-Edit LoRA", "Image-edit pairs: Qwen2.5-VL reads the control "
                                   "image in every caption, as QwenImageEditPipeline; the control also reaches the "
                                   "DiT as ReferenceLatent gives it; rank 16, lr 1e-4, 'weighted' timesteps.",
                                   ["diffusion_models/qwen_image_edit_fp8_e4m3fn.safetensors",
                                    "text_encoders/qwen_2.5_vl_7b_fp8_scaled, vae/qwen_image_vae",
                                    "input/my_dataset (edited images + .txt instructions)",
                                    "input/my_dataset_control (input images, same names)"]),
    "train_lora_lumina2": ("Train a Lumina-Image 2.0 LoRA", "Gemma-2 on its system prompt, 256 tokens with masks, "
                           "penultimate layer, as Lumina2Pipeline; kohya's Lumina settings: rank 8, lr 1e-4, uniform "
                           "timesteps with the resolution shift.",
                           ["diffusion_models/lumina_2_model_bf16.safetensors", "text_encoders/gemma_2_2b_fp16.safetensors",
                            "vae/ae.safetensors", "input/my_dataset (images + .txt captions)"]),
    "train_lora_chroma": ("Train a Chroma1-HD LoRA", "T5 at 512 tokens with its mask as ChromaPipeline; "
                          "ai-toolkit's Chroma settings: rank 16, lr 1e-4, EMA 0.99, logit-normal timesteps.",
                          ["diffusion_models/Chroma1-HD-fp8_scaled_rev2.safetensors",
                           "text_encoders/t5xxl_fp8_e4m3fn_scaled.safetensors", "vae/ae.safetensors",
                           "input/my_dataset (images + .txt captions)"]),
    "train_lora_hidream": ("Train a HiDream-I1 Full LoRA", "CLIP-L, CLIP-G, T5 and every Llama-3.1 layer as "
                           "HiDreamImagePipeline; ai-toolkit's HiDream settings: rank 32, lr 2e-4, routed experts "
                           "left out; shift 3 set by ModelSamplingSD3.",
                           ["diffusion_models/hidream_i1_full_fp8.safetensors",
                            "text_encoders/clip_l_hidream, clip_g_hidream, t5xxl_fp8_e4m3fn_scaled, "
                            "llama_3.1_8b_instruct_fp8_scaled", "vae/ae.safetensors",
                            "input/my_dataset (images + .txt captions)"]),
    "train_lora_flux2": ("Train a FLUX.2 [dev] LoRA", "Mistral-Small-3.1 layers 10/20/30 under its system "
                         "message as Flux2Pipeline; ai-toolkit's FLUX.2 settings: rank 32, lr 1e-4, 'weighted' "
                         "timesteps on FLUX.2's resolution shift; fp8 DiT trained as loaded; previews at guidance 4.",
                         ["diffusion_models/flux2_dev_fp8mixed.safetensors",
                          "text_encoders/mistral_3_small_flux2_fp8.safetensors", "vae/flux2-vae.safetensors",
                          "input/my_dataset (images + .txt captions)"]),
    "ab_aligned_vs_unaligned": ("A/B: aligned vs default encoders", "Same prompts, seed and noise through the "
                                "aligned and ComfyUI's default text encoders, side by side.",
                                ["any SD1.5 checkpoint (tiny-sd15 named)"]),
    "ab_training_aligned_vs_unaligned": ("A/B training: aligned vs default encoders", "Trains the same data "
                                         "twice with one seed, once with aligned and once with ComfyUI's default "
                                         "text encoders: both validation-loss curves and a LoRA x CLIP grid.",
                                         ["any SD1.5 checkpoint (tiny-sd15 named)",
                                          "vae/: the VAE you sample with (tiny-sd15-vae named)",
                                          "input/demo_dataset (images + .txt captions)"]),
    "dataset_tools": ("Dataset tools: cleaning and VAE round-trip", "Removes anti-AI noise into cleaned copies "
                      "and flags suspect images; shows what the VAE loses per image (PSNR/SSIM, worst first).",
                      ["any SD1.5 checkpoint (tiny-sd15 named)", "vae/: the VAE you sample with (tiny-sd15-vae named)",
                       "input/demo_dataset (images + .txt captions)"]),
    "token_heatmaps": ("Token heatmaps (DAAM)", "Where each word of a prompt acts in the image: does the trigger "
                       "word bleed into outfit or background? Compare base vs LoRA, aligned vs default encoders.",
                       ["any SD1.x/SD2.x/SDXL checkpoint (tiny-sd15 named)"]),
    "train_slider": ("Concept slider (LECO) from prompts", "A LoRA from prompts alone, no images: +strength "
                     "toward the positive prompt, -strength toward the negative; a -2 ... +2 strength sweep.",
                     ["any SD1.x/SD2.x/SDXL/SD3/FLUX model (tiny-sd15 named)"]),
    "train_te_swap_sd15": ("Text-encoder swap: SD1.5 reads T5", "Retrains SD1.5's cross-attention (full "
                           "weights, reset first) with a projection from T5 to 768, scaled to CLIP-L's measured "
                           "spread; lr 1e-5, min-SNR, batch 64 via accumulation.",
                           ["checkpoints/v1-5-pruned-emaonly.safetensors", "text_encoders/t5xxl_fp16.safetensors",
                            "input/my_dataset (images + .txt captions)"]),
    "train_te_swap_sdxl": ("Text-encoder swap: SDXL reads T5", "Retrains SDXL's cross-attention (full weights, "
                           "reset first) with a projection from T5 to 2048 scaled to its CLIPs' spread, and T5's "
                           "pooled vector projected for the adm; lr 1e-5, min-SNR, batch 1 x 64 accumulated.",
                           ["checkpoints/sd_xl_base_1.0.safetensors", "text_encoders/t5xxl_fp16.safetensors",
                            "input/my_dataset (images + .txt captions)"]),
    "te_alignment_report": ("Text-encoder alignment report", "Tokens kept and cut, embedding cosines and padding "
                            "of aligned vs default encoders; a trigger-word check.",
                            ["any SD1.5 checkpoint (tiny-sd15 named)"]),
}


def declare_models(wf: dict) -> dict:
    """properties.models on every node whose widgets name a file in MODELS."""
    for node in wf["nodes"]:
        names = [v for v in node.get("widgets_values") or [] if isinstance(v, str) and v in MODELS]
        if names:
            node["properties"]["models"] = [{"name": n, "url": MODELS[n][1], "directory": MODELS[n][0]} for n in names]
    return wf


def describe(name: str, wf: dict) -> dict:
    title, text, needs = DESCRIPTIONS.get(name, (name.replace("_", " "), "", []))
    wf["extra"]["aligned_trainer"] = {"title": title, "description": text, "needs": needs}
    return wf


def card(name: str, wf: dict):
    """The template card (a designed JPEG, 512x384): title, what the workflow does, what it needs."""
    from PIL import Image, ImageDraw

    imaging = _imaging()
    meta = wf["extra"]["aligned_trainer"]
    img = Image.new("RGB", (512, 384), (28, 30, 38))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, 511, 6), fill=(90, 170, 255))
    d.text((24, 24), "Aligned Trainer", font=imaging.font(16), fill=(140, 190, 255))
    y = 52
    for line in _wrap(meta["title"], imaging.font(30), 464, d):
        d.text((24, y), line, font=imaging.font(30), fill=(240, 240, 245))
        y += 36
    y += 8
    for line in _wrap(meta["description"], imaging.font(17), 464, d):
        d.text((24, y), line, font=imaging.font(17), fill=(200, 200, 210))
        y += 22
    y = max(y + 14, 250)
    if meta["needs"]:
        d.text((24, y), "Needs", font=imaging.font(15), fill=(255, 200, 60))
        y += 22
        for need in meta["needs"][:4]:
            d.text((34, y), "- " + need, font=imaging.font(14), fill=(190, 190, 200))
            y += 19
    return img


def _imaging():
    """aligned_trainer/imaging.py by path (the repository root on sys.path would shadow ComfyUI's ``nodes``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("aligned_trainer_imaging", REPO / "aligned_trainer" / "imaging.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _wrap(text: str, f, width: int, d) -> list[str]:
    imaging = _imaging()
    lines, cur = [], ""
    for word in text.split():
        nxt = f"{cur} {word}".strip()
        if cur and imaging.text_width(d, nxt, f) > width:
            lines.append(cur)
            cur = word
        else:
            cur = nxt
    return lines + ([cur] if cur else [])


def main() -> int:
    from support.boot import boot
    from support.workflow import object_info_inprocess, validate

    c = boot()
    info = object_info_inprocess(c.nodes)
    only = set(sys.argv[1:])  # workflow names to write (default: all)
    for name, wf in build(info).items():
        if only and name not in only:
            continue
        problems = [p for p in validate(wf, info)]
        if problems:
            print(name, problems)
            return 1
        wf = describe(name, declare_models(wf))
        (REPO / "workflows" / f"{name}.json").write_text(json.dumps(wf, indent=1) + "\n", encoding="utf-8")
        card(name, wf).save(REPO / "workflows" / f"{name}.jpg", quality=88)
        print(f"wrote workflows/{name}.json ({len(wf['nodes'])} nodes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
