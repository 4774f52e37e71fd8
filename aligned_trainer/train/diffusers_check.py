"""Save-time check that diffusers' standard ``load_lora_weights`` would load every module of a LoRA file.

The file's keys go through the family pipeline's own ``lora_state_dict`` (diffusers' kohya converters, the
step ``load_lora_weights`` runs first); each converted module name must be a module of the diffusers model,
whose names come from ComfyUI's own ComfyUI -> diffusers tables (``comfy.utils.unet_to_diffusers``,
``flux_to_diffusers``, ``mmdit_to_diffusers``; which one is data: ``diffusers_names`` in lora_formats.json), or,
where ComfyUI has no such table (FLUX.2), from diffusers' own checkpoint converter for the family
(``diffusers_checkpoint_converter``).
peft injects adapters by these names, so a name that is not a module of the model is a module diffusers drops.
Families without a diffusers loader for kohya files, and LoHa/LoKr (diffusers has no loader for them), are
reported as not checked, with the reason. So is a model whose width differs from the one diffusers' converter
hard-codes for its family (``diffusers_converter_width``: FLUX.1's 3072), when the converter raises on it: such a
model (a reduced-width test model) has no diffusers counterpart to load the file into."""
from __future__ import annotations

import re
import types

import torch

from . import naming

# converted key -> module: peft (``.lora_A.weight``), diffusers' older forms (``.lora.down.weight``,
# ``.processor.to_q_lora.down.weight``), magnitudes and alphas
_SUFFIX = re.compile(r"[._]lora[._](down|up|A|B)(\.weight)?$|\.lora_magnitude_vector$|\.alpha$")
_PAIR = ("lora_down.weight", "lora_up.weight")
_PEFT_PAIR = ("lora_A.weight", "lora_B.weight")


_COMPONENTS = ("unet.", "transformer.")


def _module_name(converted_key: str) -> str:
    """The model module a converted key targets (component prefix ``unet.``/``transformer.`` removed); the
    attention-processor form names ``to_out.0`` as ``processor.to_out``, as diffusers' peft conversion reads it.
    A key without a component prefix (diffusers 0.42.1's kohya FLUX converter names ``x_embedder``,
    ``context_embedder``, ``time_text_embed.*``, ``norm_out.linear`` and ``proj_out`` so) is not loaded by
    ``load_lora_weights``, which passes only its component's keys on: such a name is returned with a note."""
    name = _SUFFIX.sub("", converted_key).replace(".processor.", ".")
    if not name.startswith(_COMPONENTS):
        return f"{name} (diffusers' converter names it outside the model component, so load_lora_weights skips it)"
    name = name.split(".", 1)[1]
    return name + ".0" if name.endswith(".to_out") else name


def _diffusers_module_names(model, table: str) -> set[str]:
    converter = naming.family_facts(model).get("diffusers_checkpoint_converter")
    if converter:  # diffusers' own converter of the family's checkpoint (FLUX.2): the diffusers model's names
        from diffusers.loaders import single_file_utils

        base = getattr(model, "model", model)
        converted = getattr(single_file_utils, converter)(dict(base.diffusion_model.state_dict()))
        return {k[:-len(".weight")] for k in converted if k.endswith(".weight")}
    mapping = naming.diffusers_table(model)
    absent = tuple(naming.family_facts(model).get("diffusers_absent", ()))
    return {k[:-len(".weight")] for k in mapping if k.endswith(".weight") and not (absent and k.startswith(absent))}


def check(model, lora_sd: dict[str, torch.Tensor]) -> dict:
    """``{"checked": bool, "reason": str, "modules": n, "dropped": [...], "refused": [...]}``. ``dropped``: the
    module names diffusers' converter produces that are no module of the diffusers model (peft would not inject
    them: the save fails on these); ``refused``: the converter's error when it raises on a file for a model of the
    width it expects (``load_lora_weights`` then fails loudly). A model of another width than the one the
    converter hard-codes (FLUX.1: 3072) is ``checked: False`` with a "not checkable" reason when the converter
    raises, and checked normally when it does not (a file without ``single_blocks.N.linear1`` modules)."""
    facts = naming.family_facts(model)
    pipe_name, table = facts.get("diffusers_pipeline"), facts.get("diffusers_names")
    file_modules = sorted({k.rsplit(".", 2)[0] for k in lora_sd if k.endswith((_PAIR[0], _PEFT_PAIR[0]))})
    kohya_file = any(k.endswith(_PAIR[0]) for k in lora_sd)
    if not pipe_name or not table or (kohya_file and facts.get("diffusers_kohya") is False):
        return {"checked": False, "reason": f"diffusers has no loader for this family's kohya-format LoRA files "
                                            f"({facts.get('config_class', 'unknown family')})", "dropped": []}
    if any(not k.endswith(_PAIR + _PEFT_PAIR) and not k.endswith((".alpha", ".dora_scale", ".lora_magnitude_vector"))
           for k in lora_sd):
        return {"checked": False, "reason": "diffusers has no loader for LoHa/LoKr files", "dropped": []}
    from diffusers.loaders import lora_pipeline  # the loaders only: importing the pipelines costs seconds more

    pipe = getattr(lora_pipeline, facts["diffusers_lora_loader"])  # where pipe_name's lora_state_dict is defined
    kwargs = {}
    unet_config = getattr(model, "model", model).model_config.unet_config
    if facts.get("diffusers_sgm_remap"):  # as the pipeline's load_lora_weights passes its UNet config
        kwargs["unet_config"] = types.SimpleNamespace(layers_per_block=unet_config["num_res_blocks"][0])
    known = _diffusers_module_names(model, table)
    dropped, refused = [], []
    try:  # the whole file at once, as load_lora_weights converts it (block renumbering looks at every key)
        out = pipe.lora_state_dict(dict(lora_sd), **kwargs)
    except Exception as e:  # diffusers' converter raises: load_lora_weights fails loudly, drops nothing silently
        fixed = facts.get("diffusers_converter_width")
        width = unet_config.get(fixed["config_key"]) if fixed else None
        if fixed and width != fixed["width"]:
            return {"checked": False, "pipeline": pipe_name, "modules": len(file_modules), "dropped": [],
                    "refused": [],
                    "reason": f"not checkable: diffusers' converter only takes {facts['config_class']} models "
                              f"{fixed['width']} wide ({fixed['where']}); this model's {fixed['config_key']} is "
                              f"{width}, so no diffusers model of this size can load the file "
                              f"({type(e).__name__}: {str(e)[:120]})"}
        refused = [f"{type(e).__name__}: {e}"[:300]]
        out = ({},)
    converted = out[0] if isinstance(out, tuple) else out
    names = sorted({_module_name(k) for k in converted if _SUFFIX.search(k)})
    # ``to_out`` read as ``to_out.0`` (the processor form) where the model's to_out is one Linear (HiDream): its own name
    dropped = [n for n in names if n not in known and not (n.endswith(".to_out.0") and n[:-len(".0")] in known)]
    if not refused and len(names) < len(file_modules):  # several file modules converted onto one name
        dropped.append(f"{len(file_modules) - len(names)} module(s) lost in conversion")
    has_dora = any(k.endswith(".dora_scale") for k in lora_sd)
    return {"checked": True, "pipeline": pipe_name, "modules": len(file_modules), "dropped": dropped,
            "refused": refused,
            "reason": "diffusers' load_lora_weights drops every DoRA magnitude (dora_scale) and loads the LoRA part "
                      "only, so its output differs from ComfyUI's; no file layout carries DoRA to both "
                      "(docs/interop.md)"
                      if has_dora else ""}
