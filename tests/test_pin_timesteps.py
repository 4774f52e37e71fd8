"""Timestep Strategy options pinned to independent computations (issue #26): each test fails when its
option is ignored, inverted, off by one or applied to the wrong quantity. References: diffusers'
``compute_snr`` on a DDPMScheduler with SD1.5's betas, diffusers' FLUX ``calculate_shift`` and
FlowMatch shift formula, kohya's debiased estimation, and hand-built tensors on tiny inputs."""
from __future__ import annotations

import math

import pytest
import torch

TIMESTEPS = torch.tensor([0, 1, 10, 100, 400, 700, 999])  # t=0: snr above 1000 (debiased clamp)


@pytest.fixture(scope="module")
def TS(comfy):
    import comfy.model_sampling as ms

    class Eps(ms.ModelSamplingDiscrete, ms.EPS):
        pass

    class V(ms.ModelSamplingDiscrete, ms.V_PREDICTION):
        pass

    class Flow(ms.ModelSamplingDiscreteFlow, ms.CONST):
        pass

    class NS:
        ts = comfy.engine("train.timesteps")
        C = comfy.engine("train.config")
        eps, v, flow = Eps(None), V(None), Flow(None)
    return NS


def _ddpm_snr(t):
    """diffusers' compute_snr on SD1.5's noise schedule (scaled_linear 0.00085..0.012, 1000 steps)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return compute_snr(sched, t)


@pytest.mark.parametrize("gamma", [1.0, 3.7])
def test_min_snr_gamma_matches_diffusers_compute_snr(TS, gamma):
    """min-SNR-γ (Hang et al.; diffusers train_text_to_image): eps weight min(snr, γ)/snr, v weight
    min(snr, γ)/(snr + 1), on the sigmas of ComfyUI's SD1.5 schedule at the same timesteps."""
    snr = _ddpm_snr(TIMESTEPS).float()
    cfg = TS.C.TimestepConfig(weighting="min_snr", min_snr_gamma=gamma)
    for ms, expected in ((TS.eps, torch.clamp(snr, max=gamma) / snr),
                         (TS.v, torch.clamp(snr, max=gamma) / (snr + 1))):
        sigma = ms.sigmas[TIMESTEPS].float()
        w = TS.ts.loss_weights(cfg, ms, sigma)
        torch.testing.assert_close(w, expected, rtol=1e-4, atol=1e-6)
    # flow models: snr = ((1 - sigma) / sigma)^2
    s = torch.tensor([0.05, 0.3, 0.5, 0.9])
    fsnr = ((1 - s) / s) ** 2
    torch.testing.assert_close(TS.ts.loss_weights(cfg, TS.flow, s), torch.clamp(fsnr, max=gamma) / fsnr)


def test_debiased_estimation_is_kohyas_formula(TS):
    """kohya apply_debiased_estimation: 1/sqrt(min(snr, 1000))."""
    snr = _ddpm_snr(TIMESTEPS).float()
    w = TS.ts.loss_weights(TS.C.TimestepConfig(weighting="debiased"), TS.eps, TS.eps.sigmas[TIMESTEPS].float())
    torch.testing.assert_close(w, 1 / torch.sqrt(torch.clamp(snr, max=1000.0)), rtol=1e-4, atol=1e-6)


def test_sd3_weightings_and_none(TS):
    s = torch.tensor([0.1, 0.4, 0.8])
    sqrt = TS.ts.loss_weights(TS.C.TimestepConfig(weighting="sd3_sigma_sqrt"), TS.flow, s)
    cosmap = TS.ts.loss_weights(TS.C.TimestepConfig(weighting="sd3_cosmap"), TS.flow, s)
    torch.testing.assert_close(sqrt, s ** -2.0)
    torch.testing.assert_close(cosmap, 2 / (math.pi * (1 - 2 * s + 2 * s ** 2)))
    torch.testing.assert_close(TS.ts.loss_weights(TS.C.TimestepConfig(), TS.flow, s), torch.ones(3))


def test_weighted_uses_the_drawn_timestep_on_eps_models(TS):
    """ai-toolkit's bell weight is a function of the timestep fraction u (not of sigma) on eps/v models, and of
    sigma on flow models: exp(-2 (t - 1/2)^2) - exp(-1/2), scaled to mean 1 over the 1000-step grid."""
    grid = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    bell = lambda t: torch.exp(-2 * (t - 0.5) ** 2) - math.exp(-0.5)  # noqa: E731
    norm = float(bell(grid).mean())
    u = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    cfg = TS.C.TimestepConfig(weighting="weighted")
    w_eps = TS.ts.loss_weights(cfg, TS.eps, torch.tensor([14.6, 1.0, 0.03]), u.float())
    torch.testing.assert_close(w_eps.double(), bell(u) / norm, rtol=1e-5, atol=1e-6)
    w_flow = TS.ts.loss_weights(cfg, TS.flow, u.float(), torch.tensor([0.9, 0.9, 0.9]))
    torch.testing.assert_close(w_flow.double(), bell(u) / norm, rtol=1e-5, atol=1e-6)


def test_fixed_and_flux_shift_match_diffusers(TS):
    """Fixed shift: FlowMatchEulerDiscreteScheduler's s*t/(1 + (s-1) t); FLUX: mu from diffusers'
    calculate_shift of the packed sequence length ((h/2)(w/2)), t -> e^mu / (e^mu + 1/t - 1)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    u = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    for s in (2.0, 3.0):
        out = TS.ts.sigmas_for(TS.C.TimestepConfig(shift="fixed", shift_value=s), TS.flow, u, (1, 16, 8, 8))
        torch.testing.assert_close(out, s * u / (1 + (s - 1) * u))
    for h, w in ((32, 32), (64, 48), (128, 128)):
        mu = calculate_shift((h // 2) * (w // 2))
        out = TS.ts.sigmas_for(TS.C.TimestepConfig(shift="flux_resolution"), TS.flow, u, (1, 16, h, w))
        torch.testing.assert_close(out, math.exp(mu) / (math.exp(mu) + (1 / u - 1)))
    # the model's own schedule: ComfyUI's percent_to_sigma at 1 - u; no shift on a flow model: sigma = u
    own = TS.ts.sigmas_for(TS.C.TimestepConfig(shift="model"), TS.eps, u, (1, 4, 8, 8))
    torch.testing.assert_close(own, torch.tensor([float(TS.eps.percent_to_sigma(1 - float(x))) for x in u]))
    torch.testing.assert_close(TS.ts.sigmas_for(TS.C.TimestepConfig(shift="none"), TS.flow, u, (1, 16, 8, 8)), u)
    # a fixed shift on an eps model shifts u, then maps it through the model's schedule
    fixed_eps = TS.ts.sigmas_for(TS.C.TimestepConfig(shift="fixed", shift_value=3.0), TS.eps, u, (1, 4, 8, 8))
    t = 3 * u / (1 + 2 * u)
    torch.testing.assert_close(fixed_eps, torch.tensor([float(TS.eps.percent_to_sigma(1 - float(x))) for x in t]))


def test_bias_and_window_exact_on_the_same_draws(TS):
    """The bias and the window transform the same uniform draws exactly as documented."""
    base = TS.ts.sample_u(TS.C.TimestepConfig(), 64, torch.Generator().manual_seed(4))
    hi = TS.ts.sample_u(TS.C.TimestepConfig(bias="high_noise", bias_strength=0.5), 64, torch.Generator().manual_seed(4))
    lo = TS.ts.sample_u(TS.C.TimestepConfig(bias="low_noise", bias_strength=0.5), 64, torch.Generator().manual_seed(4))
    off = TS.ts.sample_u(TS.C.TimestepConfig(bias="high_noise", bias_strength=0.0), 64, torch.Generator().manual_seed(4))
    bal = TS.ts.sample_u(TS.C.TimestepConfig(bias="balanced", bias_strength=0.5), 64, torch.Generator().manual_seed(4))
    torch.testing.assert_close(bal, base)  # strength only acts with a bias
    torch.testing.assert_close(hi, base ** (1 / 1.5))
    torch.testing.assert_close(lo, base ** 1.5)
    torch.testing.assert_close(off, base)
    win = TS.ts.sample_u(TS.C.TimestepConfig(min_timestep=250, max_timestep=750), 64, torch.Generator().manual_seed(4))
    torch.testing.assert_close(win, 0.25 + base * 0.5)
    assert base.min() > 0 and base.max() < 1
    # draws are clamped to [1e-5, 1 - 1e-5]: a very wide sigmoid density reaches 0 and 1 in float32
    wide = TS.ts.sample_u(TS.C.TimestepConfig(density="sigmoid", logit_std=60.0), 4000, torch.Generator().manual_seed(1))
    assert float(wide.min()) == pytest.approx(1e-5) and float(wide.max()) == pytest.approx(1 - 1e-5)


def test_densities_use_their_parameters(TS):
    """sigmoid: sigmoid(mean + std * z) of the run's generator; linear: the 1000-step grid; logit-normal/mode
    draw from a fork of the run's generator (same seed, same draws; different seed, different draws)."""
    g = lambda s=7: torch.Generator().manual_seed(s)  # noqa: E731
    z = torch.randn(32, generator=g())
    sig = TS.ts.sample_u(TS.C.TimestepConfig(density="sigmoid", logit_mean=0.4, logit_std=1.7), 32, g())
    torch.testing.assert_close(sig, torch.sigmoid(0.4 + 1.7 * z).clamp(1e-5, 1 - 1e-5))
    lin = TS.ts.sample_u(TS.C.TimestepConfig(density="linear"), 32, g())
    torch.testing.assert_close(lin, (torch.randint(0, 1000, (32,), generator=g()).float() + 0.5) / 1000)
    for density in ("logit_normal", "mode"):
        cfg = TS.C.TimestepConfig(density=density)
        a, b, c = (TS.ts.sample_u(cfg, 32, g(s)) for s in (1, 1, 2))
        assert torch.equal(a, b) and not torch.equal(a, c), density
    # the global RNG is left as it was
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    TS.ts.sample_u(TS.C.TimestepConfig(density="logit_normal"), 8, g())
    assert torch.equal(torch.random.get_rng_state(), before)
    # uniform and cosmap draw from the run's generator, not the global RNG
    for density in ("uniform", "cosmap"):
        cfg = TS.C.TimestepConfig(density=density)
        torch.manual_seed(1)
        a = TS.ts.sample_u(cfg, 16, g())
        torch.manual_seed(2)
        assert torch.equal(a, TS.ts.sample_u(cfg, 16, g())), density


def test_noise_offset_and_pyramid_noise_exact(TS):
    """Noise offset: white noise + offset * one normal draw per (sample, channel), from the same generator.
    Multires: each level adds bilinear-upsampled noise times discount^(level + 1), then the sum is normalised
    to std 1."""
    like = torch.zeros(2, 3, 8, 8)
    g = torch.Generator().manual_seed(11)
    white = torch.randn(like.shape, generator=g)
    per_channel = torch.randn((2, 3, 1, 1), generator=g)
    out = TS.ts.training_noise(TS.C.TimestepConfig(noise_offset=0.3), like, torch.Generator().manual_seed(11))
    torch.testing.assert_close(out, white + 0.3 * per_channel)
    # a non-square latent large enough for several levels; 1 and 5 iterations (5 stops when a side reaches 1)
    like = torch.zeros(2, 3, 96, 160)
    for iterations in (1, 5):
        g = torch.Generator().manual_seed(11)
        noise = torch.randn(like.shape, generator=g)
        for i in range(iterations):
            r = float(torch.rand((), generator=g)) * 2 + 2
            wi, hi = max(1, int(160 / r ** (i + 1))), max(1, int(96 / r ** (i + 1)))
            small = torch.randn((2, 3, hi, wi), generator=g)
            noise = noise + torch.nn.functional.interpolate(small, size=(96, 160), mode="bilinear") * 0.4 ** (i + 1)
            if wi == 1 or hi == 1:
                break
        expected = noise / noise.std()
        out = TS.ts.training_noise(TS.C.TimestepConfig(multires_iterations=iterations, multires_discount=0.4), like,
                                   torch.Generator().manual_seed(11))
        torch.testing.assert_close(out, expected)


def test_histogram_applies_only_a_fixed_shift(TS):
    for cfg in (TS.C.TimestepConfig(shift="fixed", shift_value=2.5), TS.C.TimestepConfig(shift="flux_resolution"),
                TS.C.TimestepConfig(shift="model")):
        u = TS.ts.sample_u(cfg, 500, torch.Generator().manual_seed(3))
        h = TS.ts.histogram_u(cfg, 500, seed=3)
        torch.testing.assert_close(h, 2.5 * u / (1 + 1.5 * u) if cfg.shift == "fixed" else u)
