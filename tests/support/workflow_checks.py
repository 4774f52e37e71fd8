"""Checks of a shipped training workflow's finished run (``tests/test_browser.py`` queues each shrunk family workflow
and the text-encoder swap workflow from the real frontend and hands the server's history entry here). A family run:
it trained, saved a LoRA that ComfyUI's stock LoRA loader maps completely, and left its sample grid, loss plot and
timestep histogram (animated previews for video), plus each family's own checks. The swap run: ``check_te_swap_run``."""
from __future__ import annotations

import json
import re
from pathlib import Path

from support.tiny_workflows import FAMILIES, TE_SWAP_BASES, TE_SWAP_STEPS, shrink_for, steps_for


def _check_lora_loads(path: Path, model) -> int:
    """Stock loader: every key of the file maps (comfy.lora.load_lora over the model's kohya key map), and
    comfy.sd.load_lora_for_models patches (a clone of) the model with it."""
    import comfy.lora
    import comfy.sd
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(sd, key_map, log_missing=False)
    used = set()
    for p in patches.values():
        used |= set(getattr(p, "loaded_keys", ()) or ())
    unmapped = sorted(set(sd) - used)
    assert patches and unmapped == [], f"{path.name}: {len(unmapped)} unmapped keys, e.g. {unmapped[:3]}"
    patched, _ = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0.0)
    # a patch key is the weight's name, or (name, row offset[, function]) for a slice (SD3's peft layout: qkv rows)
    assert set(patched.patches) >= {k if isinstance(k, str) else k[0] for k in patches}
    return len(patches)


def _check_animated(srv, outputs: dict, by_type: dict, frames: int, name: str) -> None:
    """Each animated UI entry (Sample Preview's, Train Steps' per preview) is a file in the output folder that PIL
    reads as ``frames`` frames of the saved sample grid's size; Train Steps shows one per preview (none where the
    shrunk run previews only at the end)."""
    from PIL import Image

    (sp,), (ts,), (saved,) = by_type["AlignedTrainer_SamplePreview"], by_type["AlignedTrainer_TrainSteps"], \
        by_type["SaveAnimatedWEBP"]
    ref = outputs[saved]["images"][0]
    with Image.open(srv.output_dir / ref["subfolder"] / ref["filename"]) as im:
        size = im.size
    shown = {nid: outputs.get(nid, {}) for nid in (sp, ts)}
    every = shrink_for(name)["AlignedTrainer_PreviewPlan"]["every_n"]
    if steps_for(name) < every:  # no preview during training: Train Steps shows none
        assert not outputs.get(ts, {}).get("images"), outputs.get(ts)
        shown.pop(ts)
    assert all(o.get("animated") == [True] for o in shown.values()), shown
    assert len(shown[sp]["images"]) == 1 and len(shown.get(ts, {"images": []})["images"]) == steps_for(name) // every
    for img in [i for o in shown.values() for i in o["images"]]:
        assert img["type"] == "output" and img["filename"].endswith(".webp"), img
        with Image.open(srv.output_dir / img["subfolder"] / img["filename"]) as im:
            assert (im.format, im.n_frames, im.size) == ("WEBP", frames, size), (img, im.n_frames, im.size)


def _check_wan22_expert(srv, api: dict, outputs: dict, by_type: dict, lora: Path) -> None:
    """The Wan 2.2 workflow trains the high-noise expert at the widget's default boundary (0: the model's official
    one): Train Init names the boundary it took (experts.json's, for the WAN21_T2V the expert file loads as) on
    the model's shift 8; the LoRA carries musubi-tuner's Wan metadata and its key names."""
    from safetensors import safe_open

    (ts_id,) = by_type["AlignedTrainer_TimestepStrategy"]
    inputs = api[ts_id]["inputs"]
    default = srv.info["AlignedTrainer_TimestepStrategy"]["input"]["optional"]["expert_boundary"][1]["default"]
    assert inputs["expert"] == "high_noise" and inputs["expert_boundary"] == default == 0
    (init_id,) = by_type["AlignedTrainer_TrainInit"]
    text = outputs[init_id]["text"][0]
    assert "expert high_noise: trains sigma >= 0.875 (the official boundary of WAN21_T2V (Wan 2.2 T2V A14B" in text
    assert "at the model's shift 8" in text
    with safe_open(str(lora), framework="pt") as f:
        md, keys = f.metadata(), list(f.keys())
    assert md["ss_base_model_version"] == "wan" and md["ss_network_module"] == "networks.lora_wan"
    assert md["modelspec.architecture"] == "wan2.1/lora" and json.loads(md["aligned_trainer.config"])
    assert "lora_unet_blocks_0_self_attn_q.lora_down.weight" in keys


def _check_hv15(api: dict, outputs: dict, by_type: dict, lora: Path) -> None:
    """The HunyuanVideo 1.5 workflow: the aligned encoders' spec is hunyuan-video-1.5 (its default variant), and the
    LoRA carries
    musubi-tuner's HunyuanVideo 1.5 metadata with ComfyUI's module names (lora_unet_double_blocks_0_...)."""
    from safetensors import safe_open

    (te_id,) = by_type["AlignedTrainer_LoadAlignedTextEncoders"]
    assert api[te_id]["inputs"]["spec"] == "hunyuan-video-1.5:unpadded", api[te_id]["inputs"]
    with safe_open(str(lora), framework="pt") as f:
        md, keys = f.metadata(), list(f.keys())
    assert (md["ss_base_model_version"], md["ss_network_module"]) == ("hunyuan_video_1_5", "networks.lora_hv_1_5")
    assert md["modelspec.architecture"] == "hunyuan-video-1.5/lora" and json.loads(md["aligned_trainer.config"])
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys, keys[:5]
    assert any(k.startswith("lora_unet_single_blocks_0_") for k in keys), keys[:5]


def _check_hidream(api: dict, by_type: dict, lora: Path, report: dict, model) -> None:
    """The HiDream workflow sets HiDream-I1 Full's shift on the model it trains (ModelSamplingSD3 shift 3 between
    the diffusion-model loader and Train Init: ComfyUI 0.3.75 loads HiDream at shift 1); its LoRA covers what
    ai-toolkit's train_lora_hidream_48.yaml trains, every Linear of the double- and single-stream blocks but the
    routed experts (shared experts, both streams' attention and MLPs, the modulation: derived from the model's
    modules), in ai-toolkit's layout (peft pairs under ``diffusion_model.``), which diffusers'
    ``HiDreamImagePipeline.load_lora_weights`` loads onto a transformer of the same weights, one adapter per module."""
    import torch
    from safetensors import safe_open

    from support.factories import diffusers_ref

    (ms_id,) = by_type["ModelSamplingSD3"]
    (init_id,) = by_type["AlignedTrainer_TrainInit"]
    (unet_id,) = by_type["AlignedTrainerTests_TinyDiffusionModelLoader"]
    assert api[ms_id]["inputs"]["shift"] == 3.0 and api[ms_id]["inputs"]["model"] == [unet_id, 0], api[ms_id]
    assert api[init_id]["inputs"]["model"] == [ms_id, 0], api[init_id]["inputs"]
    with safe_open(str(lora), framework="pt") as f:
        keys, md = list(f.keys()), f.metadata()
    assert md["ss_base_model_version"] == "hidream_i1", md.get("ss_base_model_version")
    assert all(k.startswith("diffusion_model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    modules = {k.removeprefix("diffusion_model.").rsplit(".", 2)[0] for k in keys}
    net = model.model.diffusion_model
    blocks = re.compile(r"(double|single)_stream_blocks\.\d+\.block\.")
    expected = {n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear) and blocks.match(n)
                and ".ff_i.experts." not in n}
    assert modules == expected, sorted(modules ^ expected)
    assert not any(".ff_i.experts." in n or ".gate" in n for n in modules)
    assert any(".ff_i.shared_experts." in n for n in modules) and any(n.endswith(".attn1.to_q_t") for n in modules)
    d = report["diffusers"]
    assert d["checked"] and d["pipeline"] == "HiDreamImagePipeline" and not d["dropped"] and not d["refused"], d
    pipe = diffusers_ref.hidream_transformer_pipeline(net.state_dict())
    pipe.load_lora_weights(str(lora), adapter_name="default_0")
    assert set(diffusers_ref.lora_modules(pipe.transformer)) == modules


def check_family_run(srv, api: dict, entry: dict, name: str, request, seconds: float) -> None:
    """``entry``: the history entry of the shrunk workflow ``name`` run on ``srv``; ``api``: the prompt it ran
    (the frontend's, as the server recorded it)."""
    status = entry["status"]
    assert status["status_str"] == "success" and status["completed"], status
    assert not [m for m in status.get("messages", []) if m[0] == "execution_error"]

    by_type = {}
    for nid, node in api.items():
        by_type.setdefault(node["class_type"], []).append(nid)
    outputs = entry["outputs"]
    # Save LoRA: the file exists, was written by this run (steps_for: its shrunk steps), and maps completely in the stock loader
    (save_id,) = by_type["AlignedTrainer_SaveLora"]
    report = json.loads(outputs[save_id]["text"][0])
    lora = Path(report["path"])
    # the requested name, or the next free one (if_exists 'new_name'): the browser tests share this server and
    # may have saved this workflow's LoRA under the same name before
    requested = api[save_id]["inputs"]["name"]
    assert lora.parent == srv.base / "models" / "loras" and report["requested"] == f"{requested}.safetensors"
    assert re.fullmatch(rf"{re.escape(requested)}(_\d+)?\.safetensors", lora.name), lora.name
    assert lora.exists() and report["steps"] == steps_for(name) and report["unmapped"] == 0
    family = FAMILIES[name][0]
    if family == "sd15":
        model = request.getfixturevalue("sd15")[0]  # the tiny checkpoint through CheckpointLoaderSimple
    else:
        from support.factories import families, hunyuan_video15, sd2, wan, wan22

        # the MODEL the server's workflow trained (same weights)
        others = {"wan2.1": wan.build_model, "wan2.2-t2v-high": wan22.HIGH.build_model, "sd2-v": sd2.build_model,
                  "hunyuan-video-1.5": hunyuan_video15.BUNDLE.build_model}
        model = others[family]() if family in others else families.build_model(family)
    n_patches = _check_lora_loads(lora, model)
    # every Save Image (sample grid, loss plot) and Preview Image (timestep histogram) left its files
    names = set()
    for nid in by_type["SaveImage"] + by_type["PreviewImage"] + by_type.get("SaveAnimatedWEBP", []):
        images = outputs.get(nid, {}).get("images", [])
        assert images, f"{name}: node {nid} ({api[nid]['class_type']}) produced no image"
        for img in images:
            root = srv.output_dir if img["type"] == "output" else srv.temp_dir / "temp"  # main.py adds "temp"
            f = root / img.get("subfolder", "") / img["filename"]
            assert f.exists() and f.stat().st_size > 0, f
            names.add(f"{img.get('subfolder', '')}/{img['filename']}")
    prefix = name.removeprefix("train_lora_")
    assert any(n.startswith(f"{prefix}_lora/sample_grid") for n in names), names
    frames = shrink_for(name)["AlignedTrainer_SamplePreview"].get("frames", 1)
    if frames > 1:  # video: Sample Preview and Train Steps' previews show animated WebPs from the output folder
        _check_animated(srv, outputs, by_type, frames, name)
    assert any(n.startswith(f"{prefix}_lora/loss_plot") for n in names), names
    if name == "train_lora_wan22":
        _check_wan22_expert(srv, api, outputs, by_type, lora)
    if name == "train_lora_hunyuan_video15":
        _check_hv15(api, outputs, by_type, lora)
    if name == "train_lora_hidream":
        _check_hidream(api, by_type, lora, report, model)
    if name in ("train_lora_flux1_kontext", "train_lora_qwen_image_edit"):
        _check_control_latents(srv)
    if name == "train_lora_qwen_image_edit":
        _check_qwen_edit(srv, api, by_type, lora)
    if name == "train_lora_flux2":
        _check_flux2(api, by_type, lora)
    print(f"{name}: ran in {seconds:.1f}s, LoRA {lora.name} ({n_patches} patched weights)")


def _check_flux2(api: dict, by_type: dict, lora: Path) -> None:
    """The FLUX.2 workflow: the aligned encoders' spec is flux2-dev, the timesteps are FLUX.2's own resolution shift
    with ai-toolkit's 'weighted' timesteps, previews at guidance 4 (ComfyUI's FLUX.2 template), and the LoRA is in ai-toolkit's FLUX.2 layout (peft pairs under
    diffusion_model.<original module>, no alpha) with its base model version."""
    from safetensors import safe_open

    (te_id,) = by_type["AlignedTrainer_LoadAlignedTextEncoders"]
    assert api[te_id]["inputs"]["spec"] == "flux2-dev", api[te_id]["inputs"]
    (ts_id,) = by_type["AlignedTrainer_TimestepStrategy"]
    t = api[ts_id]["inputs"]
    assert (t["density"], t["shift"], t["weighting"]) == ("linear", "flux_resolution", "weighted"), t
    for kind in ("AlignedTrainer_PreviewPlan", "AlignedTrainer_SamplePreview"):  # ComfyUI's FLUX.2 template: 4
        (nid,) = by_type[kind]
        assert api[nid]["inputs"]["guidance"] == 4.0, (kind, api[nid]["inputs"])
    with safe_open(str(lora), framework="pt") as f:
        md, keys = f.metadata(), list(f.keys())
    assert md["ss_base_model_version"] == "flux2" and md["modelspec.architecture"] == "flux-2-dev/lora", md
    assert all(k.startswith("diffusion_model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in keys, keys[:5]
    assert any(k.startswith("diffusion_model.single_blocks.0.linear1.") for k in keys), keys[:5]


def _check_qwen_edit(srv, api: dict, by_type: dict, lora: Path) -> None:
    """The Qwen-Image-Edit workflow: the aligned encoders' spec is qwen-image-edit, every caption of my_dataset (and
    the empty one) was cached encoded with its control image (text cache entries whose metadata name the control
    file), the previews got the input image, and the saved LoRA names the spec it was trained with."""
    import json

    from safetensors import safe_open

    (te_id,) = by_type["AlignedTrainer_LoadAlignedTextEncoders"]
    assert api[te_id]["inputs"]["spec"] == "qwen-image-edit", api[te_id]["inputs"]
    for kind in ("AlignedTrainer_PreviewPlan", "AlignedTrainer_SamplePreview"):
        (nid,) = by_type[kind]
        assert isinstance(api[nid]["inputs"].get("control_image"), list), (kind, api[nid]["inputs"])
    images = {}
    for f in (srv.output_dir / "aligned_trainer" / "cache" / "text").rglob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            md = sf.metadata() or {}
        if "image" in md:
            images.setdefault(Path(md["image"]).parent.name, set()).add((Path(md["image"]).name, md["text"]))
    controls = sorted(p.name for p in (srv.input_dir / "my_dataset_control").iterdir())
    assert {c for c, _ in images.get("my_dataset_control", ())} >= set(controls), images
    assert {c for c, t in images["my_dataset_control"] if t == ""} >= set(controls), images  # the empty caption too
    with safe_open(str(lora), framework="pt") as f:
        md = f.metadata()
    assert json.loads(md["aligned_trainer.te_spec"])["id"] == "qwen-image-edit", md.get("aligned_trainer.te_spec")


def _check_control_latents(srv) -> None:
    """The Kontext workflow's server run cached a control latent for every image of my_dataset, each encoded from
    the control image of the same file stem in my_dataset_control (the cache entries' metadata name both)."""
    from safetensors import safe_open

    pairs = set()
    for f in (srv.output_dir / "aligned_trainer" / "cache" / "latents").rglob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            md = sf.metadata() or {}
        if "target" in md:
            pairs.add((Path(md["source"]).parent.name, Path(md["source"]).name, Path(md["target"]).stem))
    controls = sorted(p.name for p in (srv.input_dir / "my_dataset_control").iterdir())
    assert {(c, t) for d, c, t in pairs if d == "my_dataset_control"} >= {(c, Path(c).stem) for c in controls}, pairs


def _swap_base(request, name: str):
    """(MODEL, VAE) of the tiny base the shrunk swap workflow ``name`` ran on (TE_SWAP_BASES): the tiny SD1.5
    checkpoint through CheckpointLoaderSimple, or the families bundle the test-only loader gave the server (same
    seeded weights)."""
    base = TE_SWAP_BASES[name][0]
    if base == "sd15":
        model, _, vae = request.getfixturevalue("sd15")
    else:
        model, _, vae = request.getfixturevalue("family_bundle")(base)
    return model, vae


def check_te_swap_run(srv, api: dict, entry: dict, name: str, request, seconds: float, queued_at: float) -> None:
    """``entry``: the history entry of a shrunk swap workflow (``train_te_swap_sd15`` / ``_sdxl``;
    support.tiny_workflows.TE_SWAP: the tiny base of TE_SWAP_BASES, the tiny T5 of the Chroma bundle, 2 images at 64
    px, 2 steps, a Preview Plan every step, one sampling step) run on ``srv``; ``api``: the prompt it ran (the
    frontend's, as the server recorded it); ``queued_at``: time.time() when it was queued. The setup measured and
    matched the spreads (shown under the node) with the reset it names; Save Text Encoder Swap wrote the UNet's
    cross-attention differences (every key maps in ComfyUI's stock LoRA loader, 0 unmapped) and the trained
    projection (T5 128 -> the UNet's context width); the stock KSampler sampled through Apply Text Encoder Swap (the
    sample image) and the loss plot was saved; Train Steps previewed every step, the step-2 preview differing from
    the step-1 one. An adm model (SDXL, ``pooled = projected``): ``_check_projected_pooled``."""
    import numpy as np
    from PIL import Image
    from safetensors import safe_open
    from safetensors.torch import load_file

    status = entry["status"]
    assert status["status_str"] == "success" and status["completed"], status
    assert not [m for m in status.get("messages", []) if m[0] == "execution_error"]
    by_type: dict[str, list[str]] = {}
    for nid, node in api.items():
        by_type.setdefault(node["class_type"], []).append(nid)
    outputs = entry["outputs"]
    # the setup's shown spreads: the projected (output) spread within 5 % of the old encoder's measured one
    (setup_id,) = by_type["AlignedTrainer_TextEncoderSwapSetup"]
    shown = outputs[setup_id]["text"][0]
    m = re.search(r"old encoder token std ([\d.]+).*output std ([\d.]+)", shown)
    assert m and abs(float(m[2]) - float(m[1])) <= 0.05 * float(m[1]), shown
    assert "reset cross_attention" in shown and "(154 tokens of 2 captions)" in shown
    # both files, in ComfyUI's folders: the UNet's cross-attention differences as .diff keys of the full run
    (save_id,) = by_type["AlignedTrainer_SaveTextEncoderSwap"]
    saved = json.loads(outputs[save_id]["text"][0])
    unet, proj = Path(saved["unet_file"]), Path(saved["projection_file"])
    assert unet.parent == srv.base / "models" / "loras" and proj.parent == srv.base / "models" / "te_projections"
    assert unet.stem == proj.stem  # one name for both (if_exists new_name: the first free in both folders)
    with safe_open(str(unet), framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert keys and all(k.startswith("diffusion_model.") and k.endswith((".diff", ".diff_b")) for k in keys)
    assert {k.split(".attn2.")[1] for k in keys} == {"to_q.diff", "to_k.diff", "to_v.diff", "to_out.0.diff",
                                                     "to_out.0.diff_b"}
    config = json.loads(meta["aligned_trainer.config"])
    assert config["lora"]["algorithm"] == "full"
    comfy = request.getfixturevalue("comfy")
    F = comfy.engine("train.te_swap_files")
    model, vae = _swap_base(request, name)  # the tiny base the server's workflow loaded (same weights)
    unmapped = F.unmapped_diff_keys(model, load_file(str(unet)))
    assert unmapped == [], f"{len(unmapped)} unmapped keys, e.g. {unmapped[:3]}"  # the stock LoRA loader maps all
    # the projection file reads back as the run's projection: T5 (128) -> the UNet's context width, its reset,
    # spreads within 5 %
    swap = F.load_projection(proj)
    assert swap.in_dim == 128 and swap.out_dim == TE_SWAP_BASES[name][1] and swap.reset == "cross_attention"
    assert abs(swap.std_projected - swap.std_old) <= 0.05 * swap.std_old
    # the stock KSampler's sample (T5 prompts through Apply Text Encoder Swap) and the loss plot were saved
    images = [img for nid in by_type["SaveImage"] for img in outputs.get(nid, {}).get("images", [])]
    assert {i["filename"].split("_")[0] for i in images} >= {"sample", "loss"}, images
    for img in images:
        assert (srv.output_dir / img.get("subfolder", "") / img["filename"]).stat().st_size > 0
    # Train Steps' previews (Preview Plan of T5 prompts, every step): one per step, written by this run, each the
    # projected prompts on the model of that step, so the step-2 preview is not the step-1 one
    (ts_id,) = by_type["AlignedTrainer_TrainSteps"]
    assert api[ts_id]["inputs"]["steps"] == TE_SWAP_STEPS == 2
    folder = srv.temp_dir / "temp" / "aligned_trainer_previews"
    shots = {s: folder / f"node{ts_id}_step{s:07d}.jpg" for s in (1, 2)}
    assert all(p.exists() for p in shots.values()), sorted(folder.glob("*"))
    assert all(p.stat().st_mtime >= queued_at - 1 for p in shots.values())  # not an earlier run's files
    a, b = (np.asarray(Image.open(shots[s]).convert("RGB"), dtype=np.float32) for s in (1, 2))
    diff = float(np.abs(a - b).mean())
    assert a.shape == b.shape and diff > 0.2, diff  # mean |step 2 - step 1| in 8-bit levels
    extra = ""
    if swap.pooled_dim:
        extra = _check_projected_pooled(srv, api, outputs, by_type, shown, unet, proj, swap, model, vae, comfy)
    print(f"{name}: ran in {seconds:.1f}s; previews at steps 1 and 2 differ by {diff:.2f} levels on average{extra}")


def _check_projected_pooled(srv, api, outputs, by_type, shown, unet, proj, swap, model, vae, comfy) -> str:
    """A swap on an adm model (SDXL) set up with ``pooled = projected``: the setup's shown pooled spreads match
    (within 5 %); the projection file holds the pooled Linear (T5 128 -> the adm's pooled width) with its fixed scale,
    and that Linear was trained (it differs from its seeded init, which the file's states' Linear still lies near:
    2 steps at lr 1e-3); the saved sample is the stock graph's sample with the projected pooled vector: the tiny base
    + the saved UNet file through the stock LoRA loader, the workflow's prompts encoded by the tiny T5 and projected
    by the saved projection (Apply Text Encoder Swap), the workflow's KSampler and VAE decode reproduce the saved
    image (within 1 of 255 levels, and 10x nearer on average than the same render with the pooled vector zeroed)."""
    import comfy.sd as comfy_sd
    import numpy as np
    import torch
    from PIL import Image
    from safetensors import safe_open
    from safetensors.torch import load_file

    from support.factories import families

    (setup_id,) = by_type["AlignedTrainer_TextEncoderSwapSetup"]
    assert api[setup_id]["inputs"]["pooled"] == "projected", api[setup_id]["inputs"]
    m = re.search(r"pooled 128->(\d+) projected: old pooled std ([\d.]+), output ([\d.]+)", shown)
    assert m and int(m[1]) == swap.pooled_dim and abs(float(m[3]) - float(m[2])) <= 0.05 * float(m[2]), shown
    # the pooled Linear in the projection file, trained from its seeded init
    with safe_open(str(proj), framework="pt") as f:
        keys = set(f.keys())
    assert {"pooled.weight", "pooled.bias", "pooled_scale"} <= keys, sorted(keys)
    assert swap.pooled_in == 128 and float(swap.projection["pooled_scale"]) > 0
    S = comfy.engine("train.te_swap")
    init = S.Projection(swap.in_dim, swap.out_dim, swap.kind, swap.pooled_dim, swap.pooled_in).init_(swap.seed)
    init = init.state_dict()
    moved = {k: float((swap.projection[k].float() - init[k]).abs().max()) for k in ("net.0.weight", "pooled.weight")}
    assert 0 < moved["net.0.weight"] < 0.01, moved  # the seeded init recomputed here is the run's (2 steps of 1e-3)
    assert 0 < moved["pooled.weight"] < 0.01, moved  # the pooled Linear trained
    # the saved sample: the stock graph on the saved files, with the projected pooled vector and with zeros
    (ks_id,) = by_type["KSampler"]
    (el_id,) = by_type["EmptyLatentImage"]
    ks, el = api[ks_id]["inputs"], api[el_id]["inputs"]
    texts = {}
    for side in ("positive", "negative"):
        ap_id = ks[side][0]
        enc_id = api[ap_id]["inputs"]["conditioning"][0]
        texts[side] = api[enc_id]["inputs"]["text"]
    n = comfy.nodes
    t5 = comfy.engine("te.align").align_clip(families.build_clip("chroma"), "chroma")
    patched, _ = comfy_sd.load_lora_for_models(model, None, load_file(str(unet)), 1.0, 0.0)  # Load LoRA (model only)
    conds = {}
    with torch.inference_mode():
        for side, text in texts.items():
            (c,) = n.CLIPTextEncode().encode(t5, text)
            (conds[side],) = comfy.call("AlignedTrainer_ApplyTextEncoderSwap", conditioning=c, swap=swap)
        assert all(float(c[0][1]["pooled_output"].abs().max()) > 0 for c in conds.values())

        def sample(cs) -> np.ndarray:
            (lat,) = n.EmptyLatentImage().generate(el["width"], el["height"], el["batch_size"])
            (res,) = n.common_ksampler(patched, ks["seed"], ks["steps"], ks["cfg"], ks["sampler_name"],
                                       ks["scheduler"], cs["positive"], cs["negative"], lat, denoise=ks["denoise"])
            img = vae.decode(res["samples"])[0]
            return np.clip(255.0 * img.cpu().numpy(), 0, 255).astype(np.uint8).astype(np.float32)

        got = sample(conds)
        zeroed = {s: [[c[0][0], {**c[0][1], "pooled_output": torch.zeros_like(c[0][1]["pooled_output"])}]]
                  for s, c in conds.items()}
        other = sample(zeroed)
    (si,) = [i for nid in by_type["SaveImage"] for i in outputs[nid]["images"] if i["filename"].startswith("sample")]
    saved = np.asarray(Image.open(srv.output_dir / si["subfolder"] / si["filename"]).convert("RGB"), dtype=np.float32)
    # (8-bit levels, mean over the pixels) the tiny SDXL's one-step sample moves little with its adm's pooled input
    # (measured: 0.04 levels on average between the zero and the projected vector), against float noise of about
    # 1e-4 (a pixel or two rounded the other way): the saved sample must be 10x nearer to the projected one
    near, zero = float(np.abs(got - saved).mean()), float(np.abs(other - saved).mean())
    assert got.shape == saved.shape and float(np.abs(got - saved).max()) <= 1.0, float(np.abs(got - saved).max())
    assert zero > 0.01 and 10 * near < zero, (near, zero)  # the saved sample is the projected pooled vector's
    return (f"; pooled Linear moved {moved['pooled.weight']:.2e} from its init; the saved sample is "
            f"{near:.1e} levels (mean) from the projected-pooled render, {zero:.3f} from the zero-pooled one")
