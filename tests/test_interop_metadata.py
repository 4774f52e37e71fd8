"""Metadata of saved LoRAs (#17): the SAI model spec keys and the kohya ``ss_*`` fields A1111/Forge/civitai read,
checked against the rules those tools apply (written here from their documented behaviour, not copied):
A1111 files a LoRA under SDXL when ``ss_base_model_version`` starts with ``sdxl_`` (or the modelspec
architecture names SDXL), SD2 for ``sd_v2``, SD1 for ``sd_v1``; its LoRA hash is sha256 of the safetensors
tensor data after the header."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open

REQUIRED_MODELSPEC = ("modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
                      "modelspec.title", "modelspec.resolution")


def a1111_base(md: dict) -> str:
    """The base-model class A1111's Lora extension derives from a file's metadata."""
    version = md.get("ss_base_model_version", "")
    arch = md.get("modelspec.architecture", "")
    if version.startswith("sdxl_") or arch.startswith("stable-diffusion-xl"):
        return "SDXL"
    if version.startswith("sd_v2") or arch.startswith("stable-diffusion-v2"):
        return "SD2"
    if version.startswith("sd_v1") or arch.startswith("stable-diffusion-v1"):
        return "SD1"
    return "Unknown"


def addnet_hash(path) -> str:
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()


def _read(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def _family_run(comfy, bundle, name, tmp_path):
    types = comfy.engine("data.types")
    C, st, loop = comfy.engine("train.config"), comfy.engine("train.state"), comfy.engine("train.loop")
    model, clip, vae = bundle
    (cond,) = comfy.nodes.CLIPTextEncode().encode(clip, "ohwx, a red circle")
    with torch.no_grad():
        lat = vae.encode(torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0)))[0]
    report = {"images": 1, "resolution": 64, "dataset_dirs": {"5_ohwx": {"n_repeats": 5, "img_count": 1}},
              "tag_frequency_by_dir": {"5_ohwx": {"ohwx": 1, "a red circle": 1}}}
    ts = types.TrainingSet((types.Sample("a", lat, (types.CaptionVariant("ohwx", cond),), bucket=(64, 64)),),
                           meta={"report": report})
    run = loop.init_run(model, ts, C.LoraConfig(rank=4, alpha=4, preset="attention"), C.TimestepConfig(),
                        C.OptimizerConfig(lr=1e-3), st.RunSettings(run_name=name), runs_root=tmp_path)
    return loop.train_steps(run, 1)


@pytest.mark.parametrize("name,base,version,arch,module", [
    ("sdxl", "SDXL", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "networks.lora"),
    ("flux1-dev", "Unknown", "flux1", "flux-1-dev/lora", "networks.lora_flux"),
])
def test_family_metadata(comfy, family_bundle, tmp_path, name, base, version, arch, module):
    export = comfy.engine("train.export")
    run = _family_run(comfy, family_bundle(name), name, tmp_path)
    path, report = export.save_lora(run, f"meta_{name}", folder=tmp_path / "loras")
    md = _read(path)
    assert all(md.get(k) for k in REQUIRED_MODELSPEC), {k: md.get(k) for k in REQUIRED_MODELSPEC}
    assert md["modelspec.sai_model_spec"] == "1.0.0" and md["modelspec.architecture"] == arch
    assert md["modelspec.title"] == f"meta_{name}" and md["modelspec.resolution"] == "64x64"
    assert md["ss_base_model_version"] == version and a1111_base(md) == base
    assert md["ss_network_module"] == module
    assert md["sshs_model_hash"] == addnet_hash(path) == report["sshs_model_hash"]
    assert json.loads(md["ss_dataset_dirs"]) == {"5_ohwx": {"n_repeats": 5, "img_count": 1}}
    assert json.loads(md["ss_tag_frequency"]) == {"5_ohwx": {"ohwx": 1, "a red circle": 1}}
    assert json.loads(md["ss_bucket_info"])["buckets"]["0"] == {"resolution": [64, 64], "count": 1}
    assert float(md["ss_training_started_at"]) <= float(md["ss_training_finished_at"])
    for key in ("ss_v2", "ss_output_name", "ss_sd_model_name", "ss_clip_skip", "ss_resolution",
                "aligned_trainer.config", "aligned_trainer.te_spec"):
        assert key in md, key


def test_sd15_metadata_from_the_dataset_report(T, sd15, sd15_training_set, tmp_path):
    run = T.loop.init_run(sd15[0], sd15_training_set, T.C.LoraConfig(rank=4, alpha=4, preset="attention"),
                          T.C.TimestepConfig(), T.C.OptimizerConfig(lr=1e-3), T.st.RunSettings(run_name="m15"),
                          runs_root=tmp_path / "runs")
    path, _ = T.export.save_lora(T.loop.train_steps(run, 1), "meta_sd15", folder=tmp_path / "loras")
    md = _read(path)
    assert a1111_base(md) == "SD1" and md["ss_v2"] == "False"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora" and md["modelspec.prediction_type"] == "epsilon"
    rep = sd15_training_set.meta["report"]
    dirs = json.loads(md["ss_dataset_dirs"])
    assert dirs == rep["dataset_dirs"] and sum(d["img_count"] for d in dirs.values()) == rep["images"]
    assert all("/" not in d and "\\" not in d for d in dirs), "folder names only, no paths"
    tags = json.loads(md["ss_tag_frequency"])
    assert tags == rep["tag_frequency_by_dir"] and sum(sum(t.values()) for t in tags.values()) > 0
    assert md["ss_resolution"] == "(64, 64)" and md["sshs_model_hash"] == addnet_hash(path)


def test_started_at_survives_resume_and_model_name_is_the_checkpoint_file(T, sd15, sd15_training_set, tmp_path,
                                                                          monkeypatch):
    """ss_training_started_at is the run's first start, kept in the checkpoint across a resume (kohya writes the
    training start); ss_sd_model_name is the checkpoint's file name (no folders) when Save LoRA is told it, since
    ComfyUI's MODEL does not carry it, and the model family otherwise."""
    import time

    def init(resume, at):  # Train Init at a known clock time
        with monkeypatch.context() as m:
            m.setattr(time, "time", lambda: at)
            return T.loop.init_run(sd15[0], sd15_training_set, T.C.LoraConfig(rank=4, alpha=4, preset="attention"),
                                   T.C.TimestepConfig(), T.C.OptimizerConfig(lr=1e-3),
                                   T.st.RunSettings(run_name="started"), resume, runs_root=tmp_path / "runs")

    T.loop.train_steps(init("none", 1_000_000.0), 1, checkpoint_every=1)
    resumed = init("latest", 2_000_000.0)
    assert resumed.step == 1
    path, _ = T.export.save_lora(T.loop.train_steps(resumed, 1), "started", folder=tmp_path / "loras",
                                 base_model_name="/models/checkpoints/sub\\tiny-sd15.safetensors")
    md = _read(path)
    assert float(md["ss_training_started_at"]) == 1_000_000.0
    assert float(md["ss_training_finished_at"]) > 2_000_000.0
    assert md["ss_sd_model_name"] == "tiny-sd15.safetensors"
    path, _ = T.export.save_lora(resumed, "started_family", folder=tmp_path / "loras")
    assert _read(path)["ss_sd_model_name"] == "SD15"
