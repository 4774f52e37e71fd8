"""Run settings to and from other trainers' config files: kohya sd-scripts (TOML or JSON, the argument names of
``train_network.py`` / ``flux_train_network.py`` / ``sd3_train_network.py``) and ai-toolkit (YAML, the
``config.process[0]`` of an ``sd_trainer`` job).

``FIELDS`` is the single table behind import, export and the docs (docs/interop.md): our setting, its kohya
name, its ai-toolkit path, and how well it maps (``exact``, ``approx`` with a note). Settings with no
equivalent on either side are listed in ``UNMAPPED``. Import returns the four settings objects and a list of
notes (values approximated or ignored); export writes every mapped value."""
from __future__ import annotations

import json
import math
import tomllib
from dataclasses import fields
from pathlib import Path

from .config import ConfigError, LoraConfig, OptimizerConfig, TimestepConfig
from .state import RunSettings

# (section, our field, kohya key, ai-toolkit path under the process, quality, note)
FIELDS = [
    ("lora", "rank", "network_dim", "network.linear", "exact", ""),
    ("lora", "alpha", "network_alpha", "network.linear_alpha", "exact", ""),
    ("lora", "network_dropout", "network_dropout", "network.dropout", "exact", ""),
    ("lora", "max_norm", "scale_weight_norms", None, "exact", ""),
    ("optimizer", "lr", "learning_rate", "train.lr", "exact", "kohya unet_lr wins over learning_rate on import"),
    ("optimizer", "name", "optimizer_type", "train.optimizer", "exact", "names translated (AdamW8bit <-> adamw8bit)"),
    ("optimizer", "weight_decay", "optimizer_args.weight_decay", "train.optimizer_params.weight_decay", "exact", ""),
    ("optimizer", "scheduler", "lr_scheduler", "train.lr_scheduler", "ai-toolkit approx",
     "kohya: constant with warmup is its constant_with_warmup (its constant refuses lr_warmup_steps); its other "
     "schedulers (adafactor, inverse_sqrt, cosine_with_min_lr, warmup_stable_decay, piecewise_constant) have no "
     "equivalent. ai-toolkit: cosine is torch CosineAnnealingLR over train.steps (ours without warmup), "
     "cosine_with_restarts "
     "restarts only after train.steps (= one cosine), linear is torch LinearLR (rises from lr/3 to lr: no "
     "equivalent), warmup only as constant_with_warmup"),
    ("optimizer", "warmup_steps", "lr_warmup_steps", "train.lr_scheduler_params.num_warmup_steps",
     "ai-toolkit approx", "kohya: a float below 1 (or 'N%') is a ratio of max_train_steps; ai-toolkit applies "
     "num_warmup_steps only with lr_scheduler constant_with_warmup"),
    ("optimizer", "total_steps", "max_train_steps", "train.steps", "exact", ""),
    ("optimizer", "num_cycles", "lr_scheduler_num_cycles", None, "exact", ""),
    ("optimizer", "power", "lr_scheduler_power", None, "exact", ""),
    ("optimizer", "grad_clip", "max_grad_norm", "train.max_grad_norm", "exact", ""),
    ("settings", "seed", "seed", None, "exact", "ai-toolkit seeds sampling only"),
    ("settings", "batch_size", "train_batch_size", "train.batch_size", "exact", ""),
    ("settings", "grad_accum", "gradient_accumulation_steps", "train.gradient_accumulation_steps", "exact",
     "ai-toolkit: train.gradient_accumulation (its newer key) is read too"),
    ("settings", "precision", "mixed_precision", "train.dtype", "exact",
     "fp32 <-> kohya 'no'; ai-toolkit's float/float32/half/float16/bfloat16 spellings are read"),
    ("settings", "gradient_checkpointing", "gradient_checkpointing", "train.gradient_checkpointing", "exact", ""),
    ("settings", "ema_decay", None, "train.ema_config.ema_decay", "exact", "kohya LoRA training has no EMA"),
    ("settings", "guidance", "guidance_scale", None, "exact", "FLUX dev guidance during training"),
    ("settings", "run_name", "output_name", "<name>", "exact", "ai-toolkit: config.name"),
    ("settings", "dop_weight", None, "train.diff_output_preservation_multiplier", "approx",
     "ai-toolkit applies it only with diff_output_preservation: true"),
    ("timesteps", "min_snr_gamma", "min_snr_gamma", "train.min_snr_gamma", "approx",
     "imported only when set; sets weighting=min_snr"),
    ("timesteps", "noise_offset", "noise_offset", "train.noise_offset", "exact", ""),
    ("timesteps", "multires_iterations", "multires_noise_iterations", None, "exact", ""),
    ("timesteps", "multires_discount", "multires_noise_discount", None, "exact", ""),
    ("timesteps", "min_timestep", "min_timestep", None, "exact", ""),
    ("timesteps", "max_timestep", "max_timestep", None, "exact", ""),
    ("timesteps", "logit_mean", "logit_mean", None, "exact", ""),
    ("timesteps", "logit_std", "logit_std", None, "exact", ""),
    ("timesteps", "mode_scale", "mode_scale", None, "exact", ""),
    ("timesteps", "density", "weighting_scheme", "train.timestep_type", "approx",
     "kohya: weighting_scheme logit_normal/mode are sampling densities (FLUX: with timestep_sampling sigma, its "
     "default), sigma_sqrt/cosmap loss weightings (our weighting sd3_sigma_sqrt/sd3_cosmap), uniform/none neither; "
     "ai-toolkit: sigmoid/linear/weighted"),
]
UNMAPPED = [
    ("lora.preset / include / exclude", "kohya: network_args target blocks differ per network module; ai-toolkit: "
     "network_kwargs only_if_contains / ignore_if_contains (module-name substrings, not regexes)"),
    ("lora.rank_dropout / module_dropout", "kohya network_args rank_dropout=, module_dropout= (exported there; "
     "ai-toolkit has none)"),
    ("lora.init", "neither tool exposes the LoRA init"),
    ("timesteps.shift / bias", "kohya discrete_flow_shift and ai-toolkit's per-model shift differ in meaning"),
    ("settings.val_count / reg_weight", "dataset-level settings in both tools"),
]
# sd-scripts' own defaults for the keys we map (48d368f: library/train_util.py's argparse defaults, train_network.py's
# network_alpha 1, networks/lora.py create_network's network_dim None -> 4, get_optimizer's "" -> AdamW), applied to
# keys a kohya config leaves out, so the imported settings are the run sd-scripts makes of the file. Its None
# defaults (noise_offset, multires_noise_iterations, min/max_timestep, scale_weight_norms, network_dropout) mean
# off. Not defaulted: seed (sd-scripts draws a random one), output_name, guidance_scale (FLUX only), optimizer
# weight_decay (the optimizer's own default).
KOHYA_DEFAULTS = {"network_dim": 4, "network_alpha": 1, "network_dropout": 0.0, "scale_weight_norms": 0.0,
                  "learning_rate": 2e-6, "optimizer_type": "AdamW", "lr_scheduler": "constant", "lr_warmup_steps": 0,
                  "max_train_steps": 1600, "lr_scheduler_num_cycles": 1, "lr_scheduler_power": 1.0,
                  "max_grad_norm": 1.0, "train_batch_size": 1, "gradient_accumulation_steps": 1,
                  "mixed_precision": "no", "gradient_checkpointing": False, "noise_offset": 0.0,
                  "multires_noise_iterations": 0, "multires_noise_discount": 0.3, "min_timestep": 0,
                  "max_timestep": 1000, "weighting_scheme": "uniform", "logit_mean": 0.0, "logit_std": 1.0,
                  "mode_scale": 1.29}
# kohya library/train_util.py get_scheduler_fix: constant refuses num_warmup_steps; ours applies warmup to constant
KOHYA_SCHEDULERS = {"constant": "constant", "constant_with_warmup": "constant", "cosine": "cosine",
                    "cosine_with_restarts": "cosine_with_restarts", "linear": "linear", "polynomial": "polynomial"}
# kohya weighting_scheme values that are loss weightings (sd3_train_utils.compute_loss_weighting_for_sd3)
KOHYA_WEIGHTINGS = {"sigma_sqrt": "sd3_sigma_sqrt", "cosmap": "sd3_cosmap"}
OPT_TO_KOHYA = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "prodigy": "Prodigy", "adafactor": "Adafactor",
                "lion": "Lion"}
PREC_TO_KOHYA = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}
DENSITY_KOHYA = {"logit_normal": "logit_normal", "mode": "mode", "uniform": "uniform"}
# ai-toolkit (toolkit/train_tools.py get_torch_dtype, toolkit/scheduler.py get_lr_scheduler): its names -> ours
AIT_DTYPES = {"fp32": "fp32", "float": "fp32", "float32": "fp32", "single": "fp32", "fp16": "fp16", "half": "fp16",
              "float16": "fp16", "bf16": "bf16", "bfloat16": "bf16"}
AIT_SCHEDULERS = {"constant": ("constant", ""), "constant_with_warmup": ("constant", ""), "cosine": ("cosine", ""),
                  "cosine_with_restarts": ("cosine", "ai-toolkit restarts only after train.steps: one cosine"),
                  "linear": (None, "ai-toolkit's linear is torch LinearLR (lr/3 rising to lr): no equivalent; kept "
                                   "constant")}
SECTIONS = {"lora": LoraConfig, "optimizer": OptimizerConfig, "timesteps": TimestepConfig, "settings": RunSettings}


def _get(d: dict, path: str):
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _put(d: dict, path: str, value) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        d = d.setdefault(part, {})
    d[parts[-1]] = value


def _coerce(section: str, name: str, value):
    default = getattr(SECTIONS[section](), name)
    try:
        if isinstance(default, bool):
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        if isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(value)
            return int(value)
        if isinstance(default, float) or (default is None and name == "alpha"):
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config value {name} = {value!r} is not a number") from None
    return value


def _kohya_args(value) -> dict:
    """kohya's optimizer_args / network_args: a list of 'k=v' strings."""
    out = {}
    for item in value or []:
        k, _, v = str(item).partition("=")
        out[k.strip()] = v.strip()
    return out


def _objects(values: dict) -> tuple:
    objs = []
    for section, cls in SECTIONS.items():
        known = {f.name for f in fields(cls)}
        objs.append(cls(**{k: v for k, v in values.get(section, {}).items() if k in known}))
    return tuple(objs)


def from_kohya(cfg: dict) -> tuple[tuple, list[str]]:
    """(LoraConfig, OptimizerConfig, TimestepConfig, RunSettings), notes from a kohya config dict."""
    values, notes = kohya_values(cfg)
    return _objects(values), notes


def kohya_values(cfg: dict) -> tuple[dict, list[str]]:
    """``{section: {field: value}}`` of the settings a kohya config dict sets, and notes."""
    values: dict = {s: {} for s in SECTIONS}
    notes = []
    opt_args = _kohya_args(cfg.get("optimizer_args"))
    net_args = _kohya_args(cfg.get("network_args"))
    for section, name, kohya, _, quality, note in FIELDS:
        if kohya is None:
            continue
        value = opt_args.get(kohya.split(".", 1)[1]) if kohya.startswith("optimizer_args.") else cfg.get(kohya)
        if value is None or value == "":
            value = KOHYA_DEFAULTS.get(kohya)
            if kohya == "optimizer_type":  # get_optimizer: the older flags choose when optimizer_type is empty
                value = "AdamW8bit" if cfg.get("use_8bit_adam") else "Lion" if cfg.get("use_lion_optimizer") else value
        if value is None:
            continue
        if name == "name":
            value = {v.lower(): k for k, v in OPT_TO_KOHYA.items()}.get(str(value).lower())
            if value is None:
                notes.append(f"optimizer_type {cfg[kohya]!r} has no equivalent; kept adamw")
                continue
        elif name == "precision":
            value = {v: k for k, v in PREC_TO_KOHYA.items()}.get(str(value), "fp32")
        elif name == "density":
            if str(value) in KOHYA_WEIGHTINGS:
                values["timesteps"]["weighting"] = KOHYA_WEIGHTINGS[str(value)]
                continue
            value = {**{v: k for k, v in DENSITY_KOHYA.items()}, "none": "uniform"}.get(str(value))
            if value is None:
                notes.append(f"weighting_scheme {cfg[kohya]!r} approximated by uniform timesteps")
                continue
        elif name == "scheduler":
            value = KOHYA_SCHEDULERS.get(str(value))
            if value is None:
                notes.append(f"lr_scheduler {cfg[kohya]!r} has no equivalent; kept constant")
                continue
        elif name == "warmup_steps":
            value = _kohya_warmup(value, cfg.get("max_train_steps"))
        values[section][name] = _coerce(section, name, value)
        if quality == "approx" and note:
            notes.append(f"{kohya}: {note}")
    if cfg.get("unet_lr") is not None:
        values["optimizer"]["lr"] = float(cfg["unet_lr"])
    values["timesteps"].setdefault("weighting", "none")  # sd-scripts weights no loss unless the file says so
    if "min_snr_gamma" in values["timesteps"]:
        values["timesteps"]["weighting"] = "min_snr"
    if cfg.get("debiased_estimation_loss"):
        values["timesteps"]["weighting"] = "debiased"
    module = str(cfg.get("network_module", "networks.lora"))
    algo = net_args.get("algo", "lora" if "lycoris" not in module else "locon")
    algorithm = {"lora": "lora", "locon": "locon", "loha": "loha", "lokr": "lokr"}.get(algo)
    if algorithm is None:
        notes.append(f"network algo {algo!r} has no equivalent; kept lora")
        algorithm = "lora"
    if algorithm == "lora" and "conv_dim" in net_args:
        algorithm = "locon"
    values["lora"]["algorithm"] = algorithm
    for k in ("rank_dropout", "module_dropout"):
        if k in net_args:
            values["lora"][k] = float(net_args[k])
    if algorithm == "locon":
        values["lora"]["preset"] = "all-linear+conv"
    if str(net_args.get("dora_wd", "")).lower() == "true":
        if "lycoris" in module:
            values["lora"]["dora"] = True
            if str(net_args.get("wd_on_out", "")).lower() == "true":  # LyCORIS: magnitudes per output row
                values["lora"]["dora_axis"] = "output"
        else:  # DoRA is LyCORIS's (dora_wd); sd-scripts' networks.lora has none and ignores the argument
            notes.append(f"network_args dora_wd=True ignored: {module} has no DoRA (it is LyCORIS's, "
                         "network_module lycoris.kohya)")
    return values, notes


def _kohya_warmup(value, max_train_steps) -> int:
    """kohya's lr_warmup_steps (train_util int_or_float / get_scheduler_fix): an int is steps; a float below 1 or
    'N%' is a ratio of max_train_steps (its default 1600)."""
    if isinstance(value, str) and value.strip().endswith("%"):
        value = float(value.strip()[:-1]) / 100
    if isinstance(value, float) and value < 1:
        return int(value * int(max_train_steps or 1600))
    return value


def to_kohya(lora: LoraConfig, opt: OptimizerConfig, ts: TimestepConfig, settings: RunSettings) -> dict:
    objs = {"lora": lora, "optimizer": opt, "timesteps": ts, "settings": settings}
    out: dict = {}
    opt_args = []
    for section, name, kohya, _, _, _ in FIELDS:
        if kohya is None:
            continue
        value = getattr(objs[section], name)
        if name == "name":
            value = OPT_TO_KOHYA[value]
        elif name == "precision":
            value = PREC_TO_KOHYA[value]
        elif name == "density":
            value = DENSITY_KOHYA.get(value, "uniform")
            if value == "uniform":
                value = {v: k for k, v in KOHYA_WEIGHTINGS.items()}.get(ts.weighting, "uniform")
        elif name == "scheduler" and value == "constant" and opt.warmup_steps:
            value = "constant_with_warmup"
        elif name == "alpha":
            value = lora.scale_alpha
        elif name == "min_snr_gamma" and ts.weighting != "min_snr":
            continue
        if kohya.startswith("optimizer_args."):
            opt_args.append(f"{kohya.split('.', 1)[1]}={value}")
        else:
            out[kohya] = value
    out["optimizer_args"] = opt_args
    if ts.weighting == "debiased":
        out["debiased_estimation_loss"] = True
    lycoris = lora.algorithm in ("loha", "lokr") or lora.dora  # DoRA (dora_wd) is LyCORIS's, not networks.lora's
    out["network_module"] = "lycoris.kohya" if lycoris else "networks.lora"
    net_args = [f"algo={'lora' if lora.algorithm == 'locon' else lora.algorithm}"] if lycoris else []
    if lora.conv:
        net_args += [f"conv_dim={lora.rank}", f"conv_alpha={lora.scale_alpha}"]
    net_args += [f"{k}={getattr(lora, k)}" for k in ("rank_dropout", "module_dropout") if getattr(lora, k)]
    if lora.dora:
        net_args.append("dora_wd=True")
        if lora.dora_axis == "output":
            net_args.append("wd_on_out=True")
    out["network_args"] = net_args
    return out


def from_ai_toolkit(cfg: dict) -> tuple[tuple, list[str]]:
    values, notes = ai_toolkit_values(cfg)
    return _objects(values), notes


def ai_toolkit_values(cfg: dict) -> tuple[dict, list[str]]:
    """``{section: {field: value}}`` of the settings an ai-toolkit job dict sets, and notes."""
    config = cfg.get("config") if isinstance(cfg, dict) else None
    config = config if isinstance(config, dict) else {}
    procs = config.get("process") or []
    if not procs or not isinstance(procs[0], dict):
        raise ConfigError("ai-toolkit config has no config.process[0]; is this an ai-toolkit job file?")
    proc = procs[0]
    values: dict = {s: {} for s in SECTIONS}
    notes = []
    for section, name, _, path, quality, note in FIELDS:
        if path is None:
            continue
        value = config.get("name") if path == "<name>" else _get(proc, path)
        if value is None:
            continue
        if name == "name":
            value = str(value).lower().replace("_", "")
            if value not in OPT_TO_KOHYA:
                notes.append(f"optimizer {_get(proc, path)!r} has no equivalent; kept adamw")
                continue
        elif name == "density":
            value = {"sigmoid": "sigmoid", "linear": "linear", "weighted": "linear", "lognorm_blend": "logit_normal"}.get(
                str(value), "uniform")
            if _get(proc, path) == "weighted":
                values["timesteps"]["weighting"] = "weighted"
        elif name == "dop_weight" and not _get(proc, "train.diff_output_preservation"):
            continue
        elif name == "precision":
            value = AIT_DTYPES.get(str(value).lower())
            if value is None:
                notes.append(f"train.dtype {_get(proc, path)!r} has no equivalent; kept fp32")
                continue
        elif name == "scheduler":
            value, note = AIT_SCHEDULERS.get(str(value), (None, f"lr_scheduler {value!r} has no equivalent; kept "
                                                                 "constant"))
            if note:
                notes.append(f"train.lr_scheduler: {note}")
            if value is None:
                continue
        elif name == "warmup_steps" and _get(proc, "train.lr_scheduler") != "constant_with_warmup":
            notes.append("train.lr_scheduler_params.num_warmup_steps ignored: ai-toolkit applies it only with "
                         "constant_with_warmup")
            continue
        values[section][name] = _coerce(section, name, value)
        if quality == "approx" and note:
            notes.append(f"{path}: {note}")
    if "min_snr_gamma" in values["timesteps"]:
        values["timesteps"]["weighting"] = "min_snr"
    if not _get(proc, "train.ema_config.use_ema"):
        values["settings"].pop("ema_decay", None)
    if (_get(proc, "train.gradient_accumulation") or 1) > 1:  # ai-toolkit's newer key (exclusive with the old one)
        values["settings"]["grad_accum"] = _coerce("settings", "grad_accum", _get(proc, "train.gradient_accumulation"))
    net = proc.get("network") or {}
    if isinstance(net, dict) and net.get("linear_alpha") is None and ("linear" in net or "rank" in net):
        # ai-toolkit's NetworkConfig: linear_alpha defaults to network.alpha, which defaults to 1.0
        values["lora"]["alpha"] = _coerce("lora", "alpha", net.get("alpha", 1.0))
    if isinstance(net, dict) and net.get("linear") is None and net.get("rank") is not None:
        values["lora"]["rank"] = _coerce("lora", "rank", net["rank"])  # NetworkConfig: rank, the older spelling
    algorithm = {"lora": "lora", "locon": "locon", "lokr": "lokr"}.get(str(net.get("type", "lora")).lower(), "lora")
    if algorithm == "lora" and net.get("conv"):
        algorithm = "locon"
    values["lora"]["algorithm"] = algorithm
    if algorithm == "locon":
        values["lora"]["preset"] = "all-linear+conv"
    return values, notes


def _ait_scheduler(opt: OptimizerConfig) -> str | None:
    """Our schedule in ai-toolkit's scheduler names, when it has one: constant (with warmup: constant_with_warmup),
    cosine without warmup (torch CosineAnnealingLR over train.steps) and one-cycle cosine_with_restarts."""
    if opt.scheduler == "constant":
        return "constant_with_warmup" if opt.warmup_steps else "constant"
    if opt.scheduler == "cosine" or (opt.scheduler == "cosine_with_restarts" and opt.num_cycles == 1):
        return None if opt.warmup_steps else "cosine"
    return None


def to_ai_toolkit(lora: LoraConfig, opt: OptimizerConfig, ts: TimestepConfig, settings: RunSettings) -> dict:
    objs = {"lora": lora, "optimizer": opt, "timesteps": ts, "settings": settings}
    proc: dict = {"type": "sd_trainer"}
    for section, name, _, path, _, _ in FIELDS:
        if path is None or path == "<name>":
            continue
        value = getattr(objs[section], name)
        if name == "alpha":
            value = lora.scale_alpha
        elif name == "density":
            value = "weighted" if ts.weighting == "weighted" else {"logit_normal": "lognorm_blend"}.get(value, value)
            if value not in ("sigmoid", "linear", "weighted", "lognorm_blend"):
                continue
        elif name == "min_snr_gamma" and ts.weighting != "min_snr":
            continue
        elif name == "ema_decay":
            if not value:
                continue
            _put(proc, "train.ema_config.use_ema", True)
        elif name == "dop_weight":
            if not value:
                continue
            _put(proc, "train.diff_output_preservation", True)
        elif name == "scheduler":
            value = _ait_scheduler(opt)
            if value is None:  # no equivalent in ai-toolkit: its default (constant) applies
                continue
        elif name == "warmup_steps" and not (value and opt.scheduler == "constant"):
            continue
        _put(proc, path, value)
    proc["network"]["type"] = "lokr" if lora.algorithm == "lokr" else "lora"
    if lora.conv:
        proc["network"].update({"conv": lora.rank, "conv_alpha": lora.scale_alpha})
    return {"job": "extension", "config": {"name": settings.run_name, "process": [proc]}}


MAX_BYTES = 1_000_000  # a training config is a few kB


def read(path: str | Path) -> tuple[tuple, list[str]]:
    """Import a kohya ``.toml``/``.json`` or an ai-toolkit ``.yaml``/``.yml`` config file."""
    values, notes = read_values(path)
    return _objects(values), notes


def read_values(path: str | Path) -> tuple[dict, list[str]]:
    """``{section: {field: value}}`` of the settings a config file sets (by suffix: kohya ``.toml``/``.json``,
    ai-toolkit ``.yaml``/``.yml``), and notes on what was approximated or has no equivalent."""
    path = Path(path)
    if path.suffix not in (".toml", ".json", ".yaml", ".yml"):
        raise ConfigError(f"config file {path.name}: use .toml/.json (kohya sd-scripts) or .yaml/.yml (ai-toolkit)")
    if not path.is_file():
        raise ConfigError(f"config file {path.name} does not exist; put it in ComfyUI's input folder")
    if path.stat().st_size > MAX_BYTES:
        raise ConfigError(f"config file {path.name} is larger than {MAX_BYTES} bytes; is it a training config?")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if path.suffix == ".toml":
            return kohya_values(tomllib.loads(text))
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
            if not isinstance(data, dict):
                raise ConfigError(f"config file {path.name} is not an ai-toolkit job (a YAML mapping with config:)")
            return ai_toolkit_values(data)
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path.name} is not a JSON object of kohya arguments")
        return ai_toolkit_values(data) if "config" in data else kohya_values(data)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"config file {path.name} cannot be parsed ({e})") from None
    except RecursionError:
        raise ConfigError(f"config file {path.name} is nested too deeply to read; a training config is a flat "
                          "list of settings (kohya) or a few levels of mappings (ai-toolkit)") from None
    except (TypeError, ValueError, AttributeError, OverflowError, IndexError, KeyError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config file {path.name}: a value has a type or size this format does not use ({e}); "
                          "check the file against its tool's documentation (kohya sd-scripts arguments, "
                          "ai-toolkit job config)") from None
    except Exception as e:  # yaml errors
        if type(e).__module__.startswith("yaml"):
            raise ConfigError(f"config file {path.name} cannot be parsed ({str(e)[:200]})") from None
        raise


def import_config(text: str) -> tuple[LoraConfig, OptimizerConfig, TimestepConfig, dict, dict]:
    """The Import Training Config node: the file ``text`` (a name in ComfyUI's input folder, or a path inside it or
    inside a folder the server admin allows; ``paths.config_roots``) -> LoRA Config, Optimizer and Timestep
    Strategy objects (the file's values, defaults elsewhere), the run settings the file sets (``{field: value}``,
    for Train Init's ``run_settings``: they replace its widgets, the rest keep theirs), and a summary
    ``{"file", "lora", "optimizer", "timesteps", "settings", "notes"}``. Everything is validated here."""
    from .. import paths

    path = paths.confine(text, paths.config_roots())
    values, notes = read_values(path)
    lora, opt, ts, _ = _objects(values)
    for obj in (lora, opt, ts):
        obj.validate()
    settings = dict(values["settings"])
    RunSettings(**settings)  # the same checks Train Init applies (finite numbers)
    summary = {"file": path.name, "lora": _as_dict(lora), "optimizer": _as_dict(opt), "timesteps": _as_dict(ts),
               "settings": settings, "notes": notes}
    return lora, opt, ts, settings, summary


def widget_values(summary: dict) -> dict[str, dict]:
    """An import summary's sections under the names of the nodes' widgets (``lr`` -> learning_rate, ``betas`` ->
    beta1/beta2), for :func:`check_limits`."""
    opt = dict(summary["optimizer"])
    opt["learning_rate"] = opt.pop("lr")
    opt["beta1"], opt["beta2"] = opt.pop("betas")
    return {"lora": summary["lora"], "optimizer": opt, "timesteps": summary["timesteps"],
            "settings": summary["settings"]}


def check_limits(file: str, values: dict[str, dict], limits: dict[str, tuple[str, dict[str, tuple]]]) -> None:
    """Refuse a value a file sets outside the limits of the widget it replaces: ``limits`` is ``{section: (node
    title, {widget: (min, max)})}`` (from the node schemas), ``values`` is :func:`widget_values`. A file can hold
    what no widget allows (a rank of 10**11: a 128 TB allocation at Train Init; a seed past 64 bits)."""
    for section, (title, widgets) in limits.items():
        for name, (lo, hi) in widgets.items():
            v = values.get(section, {}).get(name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise ConfigError(f"config file {file}: {name} = {v!r} is outside what {title}'s {name} widget "
                                  f"allows ({lo} to {hi}); change it in the file")


def config_fingerprint(text: str) -> str:
    """What the Import Training Config node's result depends on: the guarded file's content hash (so an edited file
    is read again); a refused or unreadable path gives its error text (the node's run then reports it)."""
    import hashlib

    from .. import paths

    try:
        path = paths.confine(text, paths.config_roots())
        if not path.is_file() or path.stat().st_size > MAX_BYTES:
            return f"missing or too large: {text}"
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except (paths.PathRefused, OSError) as e:
        return f"error: {e}"


def apply_settings(widgets: RunSettings, imported: dict | None) -> RunSettings:
    """Train Init's settings: its widget values, replaced by those an imported config sets."""
    if not imported:
        return widgets
    from dataclasses import replace

    known = {f.name for f in fields(RunSettings)}
    return replace(widgets, **{k: v for k, v in imported.items() if k in known})


def _as_dict(obj) -> dict:
    from dataclasses import asdict

    return asdict(obj)


EXPORT_FOLDER = ("aligned_trainer", "configs")  # under ComfyUI's output folder


def export_run(run, name: str = "", folder: Path | None = None) -> tuple[Path, Path]:
    """Write the run's settings as a kohya TOML and an ai-toolkit YAML into ``output/aligned_trainer/configs``
    (``<name>.toml``, ``<name>.yaml``; ``name`` defaults to the run name), each atomically at the first free
    name (``<name>_2.toml``, ...); return both paths."""
    from . import files

    name = (name or run.settings.run_name).strip()
    why = files.name_problem(name, 100)
    if why:
        raise ConfigError(f"config name {name[:60]!r} is not allowed: {why}. Use a plain file name (letters, "
                          "digits, '_', '-', '.', spaces; no '/', '\\' or '..'), at most 100 characters, e.g. "
                          "'my_lora'")
    if folder is None:
        import folder_paths

        folder = Path(folder_paths.get_output_directory()).joinpath(*EXPORT_FOLDER)
    objs = (run.lora, run.optimizer, run.timesteps, run.settings)
    out = []
    for suffix in (".toml", ".yaml"):
        text = _text(Path(name + suffix), *objs)
        out.append(files.write_atomic(Path(folder) / (name + suffix),
                                      lambda tmp, t=text: Path(tmp).write_text(t, encoding="utf-8"),
                                      overwrite=False))
    return out[0], out[1]


def toml_text(cfg: dict) -> str:
    """A flat kohya config as TOML (strings, numbers, booleans and lists of those)."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return json.dumps(str(v))
    return "".join(f"{k} = {val(v)}\n" for k, v in cfg.items())


def _text(path: Path, lora, opt, ts, settings) -> str:
    if path.suffix == ".toml":
        return toml_text(to_kohya(lora, opt, ts, settings))
    if path.suffix == ".json":
        return json.dumps(to_kohya(lora, opt, ts, settings), indent=2)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_dump(to_ai_toolkit(lora, opt, ts, settings), sort_keys=False)
    raise ConfigError(f"config file {path}: use .toml/.json (kohya sd-scripts) or .yaml/.yml (ai-toolkit)")


def write(path: str | Path, lora, opt, ts, settings) -> Path:
    """Export to kohya TOML/JSON or ai-toolkit YAML by the file's suffix, written atomically."""
    from . import files

    path = Path(path)
    text = _text(path, lora, opt, ts, settings)
    return files.write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite=True)
