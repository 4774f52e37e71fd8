"""LoRA files: kohya-style keys (``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
LoHa ``hada_*``, LoKr ``lokr_*``) with each family's module names as its reference trainer writes them
(``naming``), modelspec/kohya metadata (``metadata``), written atomically into ComfyUI's ``loras`` folder and
checked before success is reported: ComfyUI's stock LoRA loader maps every key, and diffusers' loader would
load every module (``diffusers_check``)."""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import comfy.lora
import comfy.sd
import torch
from safetensors.torch import save_file

from . import diffusers_check, dora_axes, files, naming, peft_layout, slider, te_swap
from . import metadata as lora_metadata
from .state import TrainRun

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]*$")


class ExportError(ValueError):
    pass


def kohya_state_dict(run: TrainRun, dtype: torch.dtype = torch.float16, ema: bool = True) -> dict[str, torch.Tensor]:
    """The run's LoRA in kohya keys; with ``ema`` the EMA-averaged weights when the run keeps an EMA."""
    if run.state is None:
        raise ExportError("the run has no trained weights yet; run Train Steps first")
    weights = dora_axes.for_comfyui(run.model, _weights(run, ema))
    modules = {_split(k)[0] for k in weights}
    return kohya_from_adapters(weights, dtype, conv_shapes(run.model), naming.module_prefixes(run.model, modules))


def _weights(run: TrainRun, ema: bool) -> dict[str, torch.Tensor]:
    """The layers' adapter tensors (a text-encoder swap's projection is saved apart: ``te_swap``)."""
    return te_swap.without_projection((run.state.get("ema_adapters") if ema else None) or run.state["adapters"])


def comfy_lora(model, adapters: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Adapter state -> a LoRA dict for ComfyUI's loader (module names as ComfyUI's own; output-axis DoRA
    magnitudes as ComfyUI reads them, ``dora_axes.for_comfyui``): previews and checkpoint grids."""
    return kohya_from_adapters(dora_axes.for_comfyui(model, te_swap.without_projection(adapters)), dtype)


def file_state_dict(run: TrainRun, dtype: torch.dtype = torch.float16, ema: bool = True) -> dict[str, torch.Tensor]:
    """The tensors Save LoRA writes: the family's layout (``peft_layout`` where lora_formats.json asks for it and
    the LoRA is plain pairs), kohya keys otherwise."""
    if run.state is None:
        raise ExportError("the run has no trained weights yet; run Train Steps first")
    weights = _weights(run, ema)
    if peft_layout.applies(run.model, weights):
        modules = {_split(k)[0] for k in weights}
        return peft_layout.from_kohya(run.model, kohya_from_adapters(weights, dtype, conv_shapes(run.model),
                                                                     {m: m for m in modules}))
    return kohya_state_dict(run, dtype, ema)


def diffusers_copy(run: TrainRun, dtype: torch.dtype = torch.float16, ema: bool = True) -> dict[str, torch.Tensor] | None:
    """The tensors of the diffusers copy of an output-axis DoRA run (peft layout with ``lora_magnitude_vector``,
    ``dora_axes``), for families diffusers has a pipeline for; None for other runs (their Save LoRA file is the
    one diffusers loads, or diffusers cannot load them)."""
    weights = _weights(run, ema)
    facts = naming.family_facts(run.model)
    if not dora_axes.has_output_axis(weights) or not facts.get("diffusers_pipeline") or not facts.get("peft_prefix"):
        return None
    magnitudes = {k[:-len(dora_axes.MAGNITUDE) - 1]: v for k, v in weights.items()
                  if k.endswith("." + dora_axes.MAGNITUDE)}
    pairs = {k: v for k, v in weights.items() if not k.endswith("." + dora_axes.MAGNITUDE)}
    modules = {_split(k)[0] for k in pairs}
    return peft_layout.from_kohya(run.model, kohya_from_adapters(pairs, dtype, conv_shapes(run.model),
                                                                 {m: m for m in modules}), magnitudes)


def conv_shapes(model) -> dict[str, torch.Size]:
    """Weight shapes of the diffusion model's convolutions, by module name."""
    dm = model.model.diffusion_model
    return {n: m.weight.shape for n, m in dm.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim > 2}


def kohya_from_adapters(adapters: dict[str, torch.Tensor], dtype: torch.dtype = torch.float16,
                        conv: dict[str, torch.Size] | None = None,
                        prefixes: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Adapter tensors keyed ``<module>.<param>`` -> kohya keys ``<prefix>.<param>``, the prefix from
    ``prefixes`` (module -> family's name, ``naming.module_prefixes``) or ``lora_unet_<module_underscored>``.
    LoRA pairs of convolutions (``conv``: module -> weight shape) get kohya's conv layout: down
    (rank, in, kh, kw), up (out, rank, 1, 1); ComfyUI flattens either layout."""
    out = {}
    for key, t in adapters.items():
        module, param = _split(key)
        if param == dora_axes.MAGNITUDE:  # its file form needs the base weight: callers pass for_comfyui's output
            raise ExportError(f"{key}: an output-axis DoRA magnitude must go through dora_axes.for_comfyui first")
        t = t.detach()
        shape = (conv or {}).get(module)
        if shape is not None and param == "lora_down.weight" and t.ndim == 2:
            t = t.reshape(t.shape[0], *shape[1:])
        elif shape is not None and param == "lora_up.weight" and t.ndim == 2:
            t = t.reshape(*t.shape, *([1] * (len(shape) - 2)))
        prefix = (prefixes or {}).get(module) or f"lora_unet_{module.replace('.', '_')}"
        out[f"{prefix}.{param}"] = t.to(
            torch.float32 if param == "alpha" else dtype).contiguous()
    return out


def _split(key: str) -> tuple[str, str]:
    for suffix in ("lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha"):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    module, _, param = key.rpartition(".")
    return module, param


def model_with_lora(model, lora_sd: dict[str, torch.Tensor], strength: float = 1.0):
    """MODEL with the LoRA applied through ComfyUI's stock loader (what a user gets after saving)."""
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, strength, 0.0)
    return patched


def render_preview(run: TrainRun, plan, adapters: dict[str, torch.Tensor], step: int) -> torch.Tensor:
    """Train Steps' preview of ``plan`` at ``step``: ``run``'s model with ``adapters`` (a trainer's current state)
    applied through the stock LoRA loader; a text-encoder swap run's prompts projected by that state's projection."""
    model = model_with_lora(run.model, comfy_lora(run.model, adapters))
    return te_swap.projected_plan(plan, run.model, adapters).render(model, step)


def unmapped_keys(model, lora_sd: dict[str, torch.Tensor]) -> list[str]:
    """Keys ComfyUI's LoRA loader would skip ("lora key not loaded")."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    loaded = comfy.lora.load_lora(lora_sd, key_map, log_missing=False)
    used = set()
    for patch in loaded.values():
        keys = getattr(patch, "loaded_keys", None)
        if keys:
            used |= set(keys)
    return sorted(k for k in lora_sd if k not in used)


def metadata(run: TrainRun) -> dict[str, str]:
    cfg = run.config_json()
    ds_hash = (run.meta or {}).get("dataset_hash") or ""
    te = run.te_spec or {}
    md = {
        "aligned_trainer.config": json.dumps(cfg),
        "aligned_trainer.te_spec": json.dumps(te),
        # how the cached captions were read ('literal' with an aligned CLIP, 'comfyui' with ComfyUI's default CLIP)
        # and the base model class, for Load LoRA (aligned)
        "aligned_trainer.prompt_syntax": str(run.training_set.meta.get("prompt_syntax", "")),
        "aligned_trainer.base_model": type(getattr(run.model.model, "model_config", None)).__name__,
        "aligned_trainer.steps": str(run.step),
        "aligned_trainer.dataset_hash": ds_hash,
        "ss_network_module": {"lora": "networks.lora", "locon": "networks.lora", "loha": "lycoris.kohya",
                              "lokr": "lycoris.kohya", "full": "lycoris.kohya"}[run.lora.algorithm],
        "ss_network_dim": str(run.lora.rank),
        "ss_network_alpha": str(run.lora.scale_alpha),
        "ss_learning_rate": str(run.optimizer.lr),
        "ss_optimizer": run.optimizer.name,
        "ss_lr_scheduler": run.optimizer.scheduler,
        "ss_steps": str(run.step),
        "ss_max_train_steps": str(run.step),
        "ss_seed": str(run.settings.seed),
        "ss_batch_size_per_device": str(run.settings.batch_size),
        "ss_gradient_accumulation_steps": str(run.settings.grad_accum),
        "ss_mixed_precision": run.settings.precision,
        "ss_min_snr_gamma": str(run.timesteps.min_snr_gamma if run.timesteps.weighting == "min_snr" else ""),
        "ss_noise_offset": str(run.timesteps.noise_offset),
        "ss_multires_noise_iterations": str(run.timesteps.multires_iterations),
        "ss_multires_noise_discount": str(run.timesteps.multires_discount),
        "ss_dataset_hash": ds_hash,
        "ss_num_train_images": str(len(run.training_set)),
        "ss_training_comment": f"ComfyUI Aligned Trainer; te_spec {te.get('id', 'none')}",
        **slider.metadata(run),  # a concept slider's prompts and settings (empty for dataset runs)
    }
    return md


NAME_MAX = 120  # characters before ".safetensors" (room for a "_<n>" suffix under the usual 255-byte limit)


def check_name(name: str) -> str:
    shown = repr(name if len(name) <= 60 else name[:57] + "...")
    if not name or "/" in name or "\\" in name or ".." in name or not NAME_RE.match(name):
        raise ExportError(f"LoRA name {shown} is not allowed: use letters, digits, spaces, '_', '-', '.' "
                          "without path separators or '..'")
    stem = name.removesuffix(".safetensors")
    if len(stem) > NAME_MAX:
        raise ExportError(f"LoRA name {shown} is {len(stem)} characters long; use at most {NAME_MAX}")
    return stem + ".safetensors"


def save_lora(run: TrainRun, name: str, folder: Path | None = None, dtype=torch.float16,
              ema: bool = True, if_exists: str = "new_name", base_model_name: str = "",
              diffusers_folder: Path | None = None) -> tuple[Path, dict]:
    """Write the LoRA; verify it loads completely in ComfyUI's stock loader; return (path, report).
    ``if_exists``: 'new_name' (the default: an existing file keeps its name and this one gets the first free
    ``<name>_<n>``) or 'overwrite'. ``base_model_name``: the checkpoint file name for ``ss_sd_model_name``.
    An output-axis DoRA run also writes its diffusers copy (``diffusers_copy``) under the same name into
    ``diffusers_folder`` (default: ComfyUI's output folder, ``aligned_trainer/diffusers``; not the loras folder,
    where ComfyUI would list a file it reads without its magnitudes)."""
    if if_exists not in files.IF_EXISTS:
        raise ExportError(f"if_exists {if_exists!r} is not one of {files.IF_EXISTS}")
    fname = check_name(name)
    if folder is None:
        import folder_paths

        folder = Path(folder_paths.get_folder_paths("loras")[0])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = file_state_dict(run, dtype, ema)
    use_ema = bool(ema and run.state.get("ema_adapters"))
    missing = unmapped_keys(run.model, sd)
    if missing:
        raise ExportError(f"ComfyUI's LoRA loader would not map {len(missing)} keys (e.g. {missing[:3]}); not saved")
    copy = diffusers_copy(run, dtype, ema)  # output-axis DoRA: diffusers loads this copy, not the ComfyUI file
    in_diffusers = diffusers_check.check(run.model, sd if copy is None else copy)
    if in_diffusers["dropped"]:
        raise ExportError(f"diffusers' load_lora_weights would drop {len(in_diffusers['dropped'])} module(s) of this "
                          f"LoRA (e.g. {in_diffusers['dropped'][:3]}); not saved. Exclude them from training "
                          "(LoRA Config exclude regex) so the file loads completely everywhere")
    if in_diffusers.get("refused"):
        logging.warning("aligned_trainer: diffusers' LoRA converter raises on %d module(s) of %s (e.g. %s); "
                        "ComfyUI loads them", len(in_diffusers["refused"]), fname, in_diffusers["refused"][0])
    md = {**metadata(run), **lora_metadata.build(run, fname, base_model_name=base_model_name),
          "aligned_trainer.weights": "ema" if use_ema else "trained"}
    md.update(lora_metadata.kohya_hashes(sd, md))
    path = files.write_atomic(folder / fname, lambda tmp: save_file(sd, tmp, metadata=md),
                              overwrite=if_exists == "overwrite")
    if copy is not None:
        if diffusers_folder is None:
            import folder_paths

            diffusers_folder = Path(folder_paths.get_output_directory()) / "aligned_trainer" / "diffusers"
        diffusers_folder = Path(diffusers_folder)
        diffusers_folder.mkdir(parents=True, exist_ok=True)
        copy_md = {k: v for k, v in md.items() if not k.startswith(("sshs_", "ss_", "modelspec."))}
        copy_md["aligned_trainer.comfyui_file"] = path.name
        copy_path = files.write_atomic(diffusers_folder / path.name,
                                       lambda tmp: save_file(copy, tmp, metadata=copy_md), overwrite=True)
        in_diffusers = {**in_diffusers, "file": str(copy_path),
                        "reason": "the ComfyUI file's dora_scale is what ComfyUI reads; diffusers drops it, so "
                                  "diffusers loads the copy in peft's layout with lora_magnitude_vector (this file)"}
        logging.info("aligned_trainer: saved the diffusers copy %s (%d tensors)", copy_path, len(copy))
    if path.name != fname:
        logging.info("aligned_trainer: %s exists; saved as %s (if_exists 'new_name')", fname, path.name)
    logging.info("aligned_trainer: saved %s (%d tensors)", path, len(sd))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return path, {"path": str(path), "tensors": len(sd), "unmapped": 0, "sha256_16": digest, "steps": run.step,
                  "weights": "ema" if use_ema else "trained", "requested": fname, "diffusers": in_diffusers,
                  "sshs_model_hash": md["sshs_model_hash"]}
