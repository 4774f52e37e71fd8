"""Metadata of saved LoRA files, the fields other tools read:

- ``modelspec.*``: the SAI model spec (``sai_model_spec`` 1.0.0: architecture ``<base>/lora``, implementation,
  title, resolution ``WxH``, date, prediction type, encoder layer), values as kohya sd-scripts writes them;
- ``ss_*``: the kohya fields A1111, Forge and civitai read (base model version and ``ss_v2``, which A1111 uses
  to file a LoRA under SD1/SD2/SDXL; network module/dim/alpha/args; resolution; tag frequency, bucket info and
  dataset folders from the dataset report, folder names only, never absolute paths; hashes);
- ``sshs_model_hash`` / ``sshs_legacy_hash``: the hashes sd-webui-additional-networks and A1111 compute
  (sha256 of the safetensors tensor data after the header; sha256 of 64 KiB at offset 1 MiB), computed as kohya
  precomputes them: over the file's bytes as written with its ``ss_*`` metadata.

Family facts (base model version, architecture, implementation, default resolution) come from
``lora_formats.json`` through ``naming.family_facts``."""
from __future__ import annotations

import datetime
import hashlib
import json
import time

import safetensors.torch
import torch

from . import naming

PREDICTION = {"EPS": "epsilon", "V_PREDICTION": "v", "V_PREDICTION_EDM": "v", "EDM": "epsilon"}


def data_hash(file_bytes: bytes) -> str:
    """sha256 of the tensor data of a safetensors file (everything after the 8-byte length and the header)."""
    n = int.from_bytes(file_bytes[:8], "little")
    return hashlib.sha256(file_bytes[8 + n:]).hexdigest()


def legacy_hash(file_bytes: bytes) -> str:
    return hashlib.sha256(file_bytes[0x100000:0x110000]).hexdigest()[:8]


def kohya_hashes(tensors: dict[str, torch.Tensor], md: dict[str, str]) -> dict[str, str]:
    """``sshs_model_hash`` and ``sshs_legacy_hash`` of the file as kohya precomputes them (the file written
    with only its ``ss_*`` metadata; the model hash does not depend on the header)."""
    raw = safetensors.torch.save(tensors, metadata={k: v for k, v in md.items() if k.startswith("ss_")})
    return {"sshs_model_hash": data_hash(raw), "sshs_legacy_hash": legacy_hash(raw)}


def _is_v(model) -> bool:
    mt = getattr(getattr(model, "model", model), "model_type", None)
    return getattr(mt, "name", "") in ("V_PREDICTION", "V_PREDICTION_EDM")


def _report(run) -> dict:
    return (run.training_set.meta or {}).get("report") or {}


def _resolution(run, facts: dict, v: bool) -> tuple[int, int]:
    rep = _report(run)
    if rep.get("resolution"):
        r = int(rep["resolution"])
        return r, r
    buckets = [tuple(s.bucket) for s in run.training_set.samples if s.bucket and s.bucket[0]]
    if buckets:
        return max(buckets, key=lambda b: b[0] * b[1])
    r = int(facts.get("resolution_v" if v else "resolution", 512) or 512)
    return r, r


def _bucket_info(run) -> dict:
    counts: dict[tuple[int, int], int] = {}
    for s in run.training_set.samples:
        counts[tuple(s.bucket)] = counts.get(tuple(s.bucket), 0) + 1
    return {"buckets": {str(i): {"resolution": list(b), "count": n} for i, (b, n) in enumerate(sorted(counts.items()))},
            "mean_img_ar_error": 0.0}


def _dataset_dirs(run) -> tuple[dict, dict]:
    """(``ss_dataset_dirs``, ``ss_tag_frequency``): per dataset folder name (no path) its repeats and image
    count, and its caption tag counts, from the dataset report."""
    rep = _report(run)
    dirs = rep.get("dataset_dirs") or {}
    tags = rep.get("tag_frequency_by_dir")
    if tags is None:  # an older report: one anonymous folder with the report's tag counts
        tags = {"dataset": dict(rep.get("tag_frequency") or [])}
    if not dirs:
        dirs = {"dataset": {"n_repeats": 1, "img_count": int(rep.get("images", len(run.training_set)))}}
    return dirs, tags


def _file_name(text: str) -> str:
    """The last part of a file name or path (either separator), as kohya writes ss_sd_model_name."""
    return (text or "").strip().replace("\\", "/").rsplit("/", 1)[-1]


def build(run, name: str, algorithm_module: str | None = None, started_at: float | None = None,
          now: float | None = None, base_model_name: str = "") -> dict[str, str]:
    """The ``modelspec.*`` and ``ss_*`` fields of the LoRA file ``name`` saved from ``run``. ``base_model_name``:
    the checkpoint file the run trained on, for ``ss_sd_model_name`` (ComfyUI's MODEL does not carry its file
    name; without it the model family's config class is written); only its file name is kept, never a folder."""
    facts = naming.family_facts(run.model)
    v = _is_v(run.model)
    now = time.time() if now is None else now
    started = (run.meta or {}).get("started_at") or started_at or now
    w, h = _resolution(run, facts, v)
    lora = run.lora
    title = name[:-len(".safetensors")] if name.endswith(".safetensors") else name
    arch = facts.get("architecture_v" if v and "architecture_v" in facts else "architecture")
    if lora.algorithm in ("loha", "lokr"):
        module = naming.lycoris_network_module()
        args = {"algo": lora.algorithm, "conv_dim": str(lora.rank), "conv_alpha": str(lora.scale_alpha)}
    else:
        module = facts.get("network_module", "networks.lora")
        args = {"conv_dim": str(lora.rank), "conv_alpha": str(lora.scale_alpha)} if lora.conv else {}
        if lora.dora:
            args["dora_wd"] = "True"
            if lora.dora_axis == "output":  # LyCORIS's name for the output axis
                args["wd_on_out"] = "True"
    te = run.te_spec or {}
    clip_skip = te.get("clip_skip")
    dirs, tags = _dataset_dirs(run)
    md = {
        "ss_base_model_version": facts.get("ss_base_model_version", ""),
        "ss_v2": facts.get("ss_v2", "False"),
        "ss_v_parameterization": str(v),
        "ss_network_module": module,
        "ss_network_args": json.dumps(args) if args else "",
        "ss_resolution": f"({w}, {h})",
        "ss_tag_frequency": json.dumps(tags),
        "ss_bucket_info": json.dumps(_bucket_info(run)),
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_output_name": title,
        "ss_sd_model_name": _file_name(base_model_name) or str((run.meta or {}).get("base_model_name")
                                                               or facts.get("config_class", "")),
        "ss_clip_skip": str(clip_skip) if clip_skip is not None else "None",
        "ss_training_started_at": str(started),
        "ss_training_finished_at": str(now),
        "ss_num_epochs": "1",
        "ss_enable_bucket": "True",
        "ss_caption_dropout_rate": str(run.training_set.caption_dropout),
    }
    ms = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora" if arch else "unknown/lora",
        "modelspec.implementation": facts.get("implementation", "https://github.com/comfyanonymous/ComfyUI"),
        "modelspec.title": title,
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(now)).isoformat(),
    }
    if "prediction_type" not in facts or facts["prediction_type"] is not None:
        ms["modelspec.prediction_type"] = "v" if v else "epsilon"
    if clip_skip is not None:
        ms["modelspec.encoder_layer"] = str(clip_skip)
    return {**md, **ms}
