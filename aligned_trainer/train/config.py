"""Training configuration objects (immutable) and their validation. Every check runs before training
starts and raises one ConfigError saying what to change."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import regex


class ConfigError(ValueError):
    pass


MAX_PATTERN = 1000   # characters of an include/exclude regex


def user_pattern(name: str, pattern: str):
    """A user's include/exclude regex compiled on the ``regex`` engine (matching takes a timeout and releases
    the GIL), or None when blank. Invalid or over-long patterns raise ConfigError naming the field."""
    if not pattern:
        return None
    if len(pattern) > MAX_PATTERN:
        raise ConfigError(f"{name} pattern is {len(pattern)} characters long, more than {MAX_PATTERN}; a module-name "
                          "regex is short: simplify it.")
    try:
        return regex.compile(pattern)
    except (regex.error, ValueError, OverflowError) as e:
        raise ConfigError(f"{name} pattern '{pattern}' is not a valid regex: {e}") from None


def check_finite(cfg, names: dict[str, str] | None = None) -> None:
    """Every float field of a config is a finite number (NaN passes every range check; JSON prompts can carry
    it). ``names`` maps field names to the node input names the user sees."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if any(isinstance(x, float) and not math.isfinite(x) for x in (v if isinstance(v, tuple) else (v,))):
            name = (names or {}).get(f.name, f.name)
            raise ConfigError(f"{name} is {v!r}: it must be a finite number (NaN or infinity usually come from a "
                              f"typed 'nan' or a broken primitive); enter a number for {name}.")


ALGORITHMS = ("lora", "locon", "loha", "lokr", "full")  # full: whole weights of the targets (train/full.py)
# module names per architecture: UNet/MMDiT/FLUX (attn*, ff, mlp), Lumina 2/Z-Image NextDiT (attention, feed_forward),
# Wan (blocks.N.self_attn / cross_attn .q/.k/.v/.o, ffn.0 / ffn.2), Qwen-Image (joint attention: to_q/k/v/out.0 for
# the image stream, add_q/k/v_proj and to_add_out for the text stream; img_mlp / txt_mlp .net.0.proj / .net.2),
# HiDream-I1 (double_/single_stream_blocks.N.block: attn1.to_q/k/v/out for the image stream, to_q_t/k_t/v_t/out_t for
# the text stream; SwiGLU w1/w2/w3 in ff_t and in ff_i, itself or its MoE's shared_experts and experts.N; the MoE
# gate is a bare Parameter, no layer)
_HIDREAM_BLOCK = r"(double|single)_stream_blocks\.\d+\.block\."
_ATTN = (r"(attn1|attn2|attn|self_attn|img_attn|txt_attn)\.(to_q|to_k|to_v|to_out\.0|qkv|proj)$|single_blocks\.\d+\.linear[12]$"
         r"|attention\.(qkv|out)$|blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)$"
         r"|attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)$"
         rf"|{_HIDREAM_BLOCK}attn1\.(to_q|to_k|to_v|to_out)(_t)?$")
_MLP = (r"(ff\.net\.(0\.proj|2)|mlp\.(fc1|fc2|0|2)|img_mlp\.(0|2)|txt_mlp\.(0|2)|feed_forward\.(w1|w2|w3))$"
        r"|(img_mlp|txt_mlp)\.net\.(0\.proj|2)$|blocks\.\d+\.ffn\.(0|2)$"
        rf"|{_HIDREAM_BLOCK}(ff_i|ff_t)\.(shared_experts\.|experts\.\d+\.)?(w1|w2|w3)$")
PRESETS = {
    # regexes over ComfyUI module names of the diffusion model (linear layers unless "+conv")
    "attention": _ATTN,
    "cross-attention": r"attn2\.(to_q|to_k|to_v|to_out\.0)$",
    "attention+mlp": f"{_ATTN}|{_MLP}",
    "all-linear": r".*",
    "all-linear+conv": r".*",
}


DORA_AXES = ("input", "output")


@dataclass(frozen=True)
class LoraConfig:
    algorithm: str = "lora"
    rank: int = 16
    alpha: float | None = 16.0
    preset: str = "attention+mlp"
    include: str = ""
    exclude: str = ""
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    network_dropout: float = 0.0
    init: str = "default"       # default (ComfyUI adapter init) | gaussian
    max_norm: float = 0.0       # scale_weight_norms; 0 = off
    dora: bool = False          # weight-decomposed LoRA (magnitude vector ``dora_scale``), lora/locon only
    # DoRA's magnitude axis: "input" = one per input column, normalised by the updated weight's column norms (a
    # (1, in) ``dora_scale``, LyCORIS wd_on_out=False, read alike by ComfyUI, Forge and A1111); "output" = one per
    # output row, normalised by the updated weight's row norms (peft's DoRA, what diffusers loads: ``dora_axes``)
    dora_axis: str = "input"

    @property
    def conv(self) -> bool:
        return self.algorithm == "locon" or self.preset.endswith("+conv")

    def validate(self) -> None:
        check_finite(self)
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"unknown LoRA algorithm '{self.algorithm}'; use one of {ALGORITHMS}")
        if self.rank is None or self.rank < 1:
            if self.alpha is not None:
                raise ConfigError(f"alpha {self.alpha} was given without a rank (rank={self.rank}); set rank >= 1")
            raise ConfigError(f"rank must be >= 1 (got {self.rank})")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"alpha must be > 0 (got {self.alpha}); alpha = rank means scale 1")
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown target preset '{self.preset}'; use one of {tuple(PRESETS)}")
        if self.algorithm == "locon" and self.preset in ("attention", "cross-attention"):
            raise ConfigError(f"LoCon trains convolutions but preset '{self.preset}' has none; choose "
                              "'all-linear+conv' or algorithm 'lora'")
        for name in ("rank_dropout", "module_dropout", "network_dropout"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {v}")
        if self.rank_dropout and self.algorithm != "lora" and self.algorithm != "locon":
            raise ConfigError("rank_dropout applies to lora/locon only")
        if self.network_dropout and (self.algorithm not in ("lora", "locon") or self.dora):
            raise ConfigError(f"network_dropout acts on activations, which only lora/locon without DoRA train on; "
                              f"'{self.algorithm}'{' with DoRA' if self.dora else ''} patches weights (ComfyUI "
                              "weight adapters). Use rank_dropout or module_dropout instead, or lora/locon "
                              "without DoRA.")
        for name in ("include", "exclude"):
            user_pattern(name, getattr(self, name))
        if self.init not in ("default", "gaussian"):
            raise ConfigError("init must be 'default' or 'gaussian'")
        if self.dora_axis not in DORA_AXES:
            raise ConfigError(f"dora_axis must be one of {DORA_AXES} (got {self.dora_axis!r})")
        if self.dora and self.algorithm not in ("lora", "locon"):
            raise ConfigError(f"DoRA decomposes LoRA weights; it does not apply to '{self.algorithm}' (use lora or "
                              "locon, or turn dora off)")

    @property
    def scale_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


# "sigmoid" is ai-toolkit's name for the logit-normal density; "linear" is ai-toolkit's evenly spaced grid of
# 1000 timesteps (a discrete uniform). "weighted" (ai-toolkit) = linear timesteps + a bell-shaped loss weight.
DENSITIES = ("uniform", "linear", "logit_normal", "sigmoid", "mode", "cosmap")
WEIGHTINGS = ("none", "min_snr", "debiased", "sd3_sigma_sqrt", "sd3_cosmap", "weighted")


@dataclass(frozen=True)
class TimestepConfig:
    density: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: str = "model"        # model | none | fixed | flux_resolution
    shift_value: float = 3.0
    bias: str = "balanced"      # balanced | high_noise | low_noise
    bias_strength: float = 0.0
    min_timestep: int = 0
    max_timestep: int = 1000
    weighting: str = "none"
    min_snr_gamma: float = 5.0
    noise_offset: float = 0.0
    multires_iterations: int = 0
    multires_discount: float = 0.3
    # Wan 2.2 A14B's two experts split the schedule at a boundary on the model's (shifted) sigma: the high-noise
    # expert denoises sigma >= boundary, the low-noise one the rest (Wan2.2 wan/configs/wan_t2v_A14B.py
    # boundary 0.875, wan_i2v_A14B.py 0.900; diffusers WanPipeline boundary_ratio: t >= boundary_ratio * 1000)
    expert: str = "none"        # none | high_noise | low_noise
    expert_boundary: float = 0.0  # 0 = the loaded model's official boundary (train/experts.json, set by Train Init)

    def validate(self) -> None:
        check_finite(self)
        if self.expert not in ("none", "high_noise", "low_noise"):
            raise ConfigError(f"expert must be none, high_noise or low_noise (got {self.expert!r})")
        if not 0.0 <= self.expert_boundary < 1.0:
            raise ConfigError(f"expert_boundary must be between 0 and 1 (got {self.expert_boundary}); 0 takes the "
                              "model's official boundary (Wan 2.2 T2V A14B 0.875, I2V A14B 0.9)")
        if self.density not in DENSITIES:
            raise ConfigError(f"unknown density '{self.density}'; use one of {DENSITIES}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown loss weighting '{self.weighting}'; use one of {WEIGHTINGS}")
        if not 0 <= self.min_timestep < self.max_timestep <= 1000:
            raise ConfigError(f"need 0 <= min_timestep < max_timestep <= 1000 (got {self.min_timestep}, {self.max_timestep})")
        if self.logit_std <= 0:
            raise ConfigError("logit_std must be > 0")
        if self.bias not in ("balanced", "high_noise", "low_noise"):
            raise ConfigError("bias must be balanced, high_noise or low_noise")
        if self.shift not in ("model", "none", "fixed", "flux_resolution"):
            raise ConfigError("shift must be model, none, fixed or flux_resolution")


OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "lion")
SCHEDULERS = ("constant", "cosine", "cosine_with_restarts", "linear", "polynomial")


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    scheduler: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1000       # horizon of decaying schedules
    num_cycles: int = 1
    power: float = 1.0
    grad_clip: float = 1.0        # 0 = off
    # Prodigy
    d_coef: float = 1.0
    decouple: bool = True
    use_bias_correction: bool = False
    safeguard_warmup: bool = False

    def validate(self) -> None:
        check_finite(self, {"lr": "learning_rate", "betas": "beta1/beta2"})
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer '{self.name}'; use one of {OPTIMIZERS}")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0 (got {self.lr}); Prodigy usually wants 1.0")
        if self.weight_decay < 0:
            raise ConfigError(f"weight decay must be >= 0 (got {self.weight_decay})")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"unknown scheduler '{self.scheduler}'; use one of {SCHEDULERS}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ConfigError("warmup_steps must be >= 0 and total_steps >= 1")
        if self.grad_clip < 0:
            raise ConfigError("grad_clip must be >= 0 (0 turns clipping off)")


def as_dict(cfg) -> dict:
    return {"type": type(cfg).__name__, **asdict(cfg)}
