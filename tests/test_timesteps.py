"""Timestep densities against their analytic forms (KS test, 20k draws) and diffusers; bias, shift,
loss weights and noise for eps, v and flow model samplings."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

N = 20000


@pytest.fixture(scope="module")
def TS(comfy):
    return comfy.engine("train.timesteps"), comfy.engine("train.config")


def draw(TS, **kw):
    ts, C = TS
    return ts.sample_u(C.TimestepConfig(**kw), N, torch.Generator().manual_seed(3)).numpy()


def test_uniform(TS):
    assert stats.kstest(draw(TS), "uniform").pvalue > 0.01


def test_logit_normal_matches_analytic_and_diffusers(TS):
    u = draw(TS, density="logit_normal", logit_mean=0.5, logit_std=0.8)
    logit = np.log(u / (1 - u))
    assert stats.kstest(logit, "norm", args=(0.5, 0.8)).pvalue > 0.01
    from diffusers.training_utils import compute_density_for_timestep_sampling

    torch.manual_seed(0)
    ref = compute_density_for_timestep_sampling("logit_normal", N, logit_mean=0.5, logit_std=0.8).numpy()
    assert stats.ks_2samp(u, ref).pvalue > 0.01


def test_mode_matches_diffusers(TS):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = draw(TS, density="mode", mode_scale=1.29)
    torch.manual_seed(0)
    ref = compute_density_for_timestep_sampling("mode", N, mode_scale=1.29).numpy()
    assert stats.ks_2samp(u, ref).pvalue > 0.01


def test_cosmap_matches_analytic_cdf(TS):
    u = draw(TS, density="cosmap")
    # u = 1 - 1/(tan(pi v / 2) + 1), v ~ U(0,1)  =>  F(u) = (2/pi) atan(u / (1 - u))
    cdf = lambda x: 2 / math.pi * np.arctan(x / (1 - x))
    assert stats.kstest(u, cdf).pvalue > 0.01


def test_bias_moves_the_mean(TS):
    base = draw(TS).mean()
    hi = draw(TS, bias="high_noise", bias_strength=1.0).mean()
    lo = draw(TS, bias="low_noise", bias_strength=1.0).mean()
    assert lo < base - 0.1 and hi > base + 0.1
    # high_noise with strength s is u^(1/(1+s)): its mean is (1+s)/(2+s) = 2/3 for s=1
    assert abs(hi - 2 / 3) < 0.01 and abs(lo - 1 / 3) < 0.01


def test_window_limits_timesteps(TS):
    u = draw(TS, min_timestep=200, max_timestep=600)
    assert u.min() >= 0.2 and u.max() <= 0.6 and stats.kstest((u - 0.2) / 0.4, "uniform").pvalue > 0.01


def test_shift_moves_flow_sigmas_up(TS):
    import comfy.model_sampling as ms

    ts, C = TS

    class Flow(ms.ModelSamplingDiscreteFlow, ms.CONST):
        pass

    flow = Flow(None)
    u = torch.rand(N, generator=torch.Generator().manual_seed(1))
    fixed = ts.sigmas_for(C.TimestepConfig(shift="fixed", shift_value=3.0), flow, u, (1, 16, 64, 64))
    none = ts.sigmas_for(C.TimestepConfig(shift="none"), flow, u, (1, 16, 64, 64))
    assert torch.allclose(none, u)
    assert torch.allclose(fixed, 3 * u / (1 + 2 * u))  # SD3 shift formula
    assert fixed.mean() > none.mean() + 0.1
    small = ts.sigmas_for(C.TimestepConfig(shift="flux_resolution"), flow, u, (1, 16, 32, 32)).mean()
    large = ts.sigmas_for(C.TimestepConfig(shift="flux_resolution"), flow, u, (1, 16, 128, 128)).mean()
    assert large > small  # larger images are shifted towards noise
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert abs(ts.flux_resolution_shift(4096) - calculate_shift(4096)) < 1e-9


def test_loss_weights_eps_v_flow(TS):
    import comfy.model_sampling as ms

    ts, C = TS

    class Eps(ms.ModelSamplingDiscrete, ms.EPS):
        pass

    class V(ms.ModelSamplingDiscrete, ms.V_PREDICTION):
        pass

    sigma = torch.tensor([0.1, 1.0, 10.0])
    snr = 1 / sigma ** 2
    w_eps = ts.loss_weights(C.TimestepConfig(weighting="min_snr", min_snr_gamma=5.0), Eps(None), sigma)
    w_v = ts.loss_weights(C.TimestepConfig(weighting="min_snr", min_snr_gamma=5.0), V(None), sigma)
    assert torch.allclose(w_eps, torch.clamp(snr, max=5.0) / snr)
    assert torch.allclose(w_v, torch.clamp(snr, max=5.0) / (snr + 1))
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    s = torch.tensor([0.2, 0.5, 0.9])
    assert torch.allclose(ts.loss_weights(C.TimestepConfig(weighting="sd3_sigma_sqrt"), Eps(None), s),
                          compute_loss_weighting_for_sd3("sigma_sqrt", s))


def test_noise_offset_and_multires(TS):
    ts, C = TS
    like = torch.zeros(64, 4, 32, 32)
    base = ts.training_noise(C.TimestepConfig(), like, torch.Generator().manual_seed(0))
    off = ts.training_noise(C.TimestepConfig(noise_offset=0.5), like, torch.Generator().manual_seed(0))
    # the offset adds a per-channel constant: channel means spread out
    assert off.mean(dim=(2, 3)).std() > 3 * base.mean(dim=(2, 3)).std()
    pyr = ts.training_noise(C.TimestepConfig(multires_iterations=4, multires_discount=0.5), like,
                            torch.Generator().manual_seed(0))
    assert abs(float(pyr.std()) - 1.0) < 1e-4
    # pyramid noise is spatially correlated: neighbouring pixels correlate, white noise does not
    corr = lambda n: float(torch.corrcoef(torch.stack([n[..., :-1].flatten(), n[..., 1:].flatten()]))[0, 1])
    assert corr(pyr) > 0.1 > abs(corr(base))
