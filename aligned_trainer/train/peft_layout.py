"""LoRA files in diffusers' peft layout (``transformer.<diffusers module>.lora_A.weight`` / ``.lora_B.weight``),
for families whose diffusers loader reads no kohya names (``"layout": "peft"`` in lora_formats.json: SD3).

The module names come from ComfyUI's own ComfyUI <-> diffusers table for the family (``diffusers_names``, e.g.
``comfy.utils.mmdit_to_diffusers``), which is also the table ComfyUI's LoRA loader maps these names with. Where
one ComfyUI module is several diffusers modules (SD3's fused ``qkv`` = ``to_q``/``to_k``/``to_v``: rows sliced by
the table's offsets) the LoRA splits exactly: the same down (A) matrix for each, the up (B) rows sliced. Where the
table reorders rows (``swap_scale_shift`` of the final adaLN) the up rows are reordered the same way. peft files
carry no alpha, so alpha/rank is folded into B (diffusers and ComfyUI then both apply scale 1).

Only plain LoRA/LoCon pairs are written this way for ComfyUI: LoHa and LoKr do not split over fused modules, and
ComfyUI reads no ``lora_magnitude_vector``; such files keep kohya's names (``applies``). Output-axis DoRA runs
also get a diffusers copy in this layout, with peft's magnitudes (``dora_axes``, ``export.diffusers_copy``)."""
from __future__ import annotations

import torch

from . import naming

PAIR = ("lora_down.weight", "lora_up.weight", "alpha")


def applies(model, adapter_keys) -> bool:
    """Whether a file of these adapter entries (``<module>.<param>``) is written in the peft layout: the family
    asks for it and every entry is a LoRA pair (or its alpha)."""
    return naming.family_facts(model).get("layout") == "peft" and all(k.endswith(PAIR) for k in adapter_keys)


def targets(model) -> dict[str, list[tuple[str, tuple | None, object]]]:
    """ComfyUI module name -> [(diffusers module name, row offset (dim, start, length) or None, row function or
    None)], inverted from the family's ComfyUI table."""
    facts = naming.family_facts(model)
    absent = tuple(facts.get("diffusers_absent", ()))
    out: dict[str, list] = {}
    for diff, to in naming.diffusers_table(model).items():
        if not diff.endswith(".weight") or (absent and diff.startswith(absent)):
            continue
        key, offset, fn = (to, None, None) if isinstance(to, str) else (to[0], to[1], to[2] if len(to) > 2 else None)
        if not key.endswith(".weight"):
            continue
        module = key[:-len(".weight")].removeprefix("diffusion_model.")
        out.setdefault(module, []).append((diff[:-len(".weight")], offset, fn))
    return out


def from_kohya(model, sd: dict[str, torch.Tensor],
               magnitudes: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``sd``: ``<ComfyUI module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (conv pairs already in
    kohya's conv shapes) -> peft keys ``<prefix>.<diffusers module>.lora_A.weight`` / ``.lora_B.weight``.
    ``magnitudes``: ComfyUI module -> peft DoRA magnitude (out,) (``dora_axes``), written as
    ``<prefix>.<diffusers module>.lora_magnitude_vector`` with the same row slices and row function as B."""
    prefix = naming.family_facts(model).get("peft_prefix", "transformer")
    table = targets(model)
    modules = sorted({k[:-len(".lora_down.weight")] for k in sd if k.endswith(".lora_down.weight")})
    missing = [m for m in modules if m not in table]
    if missing:
        raise naming.NamingError(f"no diffusers name for module(s) {missing[:3]} in ComfyUI's "
                                 f"{naming.family_facts(model)['diffusers_names']} table; exclude them from training "
                                 "(exclude regex) to save this LoRA")
    out = {}
    for m in modules:
        down, up = sd[f"{m}.lora_down.weight"], sd[f"{m}.lora_up.weight"]
        alpha = sd.get(f"{m}.alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        up = (up.float() * scale).to(up.dtype)
        for diff, offset, fn in table[m]:
            part = up
            if offset is not None:
                dim, start, length = offset
                part = part.narrow(dim, start, length)
            if fn is not None:
                part = fn(part)
            out[f"{prefix}.{diff}.lora_A.weight"] = down.clone().contiguous()  # safetensors: no shared storage
            out[f"{prefix}.{diff}.lora_B.weight"] = part.clone().contiguous()
            if magnitudes and m in magnitudes:
                mag = magnitudes[m].flatten().to(up.dtype)
                if offset is not None:
                    if offset[0] != 0:
                        raise naming.NamingError(f"module {m} is split across columns in the diffusers model; its "
                                                 "DoRA magnitudes (one per row) cannot be split with it")
                    mag = mag.narrow(0, offset[1], offset[2])
                if fn is not None:
                    mag = fn(mag)
                if down.ndim > 2:  # peft's conv DoRA keeps its magnitude as (1, out, 1, ...)
                    mag = mag.reshape(1, -1, *[1] * (down.ndim - 2))
                out[f"{prefix}.{diff}.lora_magnitude_vector"] = mag.clone().contiguous()
    return out
