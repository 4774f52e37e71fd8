"""Timestep sampling, loss weighting and training noise, for eps, v-prediction and flow models.

A training step draws u in (0, 1) (0 = clean, 1 = pure noise) from the configured density, applies the
bias, the [min, max] timestep window and (flow models) the shift, then turns it into the model's own
sigma through ComfyUI's ``model_sampling``. Densities and SD3 weighting use diffusers' training utilities.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import comfy.model_sampling
import torch

from . import model_facts
from .config import ConfigError, TimestepConfig

SHIFT_FACTS = Path(__file__).with_name("resolution_shift.json")


def is_flow(model_sampling) -> bool:
    return isinstance(model_sampling, comfy.model_sampling.CONST)


def sample_u(cfg: TimestepConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    """Draw n values of u in (0, 1) from the density, then bias and window them."""
    if cfg.density in ("logit_normal", "mode"):
        fork = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        devstate = torch.random.get_rng_state()
        torch.random.set_rng_state(fork.get_state())
        try:  # diffusers draws from the global RNG; run it on a forked, seeded state
            from diffusers.training_utils import compute_density_for_timestep_sampling  # (imported on use: ~10 s)

            u = compute_density_for_timestep_sampling(cfg.density, n, logit_mean=cfg.logit_mean,
                                                      logit_std=cfg.logit_std, mode_scale=cfg.mode_scale)
        finally:
            torch.random.set_rng_state(devstate)
    elif cfg.density == "sigmoid":  # ai-toolkit's name: sigmoid of a normal draw (= logit-normal)
        u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator))
    elif cfg.density == "linear":  # ai-toolkit: one of 1000 evenly spaced timesteps (discrete uniform)
        u = (torch.randint(0, 1000, (n,), generator=generator).float() + 0.5) / 1000
    elif cfg.density == "cosmap":
        v = torch.rand(n, generator=generator)
        u = 1.0 - 1.0 / (torch.tan(math.pi / 2 * v) + 1.0)
    else:
        u = torch.rand(n, generator=generator)
    u = u.float().clamp(1e-5, 1 - 1e-5)
    if cfg.bias != "balanced" and cfg.bias_strength > 0:
        k = 1.0 + cfg.bias_strength
        u = u ** (1.0 / k) if cfg.bias == "high_noise" else u ** k
    lo, hi = cfg.min_timestep / 1000.0, cfg.max_timestep / 1000.0
    return lo + u * (hi - lo)


def flux_resolution_shift(image_seq_len: int, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """FLUX's resolution-dependent shift mu (black-forest-labs get_schedule / diffusers calculate_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


@functools.lru_cache(maxsize=1)
def _shift_families() -> dict:
    return json.loads(SHIFT_FACTS.read_text())["families"]


def resolution_rule(model=None) -> dict:
    """The resolution_shift.json entry of ``model`` (a ModelPatcher or BaseModel; nearest listed class of its model
    config), FLUX.1's ('Flux') for a model with no listed class or none given."""
    found = model_facts.lookup(model, _shift_families()) if model is not None else None
    return found[1] if found else _shift_families()["Flux"]


def empirical_mu(image_seq_len: int, num_steps: int, a1: float, b1: float, a2: float, b2: float,
                 long_seq_len: int) -> float:
    """FLUX.2's resolution shift mu: a line in the step count through its fits at 10 and 200 steps (above
    ``long_seq_len`` tokens, the 200-step fit alone)."""
    m_200 = a2 * image_seq_len + b2
    if image_seq_len > long_seq_len:
        return float(m_200)
    m_10 = a1 * image_seq_len + b1
    slope = (m_200 - m_10) / 190.0
    return float(slope * num_steps + m_200 - 200.0 * slope)


def resolution_mu(rule: dict, latent_shape) -> float:
    """The shift mu of a latent of ``latent_shape`` under a resolution_shift.json ``rule``."""
    h, w = latent_shape[-2:]
    p = int(rule["patch_size"])
    seq = (h // p) * (w // p)
    if rule["rule"] == "linear":
        return flux_resolution_shift(seq, rule["base_seq_len"], rule["max_seq_len"], rule["base_shift"],
                                     rule["max_shift"])
    if rule["rule"] == "empirical":
        return empirical_mu(seq, rule["num_steps"], rule["a1"], rule["b1"], rule["a2"], rule["b2"],
                            rule["long_seq_len"])
    raise ConfigError(f"unknown resolution shift rule {rule['rule']!r} in {SHIFT_FACTS.name}")


def shift_u(cfg: TimestepConfig, u: torch.Tensor, latent_shape, rule: dict | None = None) -> torch.Tensor:
    """``rule``: the model's resolution_shift.json entry (:func:`resolution_rule`) for ``flux_resolution``."""
    if cfg.shift == "fixed":
        s = cfg.shift_value
        return s * u / (1 + (s - 1) * u)
    if cfg.shift == "flux_resolution":
        mu = resolution_mu(rule or resolution_rule(), latent_shape)
        return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    return u


def boundary_u(sigma_of, boundary: float, iterations: int = 60) -> float:
    """The u where the (increasing) schedule ``sigma_of(u)`` reaches ``boundary`` (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(sigma_of(torch.tensor([mid]))[0]) < boundary else (lo, mid)
    return (lo + hi) / 2


def expert_u(cfg: TimestepConfig, model_sampling, u: torch.Tensor, latent_shape, rule: dict | None = None) -> torch.Tensor:
    """Draws u mapped into one Wan 2.2 expert's part of the schedule: ``high_noise`` where the model's shifted
    sigma is >= ``expert_boundary``, ``low_noise`` below it (flow models: sigma is the noise fraction)."""
    if cfg.expert == "none":
        return u
    if not is_flow(model_sampling):
        raise ConfigError(f"expert '{cfg.expert}' splits a flow model's schedule (Wan 2.2); this model is not a "
                         "flow model: set expert to none")
    if not cfg.expert_boundary > 0:
        raise ConfigError(f"expert '{cfg.expert}' has no boundary yet: Train Init sets the model's official one "
                          "(train/experts.json); outside it, pass expert_boundary")
    b = boundary_u(lambda x: _sigmas(cfg, model_sampling, x, latent_shape, rule), cfg.expert_boundary)
    return b + u * (1.0 - b) if cfg.expert == "high_noise" else u * b


def sigmas_for(cfg: TimestepConfig, model_sampling, u: torch.Tensor, latent_shape, rule: dict | None = None) -> torch.Tensor:
    """Model sigmas for draws u. ``shift='model'`` uses the model's own schedule (ComfyUI percent_to_sigma);
    an ``expert`` keeps them on its side of the boundary; ``rule``: the model's resolution shift
    (:func:`resolution_rule`; FLUX.1's when None)."""
    return _sigmas(cfg, model_sampling, expert_u(cfg, model_sampling, u, latent_shape, rule), latent_shape, rule)


def _sigmas(cfg: TimestepConfig, model_sampling, u: torch.Tensor, latent_shape, rule: dict | None = None) -> torch.Tensor:
    if cfg.shift == "model":
        return torch.tensor([float(model_sampling.percent_to_sigma(1.0 - float(x))) for x in u])
    t = shift_u(cfg, u, latent_shape, rule)
    if is_flow(model_sampling):
        return t
    return torch.tensor([float(model_sampling.percent_to_sigma(1.0 - float(x))) for x in t])


def snr(model_sampling, sigma: torch.Tensor) -> torch.Tensor:
    if is_flow(model_sampling):
        return ((1 - sigma) / sigma.clamp(min=1e-6)) ** 2
    return 1.0 / sigma.clamp(min=1e-6) ** 2


def bell_weight(t: torch.Tensor) -> torch.Tensor:
    """ai-toolkit's "weighted" timesteps: exp(-2 (t - 1/2)^2) over t in [0, 1] (t = timestep / 1000), shifted
    to be 0 at both ends and scaled to mean 1 over the 1000-step grid."""
    grid = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    lo = math.exp(-0.5)
    mean = float((torch.exp(-2 * (grid - 0.5) ** 2) - lo).mean())
    return ((torch.exp(-2 * (t.double() - 0.5) ** 2) - lo) / mean).float()


def loss_weights(cfg: TimestepConfig, model_sampling, sigma: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss weights. ``u`` (the drawn timestep fraction, 1 = pure noise) is needed by 'weighted'
    on non-flow models; for flow models the timestep fraction is sigma itself."""
    if cfg.weighting == "none":
        return torch.ones_like(sigma)
    if cfg.weighting == "weighted":
        t = sigma if is_flow(model_sampling) or u is None else u
        return bell_weight(t.float())
    if cfg.weighting in ("sd3_sigma_sqrt", "sd3_cosmap"):
        from diffusers.training_utils import compute_loss_weighting_for_sd3  # (imported on use: ~10 s)

        scheme = "sigma_sqrt" if cfg.weighting == "sd3_sigma_sqrt" else "cosmap"
        return compute_loss_weighting_for_sd3(scheme, sigma.float())
    s = snr(model_sampling, sigma)
    if cfg.weighting == "min_snr":
        vpred = isinstance(model_sampling, comfy.model_sampling.V_PREDICTION)
        return torch.minimum(s, torch.full_like(s, cfg.min_snr_gamma)) / (s + 1 if vpred else s)
    return 1.0 / torch.sqrt(s.clamp(max=1000.0))  # debiased estimation


def training_noise(cfg: TimestepConfig, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(like.shape, generator=generator)
    if cfg.noise_offset:
        noise = noise + cfg.noise_offset * torch.randn((*like.shape[:2], *([1] * (like.ndim - 2))), generator=generator)
    if cfg.multires_iterations > 0:
        if like.ndim != 4:
            raise ConfigError(f"multires (pyramid) noise is drawn for image latents (batch, channels, h, w); these "
                              f"latents are {tuple(like.shape)} (video). Set multires_iterations to 0.")
        b, c, h, w = like.shape[0], like.shape[1], like.shape[-2], like.shape[-1]
        for i in range(cfg.multires_iterations):
            r = float(torch.rand((), generator=generator)) * 2 + 2
            wi, hi = max(1, int(w / r ** (i + 1))), max(1, int(h / r ** (i + 1)))
            small = torch.randn((b, c, hi, wi), generator=generator)
            up = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear").reshape(noise.shape)
            noise = noise + up * cfg.multires_discount ** (i + 1)
            if wi == 1 or hi == 1:
                break
        noise = noise / noise.std()
    return noise


def histogram_u(cfg: TimestepConfig, n: int = 20000, seed: int = 0) -> torch.Tensor:
    """Draws of the timestep fraction as training will use them; a fixed shift is included (it does not
    depend on the model), the model's own schedule and FLUX's resolution shift are applied at train time."""
    u = sample_u(cfg, n, torch.Generator().manual_seed(seed))
    return shift_u(cfg, u, (1, 1)) if cfg.shift == "fixed" else u
