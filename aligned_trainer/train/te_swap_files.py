"""Files of a text-encoder swap (``te_swap``): the retrained UNet either as ``.diff`` / ``.diff_b`` keys (``diff``:
reset + trained difference per changed weight, relative to the original checkpoint) that ComfyUI's stock LoRA loaders
apply, written into the loras folder, or whole (``full``: every diffusion-model weight, base + those differences, in
the base's dtype) in the diffusion_models folder for the stock UNETLoader; the projection as its own safetensors file (settings in the metadata) in the
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


UNET_FORMATS = ("diff", "full")
_PLAIN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _quantized(w) -> bool:
    """A base weight ComfyUI holds quantized (fp8 storage, ``comfy.quant_ops.QuantizedTensor``, or another tensor
    subclass such as a GGUF or quanto weight): base + difference cannot be written back in its own format."""
    return w.dtype not in _PLAIN_DTYPES or type(w) not in (torch.Tensor, torch.nn.Parameter)


def full_unet_state(run, ema: bool = True) -> dict[str, torch.Tensor]:
    """The retrained UNet whole, keyed as the diffusion model's own state dict (no prefix; what UNETLoader reads):
    each base weight as ComfyUI holds it before any patch, plus the reset and trained difference
    (:func:`unet_file_state`) computed in fp32 and stored in that weight's dtype. Refuses a quantized base."""
    diffs = unet_file_state(run, torch.float32, ema)
    change = {f"{k.rpartition('.')[0]}.{'weight' if k.endswith('.diff') else 'bias'}": v for k, v in diffs.items()}
    base = run.model.get_key_patches("diffusion_model.")
    odd = sorted(k for k, v in base.items() if _quantized(v[0][0]))
    if odd:
        w = base[odd[0]][0][0]
        raise SwapError(f"the base model's weights are quantized ({len(odd)} tensors, e.g. '{odd[0]}' is "
                        f"{type(w).__name__} {w.dtype}): a full UNet cannot be written in their format. Load the "
                        "checkpoint unquantized (weight_dtype 'default', no fp8 / GGUF / quantized file) and train "
                        "again, or save with unet_format 'diff' and apply it with Load LoRA")
    missing = sorted(set(change) - set(base))
    if missing:
        raise SwapError(f"the swap changes weights this model does not have (e.g. '{missing[0]}'); not saved")
    out = {}
    for key, patches in base.items():
        w = patches[0][0].detach()
        if key in change:
            w = (w.float().cpu() + change[key]).to(w.dtype)
        out[key[len("diffusion_model."):]] = w.cpu().contiguous()
    return out


def detects_as_unet(sd: dict[str, torch.Tensor]) -> bool:
    """Whether ComfyUI's model detection (what UNETLoader runs) recognises ``sd`` as a diffusion model."""
    import comfy.model_detection

    return comfy.model_detection.model_config_from_unet(sd, "") is not None


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
    damaged = (f"{path} is a damaged text-encoder swap projection ({{}}); save it again with Save Text Encoder Swap, "
               "or pick another file")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise SwapError(damaged.format(f"non-finite values in {', '.join(sorted(bad)[:3])}"))
    try:
        return _swap_from_record(json.loads(meta.get("aligned_trainer.te_swap", "")), tensors)
    except SwapError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:  # record or tensor shapes
        raise SwapError(damaged.format(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")) from None


def _swap_from_record(rec: dict, tensors: dict) -> Swap:
    swap = Swap(rec["kind"], int(rec["in_dim"]), int(rec["out_dim"]), tensors, rec.get("reset", "none"),
                tuple(rec.get("reset_layers", ())), {}, int(rec.get("seed", 0)),
                float(rec.get("std_old", 0)), float(rec.get("std_new", 0)), float(rec.get("std_projected", 0)),
                int(rec.get("tokens_old", 0)), int(rec.get("tokens_new", 0)), int(rec.get("captions", 0)),
                rec.get("new_spec", ""), rec.get("old_spec", ""), int(rec.get("pooled_dim", 0)),
                int(rec.get("pooled_in", 0)), float(rec.get("std_pooled_old", 0)),
                float(rec.get("std_pooled_projected", 0)))
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
         loras_folder=None, projections_folder=None, unet_format: str = "diff",
         unet_folder=None) -> tuple[str, str, Swap]:
    """Write the retrained UNet and the trained projection (``te_projections`` folder), both atomically, under
    ``name``; returns (UNet file, projection file, the trained Swap). ``unet_format`` ``diff``: ``.diff`` keys
    (``dtype``), checked to map completely in ComfyUI's LoRA loader, into the loras folder; ``full``: the whole
    diffusion model (:func:`full_unet_state`, the base's dtype), checked to be detected by ComfyUI's model
    detection, into the diffusion_models folder."""
    from pathlib import Path

    from safetensors.torch import save_file

    from . import export, files

    if if_exists not in files.IF_EXISTS:
        raise SwapError(f"if_exists {if_exists!r} is not one of {files.IF_EXISTS}")
    fname = export.check_name(name)
    if run.state is None:
        raise SwapError("the run has no trained weights yet; run Train Steps first")
    if unet_format not in UNET_FORMATS:
        raise SwapError(f"unet_format {unet_format!r} is not one of {UNET_FORMATS}")
    swap = trained_swap(run, ema)
    if unet_format == "full":
        sd = full_unet_state(run, ema)
        if not detects_as_unet(sd):
            raise SwapError("ComfyUI's model detection does not recognise the full UNet (UNETLoader could not load "
                            "it); not saved: save with unet_format 'diff'")
        folder = unet_folder
        if folder is None:
            import folder_paths

            folder = folder_paths.get_folder_paths("diffusion_models")[0]
    else:
        sd = unet_file_state(run, dtype, ema)
        missing = unmapped_diff_keys(run.model, sd)
        if missing:
            raise SwapError(f"ComfyUI's LoRA loader would not map {len(missing)} keys (e.g. {missing[:3]}); not saved")
        folder = loras_folder
        if folder is None:
            import folder_paths

            folder = folder_paths.get_folder_paths("loras")[0]
    folder = Path(folder)
    pfolder = Path(projections_folder or projection_folders()[0])
    folder.mkdir(parents=True, exist_ok=True)
    pfolder.mkdir(parents=True, exist_ok=True)
    if if_exists == "new_name":  # one free name in both folders, so the UNet and its projection keep one name
        fname = next((files.suffixed(Path(fname), n).name for n in range(1, files.MAX_SUFFIX)
                      if not (folder / files.suffixed(Path(fname), n).name).exists()
                      and not (pfolder / files.suffixed(Path(fname), n).name).exists()), fname)
    tensors, pmeta = projection_file_state(swap)
    ppath = files.write_atomic(pfolder / fname, lambda tmp: save_file(tensors, tmp, metadata=pmeta),
                               overwrite=if_exists == "overwrite")
    umeta = {**export.metadata(run), "aligned_trainer.te_swap": pmeta["aligned_trainer.te_swap"],
             "aligned_trainer.te_swap_projection": ppath.name,
             "aligned_trainer.weights": "ema" if ema and run.state.get("ema_adapters") else "trained",
             "aligned_trainer.te_swap_unet_format": unet_format}
    upath = files.write_atomic(folder / ppath.name, lambda tmp: save_file(sd, tmp, metadata=umeta),
                               overwrite=if_exists == "overwrite")
    return str(upath), str(ppath), swap
