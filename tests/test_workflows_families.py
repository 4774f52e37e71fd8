"""The shipped family workflows (train_lora_sd15 / _sdxl / _sd35 / _flux1) run to completion through the real
ComfyUI server on tiny generated models: each trains, saves a LoRA that ComfyUI's stock LoRA loader maps
completely, and leaves its sample grid, loss plot and timestep histogram.

What the test changes in each shipped workflow's API prompt, and nothing else (checked by
``test_substitutions_touch_only_loaders_and_sizes``):

1. Loader nodes, because the shipped ones name real model files (``v1-5-pruned-emaonly.safetensors``,
   ``flux1-dev.safetensors``...). Where a stock loader detects a tiny model, the loader stays and only its
   file name is rewritten to a generated file in the server's model folders:
   - SD1.5: ``CheckpointLoaderSimple`` <- ``tiny-sd15.safetensors`` (one-level 320-channel UNet, CLIP-L,
     SD VAE: ``support.factories.sd15``);
   - SD3.5: ``CheckpointLoaderSimple`` <- ``tiny-sd3.safetensors`` (tiny SD3 MMDiT + 16-channel VAE, no text
     encoders: ``support.factories.family_files``; detected as SD3 from ``in_channels`` 16);
   - FLUX.1: ``VAELoader`` <- ``tiny-flux1-ae.safetensors`` (16-channel VAE).
   Where stock detection only accepts full-size models, the loader node's class is replaced by a test-only
   loader with the same output types and slots (tests/support/comfy_nodes/aligned_trainer_tiny_loaders,
   on the server's ``custom_nodes`` path) that loads the tiny bundle of ``support.factories.families`` by
   family name through ComfyUI's own model, text-encoder and VAE classes:
   - SDXL: ``CheckpointLoaderSimple`` -> ``TinyCheckpointLoader(sdxl)``: SDXL is matched only at its real
     UNet size (model_channels 320, transformer_depth [0, 0, 2, 2, 10, 10], context_dim 2048);
   - SD3.5: ``TripleCLIPLoader`` -> ``TinyTextEncoderLoader(sd3)``;
   - FLUX.1: ``DualCLIPLoader`` -> ``TinyTextEncoderLoader(flux1-dev)``: the CLIP loaders recognise CLIP-G
     by its 31st layer and T5-XXL by its 24th block and build them from full-size configs;
   - FLUX.1: ``UNETLoader`` -> ``TinyDiffusionModelLoader(flux1-dev)``: FLUX detection fixes 24 heads of 128
     (hidden 3072) whatever the file holds.
2. Sizes and step counts, so that each run takes seconds on a CPU (``SHRINK``): dataset resolution and bucket
   sides 64; 4 training steps with a checkpoint and a validation pass every 2 (``total_steps`` of the
   optimizer 4); preview plan and final sample preview 2 sampling steps at 64x64, the plan rendering every 2
   steps, the final preview labelled step 4. The dataset folder keeps the shipped name ``my_dataset``
   (4 generated 64 px captioned images in the server's input folder).

Everything else is the shipped workflow: the aligned text-encoder node with its spec, dataset and caches,
LoRA config (rank, targets), timestep strategy, optimizer, Train Init, Train Steps, Save LoRA, sample preview,
loss graph and the Save/Preview Image nodes, with their links.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest

from support.factories import family_files, sd15
from support.factories.dataset import make_dataset
from support.paths import REPO
from support.server import ComfyServer
from support.workflow import load, ui_to_api, validate

TEST_NODES = Path(__file__).resolve().parent / "support" / "comfy_nodes"
TINY = "AlignedTrainerTests_Tiny"

# workflow -> (family of support.factories.families whose LoRA keys the saved file must map to, or "sd15";
#              loader substitutions: class_type -> (new class_type or None to keep, inputs))
FAMILIES = {
    "train_lora_sd15": ("sd15", {"CheckpointLoaderSimple": (None, {"ckpt_name": "tiny-sd15.safetensors"})}),
    "train_lora_sdxl": ("sdxl", {"CheckpointLoaderSimple": (f"{TINY}CheckpointLoader", {"family": "sdxl"})}),
    "train_lora_sd35": ("sd3", {"CheckpointLoaderSimple": (None, {"ckpt_name": "tiny-sd3.safetensors"}),
                                "TripleCLIPLoader": (f"{TINY}TextEncoderLoader", {"family": "sd3"})}),
    "train_lora_flux1": ("flux1-dev", {"UNETLoader": (f"{TINY}DiffusionModelLoader", {"family": "flux1-dev"}),
                                       "DualCLIPLoader": (f"{TINY}TextEncoderLoader", {"family": "flux1-dev"}),
                                       "VAELoader": (None, {"vae_name": "tiny-flux1-ae.safetensors"})}),
}
STEPS = 4
SHRINK = {
    "AlignedTrainer_Dataset": {"resolution": 64, "min_side": 64, "max_side": 64},
    "AlignedTrainer_TrainSteps": {"steps": STEPS, "checkpoint_every": 2, "val_every": 2},
    "AlignedTrainer_Optimizer": {"total_steps": STEPS},
    "AlignedTrainer_PreviewPlan": {"steps": 2, "width": 64, "height": 64, "every_n": 2},
    "AlignedTrainer_SamplePreview": {"steps": 2, "width": 64, "height": 64, "step": STEPS},
}


def tiny_prompt(api: dict, name: str) -> dict:
    """The shipped API prompt with its loaders pointed at the tiny models and its sizes shrunk (see above)."""
    out = copy.deepcopy(api)
    _, loaders = FAMILIES[name]
    for node in out.values():
        t = node["class_type"]
        if t in loaders:
            new_type, inputs = loaders[t]
            if new_type is not None:
                node["class_type"], node["inputs"] = new_type, {}
            node["inputs"].update(inputs)
        for k, v in SHRINK.get(t, {}).items():
            assert k in node["inputs"], f"{name}: {t} has no input {k}"
            node["inputs"][k] = v
    return out


@pytest.fixture(scope="module")
def family_server(tmp_path_factory, comfy):
    """A real ComfyUI server with the tiny model files in its model folders and the test-only loaders."""
    base = tmp_path_factory.mktemp("family_server")
    models = base / "models"
    folders = {k: models / k for k in ("checkpoints", "vae", "loras")}
    for d in folders.values():
        d.mkdir(parents=True)
    for link, src in ((folders["checkpoints"] / "tiny-sd15.safetensors", sd15.checkpoint()),
                      (folders["checkpoints"] / "tiny-sd3.safetensors", family_files.sd3_checkpoint()),
                      (folders["vae"] / "tiny-flux1-ae.safetensors", family_files.vae_file("flux1-dev"))):
        link.symlink_to(src)
    srv = ComfyServer(base, model_folders={**folders, "custom_nodes": TEST_NODES}, log_name="family-server.log")
    srv.start()
    try:
        make_dataset(srv.input_dir / "my_dataset", n=4, sizes=((64, 64),))
        srv.info = srv.get("/object_info")
        yield srv
    finally:
        srv.stop()


def test_substitutions_touch_only_loaders_and_sizes(comfy):
    """Guard on the test itself: what tiny_prompt changes is exactly the loaders and the SHRINK inputs."""
    from support.workflow import object_info_inprocess

    info = object_info_inprocess(comfy.nodes)
    for name, (_, loaders) in FAMILIES.items():
        api = ui_to_api(load(REPO / "workflows" / f"{name}.json"), info)
        tiny = tiny_prompt(api, name)
        assert tiny.keys() == api.keys()
        assert {n["class_type"] for n in api.values()} >= set(loaders), name
        for nid, node in api.items():
            new = tiny[nid]
            if node["class_type"] in loaders:
                continue
            assert new["class_type"] == node["class_type"]
            changed = {k for k in node["inputs"] if new["inputs"][k] != node["inputs"][k]}
            assert new["inputs"].keys() == node["inputs"].keys() and changed <= set(SHRINK.get(node["class_type"], {}))
        # links out of the substituted loaders are untouched (same node ids, same output slots)
        assert [v for n in tiny.values() for v in n["inputs"].values() if isinstance(v, list)] == \
               [v for n in api.values() for v in n["inputs"].values() if isinstance(v, list)]


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
    assert set(patched.patches) >= set(patches)
    return len(patches)


@pytest.mark.server
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_workflow_runs_on_tiny_models(comfy, family_server, request, name):
    srv = family_server
    wf = load(REPO / "workflows" / f"{name}.json")
    assert validate(wf, srv.info) == []
    api = ui_to_api(wf, srv.info)
    t0 = time.time()
    entry = srv.run(tiny_prompt(api, name), timeout=300)
    seconds = time.time() - t0
    status = entry["status"]
    assert status["status_str"] == "success" and status["completed"]
    assert not [m for m in status.get("messages", []) if m[0] == "execution_error"]

    by_type = {}
    for nid, node in api.items():
        by_type.setdefault(node["class_type"], []).append(nid)
    outputs = entry["outputs"]
    # Save LoRA: the file exists, was written by this run (4 steps), and maps completely in the stock loader
    (save_id,) = by_type["AlignedTrainer_SaveLora"]
    report = json.loads(outputs[save_id]["text"][0])
    lora = Path(report["path"])
    assert lora.parent == srv.base / "models" / "loras" and lora.name == f"{api[save_id]['inputs']['name']}.safetensors"
    assert lora.exists() and report["steps"] == STEPS and report["unmapped"] == 0
    family = FAMILIES[name][0]
    if family == "sd15":
        model = request.getfixturevalue("sd15")[0]  # the tiny checkpoint through CheckpointLoaderSimple
    else:
        from support.factories import families

        model = families.build_model(family)  # the MODEL the server's workflow trained (same weights)
    n_patches = _check_lora_loads(lora, model)
    # every Save Image (sample grid, loss plot) and Preview Image (timestep histogram) left its files
    names = set()
    for nid in by_type["SaveImage"] + by_type["PreviewImage"]:
        images = outputs.get(nid, {}).get("images", [])
        assert images, f"{name}: node {nid} ({api[nid]['class_type']}) produced no image"
        for img in images:
            root = srv.output_dir if img["type"] == "output" else srv.temp_dir / "temp"  # main.py adds "temp"
            f = root / img.get("subfolder", "") / img["filename"]
            assert f.exists() and f.stat().st_size > 0, f
            names.add(f"{img.get('subfolder', '')}/{img['filename']}")
    prefix = name.removeprefix("train_lora_")
    assert any(n.startswith(f"{prefix}_lora/sample_grid") for n in names), names
    assert any(n.startswith(f"{prefix}_lora/loss_plot") for n in names), names
    print(f"{name}: ran in {seconds:.1f}s, LoRA {lora.name} ({n_patches} patched weights)")
