"""Start a run from an existing LoRA file written by kohya sd-scripts, ai-toolkit, diffusers/peft or this pack.

The file's keys are mapped to ComfyUI modules with ComfyUI's own tables (``comfy.lora.model_lora_keys_unet``,
which covers kohya names, ComfyUI names and diffusers' attention-processor names) plus the family's diffusers
module names from ``comfy.utils.<diffusers_names>`` (``lora_formats.json``) with and without the ``unet.`` /
``transformer.`` component prefix, which is how peft and diffusers' ``save_lora_weights`` write them. The
tensors are read the way ComfyUI's loader reads them (``LoRAAdapter.load``: every up/down spelling, alpha,
dora_scale), so the run starts from exactly the LoRA that ComfyUI applies for that file."""
from __future__ import annotations

from pathlib import Path

import comfy.lora
import comfy.utils
import torch
from comfy.weight_adapter import LoRAAdapter

from . import dora_axes, naming
from .. import paths
from .config import ConfigError, LoraConfig
from .optim import build_ema


def resolve(name_or_path: str) -> Path:
    """A LoRA file inside ComfyUI's ``loras`` folders (a name relative to the first one, or a path inside any
    registered one) or the pack's runs folder, through the path guard: anything else is refused with one
    message, whether or not it exists."""
    roots = paths.lora_roots()
    p = paths.confine(name_or_path, roots)
    if not p.is_file():
        raise ConfigError(f"init_lora '{name_or_path}' is not a LoRA file in ComfyUI's loras folder; pick a name "
                          "from models/loras (or a file in a registered loras folder)")
    return p


def read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix != ".safetensors":
        raise ConfigError(f"init_lora {path} is not a .safetensors file; only safetensors LoRAs are read (pickled "
                          ".ckpt/.pt files can run code): convert it to safetensors first")
    try:
        return comfy.utils.load_torch_file(str(path), safe_load=True)
    except Exception as e:
        raise ConfigError(f"init_lora {path} cannot be read as safetensors ({e})") from None


def key_map(model) -> dict[str, str | tuple]:
    """File key prefix -> ComfyUI weight key (``diffusion_model.<module>.weight``), or, where one file module is a
    slice of a fused ComfyUI weight (SD3's ``to_q`` of ``qkv``), ComfyUI's ``(weight key, (dim, start, length)[,
    row function])``."""
    base = getattr(model, "model", model)
    km = {k: v for k, v in comfy.lora.model_lora_keys_unet(base, {}).items() if isinstance(v, (str, tuple))}
    table = naming.family_facts(model).get("diffusers_names")
    if table:
        for diff, comfy_key in naming.diffusers_table(model).items():
            if not diff.endswith(".weight"):
                continue
            key = comfy_key if isinstance(comfy_key, str) else comfy_key[0]
            if not key.endswith(".weight"):
                continue
            key = key if key.startswith("diffusion_model.") else "diffusion_model." + key
            target = key if isinstance(comfy_key, str) else (key, *comfy_key[1:])
            name = diff[:-len(".weight")]
            for prefix in ("", "unet.", "transformer.", "base_model.model."):
                km.setdefault(prefix + name, target)
    return km


def _rows(model, module: str) -> int:
    return model.model.diffusion_model.get_submodule(module).weight.shape[0]


def _slot(offset, rows: int) -> tuple[int, int, int]:
    """ComfyUI's (dim, start, length) of a slice of a fused weight; None: the whole weight (a row function only)."""
    return offset if offset is not None else (0, 0, rows)


def _joined(model, module: str, parts: list, source: str) -> tuple:
    """One LoRA (up, down, alpha=None, ...) for a fused ComfyUI weight from files' per-slice LoRAs (SD3's
    ``to_q``/``to_k``/``to_v`` of ``qkv``, as our peft layout and diffusers write them): exact when every slice has
    the same down matrix, the way a fused LoRA splits. Each slice's scale is folded into its rows of up, and its
    row function (ComfyUI's, e.g. swap_scale_shift) applied as ComfyUI's loader applies it."""
    rows = _rows(model, module)
    down0 = None
    up = None
    for offset, fn, (p_up, p_down, p_alpha, p_mid, p_dora, _) in parts:
        dim, start, length = _slot(offset, rows)
        if dim != 0 or p_mid is not None or p_dora is not None:
            raise ConfigError(f"{source}: module {module} is split in the file in a way a fused LoRA cannot hold "
                              "(not row slices, or with mid/DoRA weights)")
        d = p_down.float().reshape(p_down.shape[0], -1)
        if down0 is None:
            down0, up = d, torch.zeros(rows, d.shape[0])
        elif d.shape != down0.shape or not torch.allclose(d, down0, rtol=0, atol=1e-6):
            raise ConfigError(f"{source}: the slices of {module} (e.g. to_q/to_k/to_v) have different down (lora_A) "
                              "matrices, so they are not one rank-r LoRA of the fused weight; this file cannot start "
                              "a run (ComfyUI still applies it with Load LoRA)")
        part = p_up.float().reshape(p_up.shape[0], -1) * (float(p_alpha) / d.shape[0] if p_alpha is not None else 1.0)
        up[start:start + length] = fn(part) if fn is not None else part
    return up, down0, None, None, None, None


def adapters_from_lora(model, lora_sd: dict[str, torch.Tensor], targets: list[str], cfg: LoraConfig,
                       source: str = "init_lora") -> dict[str, torch.Tensor]:
    """Adapter state entries (``<module>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha`` /
    ``.dora_scale``, as ``Trainer.adapter_state`` keys them) for the LoRA in ``lora_sd``. The file's scale
    (its alpha / rank; 1 without alpha, as ComfyUI applies it) is folded into ``lora_up`` so that the run's own
    alpha/rank give the same delta. Raises ConfigError for keys nothing maps, modules outside ``targets``, a
    rank other than the run's, non-LoRA algorithms and DoRA mismatches."""
    if cfg.algorithm not in ("lora", "locon"):
        raise ConfigError(f"{source}: starting from a LoRA file needs algorithm lora or locon (got '{cfg.algorithm}')")
    loaded = set()
    patches = {}
    slices: dict[str, list] = {}
    magnitudes = _peft_magnitudes(model, lora_sd, source)  # peft/diffusers DoRA files: output-axis magnitudes
    loaded |= {k for k in lora_sd if k.endswith(PEFT_MAGNITUDE)}
    for target, a in comfy.lora.load_lora(lora_sd, key_map(model), log_missing=False).items():
        if not isinstance(a, LoRAAdapter):
            raise ConfigError(f"{source}: module {target} is not a LoRA pair (LoHa/LoKr/other); only LoRA/LoCon/DoRA "
                              "files can start a run")
        loaded |= set(a.loaded_keys)
        if isinstance(target, str):
            patches[target[len("diffusion_model."):-len(".weight")]] = a.weights
        else:  # a slice of a fused weight: (key, (dim, start, length)[, row function])
            module = target[0][len("diffusion_model."):-len(".weight")]
            slices.setdefault(module, []).append((target[1], target[2] if len(target) > 2 else None, a.weights))
    for module, parts in slices.items():
        patches[module] = _joined(model, module, parts, source)
    unmapped = sorted(k for k in lora_sd if k not in loaded)
    if unmapped:
        raise ConfigError(f"{source}: {len(unmapped)} key(s) of the file match no module of this model (e.g. "
                          f"{unmapped[:3]}); is it a LoRA for another model family, or a LoHa/LoKr file?")
    lone = sorted(set(magnitudes) - set(patches))
    if lone:  # peft writes a magnitude only beside its module's LoRA pair: alone it would be dropped unread
        raise ConfigError(f"{source}: {len(lone)} module(s) have a DoRA magnitude (lora_magnitude_vector) but no LoRA "
                          f"pair (e.g. {lone[:3]}); the file is incomplete: save it again from the trainer")
    outside = sorted(set(patches) - set(targets))
    if outside:
        raise ConfigError(f"{source}: the file trains {len(outside)} module(s) this run does not (e.g. {outside[:3]}); "
                          "widen LoRA Config's targets (preset / include regex) to cover them")
    out: dict[str, torch.Tensor] = {}
    for module, weights in patches.items():
        up, down, alpha, mid, dora, _ = weights
        if mid is not None:
            raise ConfigError(f"{source}: module {module} has a Tucker/CP mid weight (LyCORIS); not supported as init")
        if down.shape[0] != cfg.rank:
            raise ConfigError(f"{source}: the file's rank is {down.shape[0]} (module {module}) but LoRA Config's rank "
                              f"is {cfg.rank}; set rank to {down.shape[0]}")
        has_dora = dora is not None or module in magnitudes
        if has_dora != bool(cfg.dora):
            raise ConfigError(f"{source}: the file {'has' if has_dora else 'has no'} DoRA magnitudes "
                              f"(dora_scale / lora_magnitude_vector) but LoRA Config has dora "
                              f"{'off' if has_dora else 'on'}; match them")
        file_scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        run_scale = cfg.scale_alpha / cfg.rank
        up2 = up.float().reshape(up.shape[0], -1)
        out[f"{module}.lora_up.weight"] = up2 * (file_scale / run_scale)
        out[f"{module}.lora_down.weight"] = down.float().reshape(down.shape[0], -1)
        out[f"{module}.alpha"] = torch.tensor(cfg.scale_alpha)
        if has_dora:
            shape = model.model.diffusion_model.get_submodule(module).weight.shape
            axis = "output" if module in magnitudes or dora_axes.is_output_axis_scale(dora, shape) else "input"
            if axis != cfg.dora_axis:
                raise ConfigError(f"{source}: module {module}'s DoRA magnitudes are on the {axis} axis but LoRA "
                                  f"Config has dora_axis '{cfg.dora_axis}'; set dora_axis to '{axis}'")
            if module in magnitudes:  # peft's magnitude is the trained one
                out[f"{module}.{dora_axes.MAGNITUDE}"] = magnitudes[module]
            elif axis == "output":  # ComfyUI's output-axis dora_scale: back to the magnitude it was saved from
                out[f"{module}.{dora_axes.MAGNITUDE}"] = dora_axes.from_comfyui(model, out, module, dora)
            else:
                out[f"{module}.dora_scale"] = dora.float()
    return out


PEFT_MAGNITUDE = ".lora_magnitude_vector"


def _peft_magnitudes(model, lora_sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """ComfyUI module -> output-axis DoRA magnitude (out,) from a peft/diffusers file's
    ``<module>.lora_magnitude_vector`` keys (which ComfyUI's loader does not read), with split modules' slices
    (SD3/FLUX ``to_q``/``to_k``/``to_v``) joined into the fused weight's rows as ``_joined`` joins their LoRAs."""
    km = key_map(model)
    out: dict[str, torch.Tensor] = {}
    for key, v in lora_sd.items():
        if not key.endswith(PEFT_MAGNITUDE):
            continue
        target = km.get(key[:-len(PEFT_MAGNITUDE)])
        if target is None:
            raise ConfigError(f"{source}: DoRA magnitude {key} matches no module of this model; is it a LoRA for "
                              "another model family?")
        weight_key = target if isinstance(target, str) else target[0]
        module = weight_key[len("diffusion_model."):-len(".weight")]
        v = v.float().flatten()
        if isinstance(target, str):
            out[module] = v
            continue
        rows = _rows(model, module)
        dim, start, length = _slot(target[1], rows)
        if dim != 0:
            raise ConfigError(f"{source}: module {module} is split across columns; its DoRA magnitudes (one per "
                              "row) cannot be joined")
        fn = target[2] if len(target) > 2 else None
        full = out.setdefault(module, torch.zeros(rows))
        full[start:start + length] = fn(v) if fn is not None else v
    return out


def start_from(run, init_lora: str, trainer_cls):
    """``run`` at step 0 with its adapters set to the LoRA in ``init_lora`` (fresh optimizer state; an EMA starts
    at these weights). ``trainer_cls``: the loop's Trainer, which builds the adapters the run will train."""
    path = resolve(init_lora)
    with torch.inference_mode(False):
        trainer = trainer_cls(run)
        weights = adapters_from_lora(run.model, read(path), trainer.names, run.lora, f"init_lora {path.name}")
        with torch.no_grad():
            for name, a in trainer.adapters.items():
                for key, p in a.inner.state_dict(keep_vars=True).items():
                    value = weights.get(f"{name}.{key}")
                    if value is not None:
                        p.copy_(value.reshape(p.shape).to(p.dtype))
        if trainer.ema is not None:
            trainer.ema = build_ema(trainer.params, run.settings.ema_decay)
        return run.advanced(state=trainer.state(), meta={**run.meta, "init_lora": path.name})
