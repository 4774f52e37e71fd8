"""The pieces behind the frontend (issue #18), in-process: the run clock (ETA with validation, checkpoints
and previews; overall progress that never goes back), the dataset routes' input-folder guard and folder
summary, the generated display-name locale, and the template metadata (models lists, cards)."""
from __future__ import annotations

import importlib
import json
import os
import sys

import pytest

from support.factories.dataset import make_dataset
from support.paths import REPO
from support.workflow import load, object_info_inprocess


def _pack(comfy, name):
    """A module of the pack as ComfyUI loaded it (package name = the folder under custom_nodes)."""
    pkg = next(m for m in sys.modules if m.endswith(".nodes._common"))[: -len(".nodes._common")]
    return importlib.import_module(f"{pkg}.{name}")


class FakeTime:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_run_clock_eta_counts_extras_still_to_come(comfy):
    progress = _pack(comfy, "nodes._progress")
    now = FakeTime()
    # 20 steps from step 0: a step costs 1 s, validation every 5 adds 3 s, a preview every 10 costs 4 s
    clock = progress.RunClock(0, 20, {"validation": 5, "preview": 10}, now=now)
    etas, overall = [], []
    for step in range(1, 21):
        now.t += 1.0 + (3.0 if step % 5 == 0 else 0.0)
        clock.step(step, ("validation",) if step % 5 == 0 else ())
        etas.append(clock.eta())
        overall.append(clock.fraction())
        if step % 10 == 0:
            now.t += 4.0
            clock.extra("preview")
    # after one validation and one preview are seen, the ETA is exact: steps, validations and previews left
    assert etas[10] == pytest.approx(9 * 1.0 + 2 * 3.0 + 1 * 4.0)  # after step 11: steps 12-20, val 15 & 20, preview 20
    assert etas[14] == pytest.approx(5 * 1.0 + 1 * 3.0 + 1 * 4.0)
    assert etas[-1] == 0.0
    assert all(b >= a for a, b in zip(overall, overall[1:])) and overall[-1] == 1.0
    assert len(set(overall)) > 10
    assert progress.due(0, 20, 5) == 4 and progress.due(7, 20, 10) == 2 and progress.due(3, 3, 1) == 0


def test_dataset_route_guard_and_summary(comfy, comfy_dirs, tmp_path):
    routes = _pack(comfy, "nodes.routes")
    root = comfy_dirs["input"]
    make_dataset(root / "ui_set", n=5, sizes=((64, 64), (128, 64)))
    (root / "ui_set" / "1_ohwx" / "img_000.txt").unlink()  # one image without a caption
    assert routes.input_folder("ui_set") == (root / "ui_set").resolve()
    for bad in ("", "../x", "ui_set/../../x", "/etc", "C:\\x", "..\\x"):
        with pytest.raises(routes.BadName):
            routes.input_folder(bad)
    os.symlink(tmp_path, root / "ui_link_out")
    with pytest.raises(routes.BadName, match="not inside a folder this server reads"):
        routes.input_folder("ui_link_out")
    # what the picker shows agrees with what the Dataset node builds from the same folder
    summary = _pack(comfy, "aligned_trainer.data.summary")
    buckets = _pack(comfy, "aligned_trainer.data.buckets")
    dataset = _pack(comfy, "aligned_trainer.data.dataset")
    captions = _pack(comfy, "aligned_trainer.data.captions")
    cfg = buckets.BucketConfig(128, 64, 256, 64)
    out = summary.folder_summary(routes.input_folder("ui_set"), cfg, limit=3)
    built = dataset.from_folder(root / "ui_set", captions.CaptionConfig(), cfg).report()
    assert out["images"] == built["images"] == 5 and out["captions"] == 4
    assert out["buckets"] == built["per_bucket"] and sum(out["buckets"].values()) == 5
    assert [s["file"] for s in out["shown"]] == [f"1_ohwx/img_{i:03d}.png" for i in range(3)]
    assert out["shown"][0]["caption"] == "" and out["shown"][1]["caption"]


def test_locale_matches_node_schemas(comfy):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import build_locales
    finally:
        sys.path.remove(str(REPO / "scripts"))
    info = object_info_inprocess(comfy.nodes)
    assert (REPO / "locales" / "en" / "nodeDefs.json").read_text(encoding="utf-8") == build_locales.render(info), \
        "locales/en/nodeDefs.json is stale: run .work/venv/bin/python scripts/build_locales.py"
    names = json.loads((REPO / "locales" / "en" / "nodeDefs.json").read_text())
    assert names["AlignedTrainer_TrainSteps"]["display_name"] == "Train Steps"


def test_templates_declare_models_and_have_cards():
    from PIL import Image

    for path in sorted((REPO / "workflows").glob("*.json")):
        wf = load(path)
        card = path.with_suffix(".jpg")
        assert card.exists(), f"{card.name} missing: run scripts/build_workflows.py"
        with Image.open(card) as im:
            assert im.format == "JPEG" and im.size == (512, 384)
        meta = wf["extra"].get("aligned_trainer", {})
        assert meta.get("description") and meta["description"] != path.stem, path.name
        for node in wf["nodes"]:
            for m in node.get("properties", {}).get("models", []):
                assert m["name"] in node["widgets_values"] and m["url"].startswith("https://huggingface.co/")
                assert m["url"].endswith("/" + m["name"]) and m["directory"] in (
                    "checkpoints", "text_encoders", "diffusion_models", "vae")
        if path.stem.startswith("train_lora_"):
            loaders = [n for n in wf["nodes"] if n["type"] in ("CheckpointLoaderSimple", "UNETLoader", "VAELoader",
                                                               "DualCLIPLoader", "TripleCLIPLoader", "QuadrupleCLIPLoader",
                                                               "CLIPLoader")]
            named = {v for n in loaders for v in n["widgets_values"] if str(v).endswith(".safetensors")}
            declared = {m["name"] for n in loaders for m in n.get("properties", {}).get("models", [])}
            assert named == declared, (path.name, named - declared)
