"""Files of a text-encoder swap (``te_swap``): the retrained UNet as ``.diff`` / ``.diff_b`` keys (reset + trained
difference per changed weight, relative to the original checkpoint) that ComfyUI's stock LoRA loaders apply, written
into the loras folder; the projection as its own safetensors file (settings in the metadata) in the
``te_projections`` model folder. Both written atomically; the UNet file checked to map completely before success."""
from __future__ import annotations

import json

import torch

from .te_swap import Swap, SwapError, of, trained_swap, without_projection

FORMAT = "aligned_trainer.te_swap.projection.v1"


def unet_file_state(run, dtype: torch.dtype = torch.float32, ema: bool = True) -> dict[str, torch.Tensor]:
    """The retrained UNet as ``diffusion_model.<layer>.diff`` / ``.diff_b`` keys: for each changed weight the
    reset difference plus the trained difference (full weights), relative to the original checkpoint."""
    from . import full

    swap = of(run.model)
    if swap is None:
        raise SwapError("this run's model carries no text-encoder swap")
    weights = without_projection((run.state.get("ema_adapters") if ema else None) or run.state["adapters"])
    other = sorted({k.rpartition(".")[0] for k in weights if not k.endswith("." + full.PARAM)})
    if other:
        raise SwapError(f"this run trained LoRA adapters (e.g. '{other[0]}'); the swap's UNet file holds full "
                        "weights: choose algorithm 'full' in LoRA Config, or save the LoRA with Save LoRA")
    total: dict[str, torch.Tensor] = {k: v.float().clone() for k, v in swap.reset_diffs.items()}
    for k, d in weights.items():
        key = f"diffusion_model.{k[:-len(full.PARAM) - 1]}.weight"
        total[key] = total.get(key, 0) + d.detach().float().cpu()
    out = {}
    for key, v in total.items():
        stem, _, what = key.rpartition(".")
        out[f"{stem}.{'diff' if what == 'weight' else 'diff_b'}"] = v.to(dtype).contiguous()
    return out


def unmapped_diff_keys(model, sd: dict[str, torch.Tensor]) -> list[str]:
    """``.diff`` / ``.diff_b`` keys of ``sd`` that ComfyUI's LoRA loader (``comfy.lora.load_lora``) would not turn into
    a patch of the model's weight / bias."""
    import comfy.lora

    patches = comfy.lora.load_lora(sd, comfy.lora.model_lora_keys_unet(model.model, {}), log_missing=False)
    target = {k: k[:-len(".diff")] + ".weight" if k.endswith(".diff") else k[:-len(".diff_b")] + ".bias" for k in sd}
    return sorted(k for k, t in target.items() if t not in patches)


def projection_file_state(swap: Swap) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in swap.projection.items()}
    return tensors, {"format": FORMAT, "aligned_trainer.te_swap": json.dumps(swap.record())}


def load_projection(path) -> Swap:
    """A projection file (``projection_file_state``) as a Swap with no reset (inference only)."""
    from safetensors import safe_open

    try:
        with torch.inference_mode(False), safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise SwapError(f"{path} cannot be read as safetensors ({str(e)[:200]}); pick a file written by Save Text "
                        "Encoder Swap") from None
    if meta.get("format") != FORMAT:
        raise SwapError(f"{path} is not a text-encoder swap projection (format {meta.get('format')!r}); pick a "
                        "file written by Save Text Encoder Swap")
    rec = json.loads(meta["aligned_trainer.te_swap"])
    swap = Swap(rec["kind"], int(rec["in_dim"]), int(rec["out_dim"]), tensors, rec.get("reset", "none"),
                tuple(rec.get("reset_layers", ())), {}, int(rec.get("seed", 0)),
                float(rec.get("std_old", 0)), float(rec.get("std_new", 0)), float(rec.get("std_projected", 0)),
                int(rec.get("tokens_old", 0)), int(rec.get("tokens_new", 0)), int(rec.get("captions", 0)),
                rec.get("new_spec", ""), rec.get("old_spec", ""))
    swap.module()  # refuses tensors that do not fit the recorded shapes
    return swap


PROJECTION_FOLDER = "te_projections"   # ComfyUI model folder of the projection files (next to loras)


def projection_folders() -> list[str]:
    """The folders of projection files: ComfyUI's ``te_projections`` model folder, registered on first use as
    ``models/te_projections`` (next to the first loras folder, so extra_model_paths setups keep them together)."""
    import os

    import folder_paths

    if PROJECTION_FOLDER not in folder_paths.folder_names_and_paths:
        loras = folder_paths.get_folder_paths("loras")
        base = os.path.dirname(loras[0]) if loras else folder_paths.models_dir
        folder_paths.add_model_folder_path(PROJECTION_FOLDER, os.path.join(base, PROJECTION_FOLDER), is_default=True)
        folder_paths.folder_names_and_paths[PROJECTION_FOLDER] = (
            folder_paths.folder_names_and_paths[PROJECTION_FOLDER][0], {".safetensors"})
    return folder_paths.get_folder_paths(PROJECTION_FOLDER)


def projection_files() -> list[str]:
    import folder_paths

    projection_folders()
    return folder_paths.get_filename_list(PROJECTION_FOLDER)


def load_projection_named(name: str) -> Swap:
    import folder_paths

    projection_folders()
    path = folder_paths.get_full_path(PROJECTION_FOLDER, name)
    if path is None:
        raise SwapError(f"projection file {name!r} is not in the {PROJECTION_FOLDER} folder ({projection_folders()}); "
                        "pick one written by Save Text Encoder Swap")
    return load_projection(path)


def save(run, name: str, dtype: torch.dtype = torch.float32, ema: bool = True, if_exists: str = "new_name",
         loras_folder=None, projections_folder=None) -> tuple[str, str, Swap]:
    """Write the retrained UNet (``.diff`` keys, checked to map completely in ComfyUI's LoRA loader) into the loras
    folder and the trained projection into the ``te_projections`` folder, both atomically, under ``name``;
    returns (UNet file, projection file, the trained Swap)."""
    from pathlib import Path

    from safetensors.torch import save_file

    from . import export, files

    if if_exists not in files.IF_EXISTS:
        raise SwapError(f"if_exists {if_exists!r} is not one of {files.IF_EXISTS}")
    fname = export.check_name(name)
    if run.state is None:
        raise SwapError("the run has no trained weights yet; run Train Steps first")
    swap = trained_swap(run, ema)
    sd = unet_file_state(run, dtype, ema)
    missing = unmapped_diff_keys(run.model, sd)
    if missing:
        raise SwapError(f"ComfyUI's LoRA loader would not map {len(missing)} keys (e.g. {missing[:3]}); not saved")
    if loras_folder is None:
        import folder_paths

        loras_folder = folder_paths.get_folder_paths("loras")[0]
    folder = Path(loras_folder)
    pfolder = Path(projections_folder or projection_folders()[0])
    folder.mkdir(parents=True, exist_ok=True)
    pfolder.mkdir(parents=True, exist_ok=True)
    tensors, pmeta = projection_file_state(swap)
    ppath = files.write_atomic(pfolder / fname, lambda tmp: save_file(tensors, tmp, metadata=pmeta),
                               overwrite=if_exists == "overwrite")
    umeta = {**export.metadata(run), "aligned_trainer.te_swap": pmeta["aligned_trainer.te_swap"],
             "aligned_trainer.te_swap_projection": ppath.name,
             "aligned_trainer.weights": "ema" if ema and run.state.get("ema_adapters") else "trained"}
    upath = files.write_atomic(folder / ppath.name, lambda tmp: save_file(sd, tmp, metadata=umeta),
                               overwrite=if_exists == "overwrite")
    return str(upath), str(ppath), swap
