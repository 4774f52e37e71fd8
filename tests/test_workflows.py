"""Every shipped workflow is valid against the real node schemas and served as a template; the A/B training and
dataset-tools workflows run to completion through the real server (where the others run: below)."""
from __future__ import annotations

import pytest

from support import demo
from support.paths import REPO
from support.workflow import load, object_info_inprocess, ui_to_api, validate

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
# The tiny-SD1.5 workflows run to completion through the real server elsewhere: the demo whole in
# tests/test_main_command.py and from the frontend in test_browser_ui.py's training view; ab_aligned_vs_unaligned,
# te_alignment_report, token_heatmaps, dataset_tools and train_slider queued from the frontend in test_browser.py
# (success and what their nodes show checked there); ab_training_aligned_vs_unaligned and dataset_tools below.


def test_required_workflows_exist():
    names = {p.stem for p in WORKFLOWS}
    assert {"demo_train_tiny", "train_lora_sd15", "train_lora_sdxl", "train_lora_sd35", "train_lora_flux1",
            "ab_aligned_vs_unaligned", "te_alignment_report", "ab_training_aligned_vs_unaligned"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_valid(comfy, path):
    info = object_info_inprocess(comfy.nodes)
    wf = load(path)
    assert validate(wf, info) == []
    assert any(n["type"] == "Note" and len(n["widgets_values"][0]) > 80 for n in wf["nodes"]), "needs a Note"
    api = ui_to_api(wf, info)
    assert all(not n["class_type"] == "Note" for n in api.values())


def test_validator_catches_bad_workflows(comfy):
    import copy

    info = object_info_inprocess(comfy.nodes)
    wf = load(REPO / "workflows" / "ab_aligned_vs_unaligned.json")
    bad = copy.deepcopy(wf)
    bad["nodes"][1]["type"] = "NoSuchNode"
    assert any("unknown type" in p for p in validate(bad, info))
    bad = copy.deepcopy(wf)
    ab = next(n for n in bad["nodes"] if n["type"] == "AlignedTrainer_ABCompare")
    link = next(link for link in bad["links"] if link[3] == ab["id"] and ab["inputs"][link[4]]["name"] == "vae")
    link[1], link[2] = next(n["id"] for n in bad["nodes"] if n["type"] == "CheckpointLoaderSimple"), 0  # MODEL -> vae
    assert any("wants VAE" in p for p in validate(bad, info))
    bad = copy.deepcopy(wf)
    ab = next(n for n in bad["nodes"] if n["type"] == "AlignedTrainer_ABCompare")
    ab["widgets_values"][ab["widgets_values"].index("euler")] = "no_such_sampler"
    assert any("sampler_name" in p for p in validate(bad, info))


@pytest.mark.parametrize("name", ["demo_train_tiny", "dataset_tools", "ab_training_aligned_vs_unaligned"])
def test_training_vae_comes_from_a_load_vae_node(name):
    """The tool workflows' VAE is a visible choice: every VAE input (latent caching, previews, decoding) is linked
    from ComfyUI's stock Load VAE, which names the tiny SD1.5's VAE file that demo.prepare_inputs places, and a
    Note beside it says training uses it. The checkpoint loader's own VAE output feeds nothing."""
    wf = load(REPO / "workflows" / f"{name}.json")
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {link[0]: link for link in wf["links"]}
    vae_inputs = [(n["id"], i["name"], i["link"]) for n in wf["nodes"] for i in n.get("inputs", [])
                  if i["type"] == "VAE"]
    assert vae_inputs, name
    for nid, inp, lid in vae_inputs:
        assert lid is not None, f"{name}: node {nid} input {inp} is not connected"
        src = nodes[links[lid][1]]
        assert src["type"] == "VAELoader", f"{name}: node {nid} ({nodes[nid]['type']}) {inp} comes from {src['type']}"
        assert src["widgets_values"] == [demo.DEMO_VAE]
    for n in wf["nodes"]:
        for o in n.get("outputs", []):
            if o["type"] == "VAE" and n["type"] != "VAELoader":
                assert not o["links"], f"{name}: {n['type']}'s VAE still feeds links {o['links']}"
    assert any(n["type"] == "Note" and n["widgets_values"] == ["Training uses this VAE: pick the VAE you will "
                                                              "sample with"] for n in wf["nodes"])


def test_demo_vae_file_is_the_checkpoints_vae(comfy, comfy_dirs, sd15):
    """The standalone tiny VAE (sd15.vae_file) loads through the stock VAELoader as an SD VAE with the very
    weights the tiny checkpoint's VAE has, so the demo trains and samples as it did with the checkpoint's VAE."""
    import torch

    demo.prepare_inputs(comfy_dirs["input"], comfy_dirs["models"] / "checkpoints")
    (vae,) = comfy.nodes.VAELoader().load_vae(demo.DEMO_VAE)
    ref = sd15[2].first_stage_model.state_dict()
    got = vae.first_stage_model.state_dict()
    assert got.keys() == ref.keys() and len(got) > 100
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert vae.latent_channels == 4 and vae.downscale_ratio == sd15[2].downscale_ratio


@pytest.mark.server
def test_workflows_are_served_as_templates(server):
    templates = server.get("/api/workflow_templates")
    ours = next((v for k, v in templates.items() if "aligned" in k.lower()), None)
    assert ours is not None, templates
    assert {"demo_train_tiny", "train_lora_flux1"} <= set(ours)


@pytest.mark.server
def test_ab_training_runs_differ_only_in_the_text_encoder(server, comfy_dirs, sd15_checkpoint):
    """The A/B training workflow's two runs share data, seed and every setting; their recorded configs differ in
    the run name only, their text-encoder records in the spec and caption reading (aligned: sd15, literal;
    unaligned: none, ComfyUI's syntax). Both LoRAs, the chart and the 4-row grid are written."""
    import json

    demo.prepare_inputs(server.input_dir, sd15_checkpoint.parent)
    path = REPO / "workflows" / "ab_training_aligned_vs_unaligned.json"
    entry, seconds = demo.run_workflow(server, path)
    assert entry["status"]["status_str"] == "success"
    wf = load(path)
    rep_id = next(str(n["id"]) for n in wf["nodes"] if n["type"] == "AlignedTrainer_ABTrainingReport")
    rec = json.loads(entry["outputs"][rep_id]["text"][0])
    a, b = rec["a"], rec["b"]
    assert a["config"]["settings"]["run_name"] == "ab_aligned" and b["config"]["settings"]["run_name"] == "ab_unaligned"
    assert {d for d in rec["differences"] if d.startswith("config/")} == {"config/settings/run_name"}
    assert a["config"]["settings"]["seed"] == b["config"]["settings"]["seed"] and a["dataset_hash"] == b["dataset_hash"]
    assert a["te_spec"]["id"] == "sd15" and a["prompt_syntax"] == "literal"
    assert b["te_spec"] is None and b["prompt_syntax"] == "comfyui"
    assert set(rec["differences"]) <= {"config/settings/run_name", "te_spec", "prompt_syntax", "clip_id"}
    assert rec["grid_rows"] == ["aligned LoRA + aligned CLIP", "unaligned LoRA + unaligned CLIP",
                                "aligned LoRA + unaligned CLIP", "unaligned LoRA + aligned CLIP"]
    for name in ("ab_aligned_lora", "ab_unaligned_lora"):
        assert (comfy_dirs["models"] / "loras" / f"{name}.safetensors").exists()
    files = {f.name.rsplit("_", 2)[0] for f in demo.output_files(entry, server.output_dir)}
    assert {"validation_loss", "lora_clip_grid"} <= files, files
    print(f"A/B training workflow ran in {seconds:.1f}s")


@pytest.mark.server
def test_dataset_tools_workflow_cleans_into_copies_and_reports_worst_first(server, comfy_dirs, sd15_checkpoint):
    """The dataset-tools template through the real server: the user's dataset files are byte-identical after the
    run, the cleaned copies are in the output folder's cache, both grids are saved, and the VAE report (as the
    Preview as Text node shows it) lists one row per image, worst PSNR first."""
    import hashlib
    import json

    demo.prepare_inputs(server.input_dir, sd15_checkpoint.parent)
    data = server.input_dir / "demo_dataset"
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(data.rglob("*")) if p.is_file()}
    path = REPO / "workflows" / "dataset_tools.json"
    entry, _ = demo.run_workflow(server, path)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(data.rglob("*")) if p.is_file()} == before
    n_images = sum(1 for p in before if p.suffix == ".png")
    # this dataset's cleaned copies (named by the source's hash: other tests clean other images on this server)
    cleaned = [c for p, sha in before.items() if p.suffix == ".png"
               for c in (server.output_dir / "aligned_trainer" / "cache" / "cleaned").glob(f"{sha[:24]}-*.png")]
    assert len(cleaned) == n_images
    files = demo.output_files(entry, server.output_dir)
    assert {f.parent.name + "/" + f.name.rsplit("_", 2)[0] for f in files} == {"dataset_tools/cleaning",
                                                                              "dataset_tools/vae_roundtrip"}
    texts = [json.loads(out["text"][0]) for out in entry["outputs"].values() if "text" in out]
    vae = next(t for t in texts if "thresholds" in t)
    clean = next(t for t in texts if "method" in t)
    assert len(vae["images"]) == n_images and len(clean["images"]) == n_images
    psnr = [r["psnr"] for r in vae["images"]]
    assert psnr == sorted(psnr)
    assert clean["written"] + clean["reused"] == n_images
