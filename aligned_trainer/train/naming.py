"""Key names of saved LoRA files, per model family as its reference trainer writes them.

The facts are data (``lora_formats.json``, keyed by ComfyUI's model config class); the names themselves come
from ComfyUI's own tables: ``original`` families keep ComfyUI's module names (they are the original
checkpoint's), ``diffusers_unet`` families (SD1.x/SD2.x, which kohya sd-scripts trains on diffusers' UNet)
use the diffusers module name that ``comfy.utils.unet_to_diffusers`` maps to each ComfyUI module."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import comfy.utils

from . import model_facts

FORMATS = Path(__file__).with_name("lora_formats.json")


class NamingError(ValueError):
    pass


@functools.lru_cache(maxsize=1)
def _formats() -> dict:
    return json.loads(FORMATS.read_text())


def family_facts(model) -> dict:
    """The lora_formats.json entry of ``model`` (a ModelPatcher or BaseModel): the nearest class in its model
    config's class hierarchy that the file lists, with ``extends`` resolved; ``{}`` for an unlisted family
    (files then keep ComfyUI's module names, which ComfyUI's loader maps)."""
    families = _formats()["families"]
    found = model_facts.lookup(model, families)
    return {"config_class": found[0], **_resolve(families, found[0])} if found else {}


def _resolve(families: dict, name: str) -> dict:
    entry = dict(families[name])
    parent = entry.pop("extends", None)
    return {**_resolve(families, parent), **entry} if parent else entry


SAME_NAMES = "same"  # diffusers_names value: the diffusers model's module names are ComfyUI's (HiDream)


def diffusers_table(model) -> dict:
    """The family's diffusers -> ComfyUI table (``diffusers_names`` in lora_formats.json): the named
    ``comfy.utils`` function's map (``<diffusers>.weight`` -> ``diffusion_model.<ComfyUI>.weight`` or a
    (key, offset[, fn]) tuple), or with ``"same"`` each weight of the diffusion model under its own name."""
    base = getattr(model, "model", model)
    table = family_facts(model)["diffusers_names"]
    if table == SAME_NAMES:
        return {k: f"diffusion_model.{k}" for k in base.diffusion_model.state_dict() if k.endswith(".weight")}
    return getattr(comfy.utils, table)(base.model_config.unet_config)


def lycoris_network_module() -> str:
    return _formats()["lycoris_network_module"]


def module_prefixes(model, modules) -> dict[str, str]:
    """ComfyUI module name (inside the diffusion model) -> the key prefix (``lora_unet_...``) its family's
    reference trainer writes. A module the family's table does not cover raises NamingError."""
    scheme = family_facts(model).get("names", "original")
    if scheme == "original":
        return {m: "lora_unet_" + m.replace(".", "_") for m in modules}
    if scheme != "diffusers_unet":
        raise NamingError(f"unknown naming scheme '{scheme}' in {FORMATS.name}")
    base = getattr(model, "model", model)
    to_diffusers = {v[:-len(".weight")]: k[:-len(".weight")]
                    for k, v in comfy.utils.unet_to_diffusers(base.model_config.unet_config).items()
                    if k.endswith(".weight")}
    missing = [m for m in modules if m not in to_diffusers]
    if missing:
        raise NamingError(f"no diffusers name for module(s) {missing[:3]} in ComfyUI's unet_to_diffusers map; "
                          "exclude them from training (exclude regex) to save this LoRA")
    return {m: "lora_unet_" + to_diffusers[m].replace(".", "_") for m in modules}

