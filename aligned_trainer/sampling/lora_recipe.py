"""A LoRA's text-encoder recipe re-applied at inference: the LoRA is applied as ComfyUI's stock loader applies it
(``comfy.sd.load_lora_for_models``), and the CLIP is aligned to the spec and prompt syntax the LoRA was trained
with (``aligned_trainer.te_spec`` / ``aligned_trainer.prompt_syntax`` in its metadata), with warnings when the
base model or the CLIP does not match what was recorded."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import comfy.sd
import comfy.utils
import safetensors

from ..te import align, specs
from ..te import syntax as sx

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    te_spec: dict | None          # {"id", "variant", "hash"} or None (trained with ComfyUI's default CLIP)
    prompt_syntax: str | None     # how the training captions were read
    base_model: str | None        # ComfyUI model_config class name (SD15, SDXL, Flux...)


@dataclass(frozen=True)
class Applied:
    model: object
    clip: object
    recipe: Recipe
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def report(self) -> str:
        r = self.recipe
        spec = "none (ComfyUI's default CLIP)" if not r.te_spec else spec_key(r.te_spec)
        lines = [f"recorded te_spec: {spec}; prompt syntax: {r.prompt_syntax or 'not recorded'}; "
                 f"base model: {r.base_model or 'not recorded'}",
                 f"CLIP returned: {getattr(self.clip, 'aligned_trainer_spec', None) or 'unaligned (ComfyUI default)'}"]
        return "\n".join(lines + [f"WARNING: {w}" for w in self.warnings])


def spec_key(te_spec: dict) -> str:
    variant = te_spec.get("variant") or specs.DEFAULT_VARIANT
    return te_spec["id"] if variant == specs.DEFAULT_VARIANT else f"{te_spec['id']}:{variant}"


def read_recipe(path: Path) -> Recipe:
    """The recipe recorded in a LoRA file's metadata (fields absent from other trainers' files are None)."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    te = None
    raw = meta.get("aligned_trainer.te_spec")
    if raw:
        try:
            te = json.loads(raw) or None
        except json.JSONDecodeError:
            te = None
    return Recipe(te_spec=te if isinstance(te, dict) and te.get("id") else None,
                  prompt_syntax=meta.get("aligned_trainer.prompt_syntax") or None,
                  base_model=meta.get("aligned_trainer.base_model") or None)


def _base_model(model) -> str | None:
    cfg = getattr(getattr(model, "model", None), "model_config", None)
    return type(cfg).__name__ if cfg is not None else None


def check(recipe: Recipe, model, clip) -> list[str]:
    """Where the model/CLIP the LoRA is applied to differs from what it was trained with."""
    out = []
    base = _base_model(model)
    if recipe.base_model and base and base != recipe.base_model:
        out.append(f"the LoRA was trained on a {recipe.base_model} model, this model is {base}; use a "
                   f"{recipe.base_model} base model")
    if recipe.te_spec:
        sid = recipe.te_spec["id"]
        matching = [s.id for s in specs.matching_specs(align.unaligned(clip) if isinstance(clip, align.AlignedCLIP) else clip)]
        if sid not in matching:
            out.append(f"the LoRA was trained with text-encoder spec '{sid}', but this CLIP is "
                       f"{'/'.join(matching) or 'of no known family'}; connect the text encoders of a {sid} model")
        try:
            now = specs.get_spec(spec_key(recipe.te_spec))
            if recipe.te_spec.get("hash") and now.hash != recipe.te_spec["hash"]:
                out.append(f"te_specs/{sid}.json changed since training (hash {recipe.te_spec['hash']} -> {now.hash}); "
                           "the CLIP follows the current file")
        except specs.SpecError:
            out.append(f"the recorded spec '{spec_key(recipe.te_spec)}' is not in te_specs/; the CLIP is left unaligned")
    return out


def apply(model, clip, path: Path, strength_model: float, strength_clip: float) -> Applied:
    """Apply the LoRA file at ``path`` like ComfyUI's LoraLoader, then align the CLIP to its recorded recipe."""
    try:
        recipe = read_recipe(path)
        lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    except Exception as e:  # safetensors' SafetensorError (not a safetensors file, truncated), OSError
        raise ValueError(f"LoRA file {Path(path).name} cannot be read as safetensors ({str(e)[:200]}); it is damaged "
                         "or not a LoRA: download or save it again, or pick another file") from None
    base_clip = align.unaligned(clip) if isinstance(clip, align.AlignedCLIP) else clip
    new_model, new_clip = comfy.sd.load_lora_for_models(model, base_clip, lora, strength_model, strength_clip)
    warnings = check(recipe, model, base_clip)
    if recipe.te_spec:
        try:
            syntax = recipe.prompt_syntax if recipe.prompt_syntax in sx.SYNTAXES else None
            new_clip = align.align_clip(new_clip, specs.get_spec(spec_key(recipe.te_spec)), syntax)
        except specs.SpecError:
            pass
    elif recipe.prompt_syntax is None:
        warnings.append(f"{Path(path).name} records no text-encoder recipe (not saved by Aligned Trainer); "
                        "the CLIP is returned unaligned")
    for w in warnings:
        log.warning("Load LoRA (aligned) %s: %s", Path(path).name, w)
    return Applied(new_model, new_clip, recipe, tuple(warnings))
