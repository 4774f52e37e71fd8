"""The shipped text-encoder swap workflow (workflows/train_te_swap_sd15.json) through the real ComfyUI server's HTTP
API, on tiny models: the tiny SD1.5 checkpoint and the tiny T5 of the Chroma bundle (the test-only
TinyTextEncoderLoader in place of CLIPLoader, which builds T5-XXL at full size), a 2-image 64 px dataset, 2 steps,
batch 1. It sets up the swap (the measured spreads are shown under the node), trains the cross-attention as full
weights with the projection, previews every step through its Preview Plan (T5 prompts, projected), saves both files
(the UNet file maps completely in ComfyUI's stock LoRA loader; the projection file reads back as the trained
projection) and samples through Apply Text Encoder Swap with the stock KSampler."""
from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from support.paths import REPO
from support.factories.dataset import make_dataset
from support.tiny_workflows import TE_SWAP, TE_SWAP_DATASET
from support.workflow import load, ui_to_api, validate

NAME = "train_te_swap_sd15"


def _tiny(api: dict) -> dict:
    """The shipped API prompt with TE_SWAP's loader and size changes (nothing else)."""
    loaders, shrink = TE_SWAP[NAME]
    out = copy.deepcopy(api)
    for node in out.values():
        t = node["class_type"]
        if t in loaders:
            new_type, inputs = loaders[t]
            if new_type is not None:
                node["class_type"], node["inputs"] = new_type, {}
            node["inputs"].update(inputs)
        for k, v in shrink.get(t, {}).items():
            assert k in node["inputs"], f"{t} has no input {k}"
            node["inputs"][k] = v
    return out


@pytest.mark.server
def test_te_swap_workflow_runs_through_the_server(comfy, sd15, family_server):
    srv = family_server
    if not (srv.input_dir / TE_SWAP_DATASET).exists():
        make_dataset(srv.input_dir / TE_SWAP_DATASET, n=2, sizes=((64, 64),))
    wf = load(REPO / "workflows" / f"{NAME}.json")
    assert validate(wf, srv.info) == []
    api = ui_to_api(wf, srv.info)
    t0 = time.time()
    entry = srv.run(_tiny(api), timeout=300)
    seconds = time.time() - t0
    status = entry["status"]
    assert status["status_str"] == "success" and status["completed"], status
    by_type: dict[str, list[str]] = {}
    for nid, node in api.items():
        by_type.setdefault(node["class_type"], []).append(nid)
    outputs = entry["outputs"]
    (setup_id,) = by_type["AlignedTrainer_TextEncoderSwapSetup"]
    shown = outputs[setup_id]["text"][0]
    m = re.search(r"old encoder token std ([\d.]+).*output std ([\d.]+)", shown)
    assert m and abs(float(m[2]) - float(m[1])) <= 0.05 * float(m[1]), shown
    assert "reset cross_attention" in shown and "(154 tokens of 2 captions)" in shown
    (save_id,) = by_type["AlignedTrainer_SaveTextEncoderSwap"]
    saved = json.loads(outputs[save_id]["text"][0])
    unet, proj = Path(saved["unet_file"]), Path(saved["projection_file"])
    assert unet.parent == srv.base / "models" / "loras" and proj.parent == srv.base / "models" / "te_projections"
    with safe_open(str(unet), framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert keys and all(k.startswith("diffusion_model.") and k.endswith((".diff", ".diff_b")) for k in keys)
    assert {k.split(".attn2.")[1] for k in keys} == {"to_q.diff", "to_k.diff", "to_v.diff", "to_out.0.diff",
                                                     "to_out.0.diff_b"}
    assert json.loads(meta["aligned_trainer.config"])["lora"]["algorithm"] == "full"
    F = comfy.engine("train.te_swap_files")
    from safetensors.torch import load_file

    assert F.unmapped_diff_keys(sd15[0], load_file(str(unet))) == []  # the stock LoRA loader patches every key
    swap = F.load_projection(proj)
    assert swap.in_dim == 128 and swap.out_dim == 768 and swap.reset == "cross_attention"
    assert abs(swap.std_projected - swap.std_old) <= 0.05 * swap.std_old
    images = [img for nid in by_type["SaveImage"] for img in outputs.get(nid, {}).get("images", [])]
    assert {i["filename"].split("_")[0] for i in images} >= {"sample", "loss"}, images
    for img in images:
        assert (srv.output_dir / img.get("subfolder", "") / img["filename"]).stat().st_size > 0
    # Train Steps' previews (Preview Plan of T5 prompts, every step): one per step, each the projected prompts on the
    # model of that step, so the step-2 preview is not the step-1 one
    (ts_id,) = by_type["AlignedTrainer_TrainSteps"]
    folder = srv.temp_dir / "temp" / "aligned_trainer_previews"
    shots = {s: folder / f"node{ts_id}_step{s:07d}.jpg" for s in (1, 2)}
    assert all(p.exists() for p in shots.values()), sorted(folder.glob("*"))
    import numpy as np
    from PIL import Image

    a, b = (np.asarray(Image.open(shots[s]).convert("RGB"), dtype=np.float32) for s in (1, 2))
    diff = float(np.abs(a - b).mean())
    assert a.shape == b.shape and diff > 0.2, diff  # mean |step 2 - step 1| in 8-bit levels
    print(f"{NAME}: ran in {seconds:.1f}s; previews at steps 1 and 2 differ by {diff:.2f} levels on average")

