"""SD2.x v-prediction training: the tiny SD2 (ComfyUI's ``SD20`` config, v-prediction as ComfyUI's own detection
decides it, see support.factories.sd2) trains on the velocity v = alpha_t * eps - sigma_t * x0.

The reference is diffusers' ``DDPMScheduler`` with SD2's schedule (stabilityai/stable-diffusion-2-1
scheduler_config.json: scaled_linear betas 0.00085..0.012 over 1000 steps, v_prediction): it noises x0
(``add_noise``) and gives the velocity (``get_velocity``); the UNet is called directly on the noised latent at
that timestep. The trainer's loss on the same x0, noise and timestep must be the MSE between the two."""
from __future__ import annotations

import pytest
import torch

from support.factories import sd2


@pytest.fixture(scope="module")
def bundle(comfy):
    return sd2.build(v_prediction=True)


def _run(comfy, model, cond, tmp_path, name="sd2v", resume="none"):
    types = comfy.engine("data.types")
    C = comfy.engine("train.config")
    st = comfy.engine("train.state")
    loop = comfy.engine("train.loop")
    lat = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))
    ts = types.TrainingSet((types.Sample("a", lat, (types.CaptionVariant("ohwx", cond),), bucket=(64, 64)),))
    return loop.init_run(model, ts, C.LoraConfig(rank=4, alpha=4, preset="attention"),
                         C.TimestepConfig(weighting="min_snr"), C.OptimizerConfig(lr=1e-3),
                         st.RunSettings(run_name=name, precision="fp32"), runs_root=tmp_path, resume=resume)


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="v_prediction")


def _reference(model, cond, x0, noise, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(UNet output on diffusers' noised latent at timestep t, diffusers' velocity target)."""
    sched = _scheduler()
    tt = torch.tensor([t])
    xt = sched.add_noise(x0, noise, tt)
    with torch.no_grad():
        out = model.model.diffusion_model(xt, timesteps=tt.float(), context=cond[0][0])
    return out, sched.get_velocity(x0, noise, tt)


def test_sd2_v_loss_is_the_velocity_mse(comfy, bundle, tmp_path):
    from comfy.model_sampling import V_PREDICTION

    model, clip, _ = bundle
    loop = comfy.engine("train.loop")
    assert isinstance(model.model.model_sampling, V_PREDICTION)  # ComfyUI's own detection
    (cond,) = comfy.nodes.CLIPTextEncode().encode(comfy.engine("te.align").align_clip(clip, "sd2x"), "ohwx, a circle")
    trainer = loop.Trainer(_run(comfy, model, cond, tmp_path))
    try:
        for t in (100, 700):
            g = torch.Generator().manual_seed(t)
            x0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
            sigma = trainer.ms.sigmas[t].reshape(1)  # ComfyUI's sigma of discrete timestep t
            with torch.no_grad():  # adapters start at zero: the base model
                loss = trainer.predict_loss(x0, noise, sigma, [cond])
                pred, target = trainer.predict(x0, noise, sigma, [cond])
            out, v = _reference(model, cond, x0, noise, t)
            assert torch.allclose(target, v, atol=1e-5), (t, (target - v).abs().max())
            assert torch.allclose(pred, out, atol=1e-5), (t, (pred - out).abs().max())
            assert loss.item() == pytest.approx(((out - v) ** 2).mean().item(), rel=1e-4), t
            assert not torch.allclose(target, noise, atol=1e-2), t  # velocity, not the noise (an eps target)
    finally:
        trainer.release()


def test_sd2_v_trains_and_maps(comfy, bundle, tmp_path):
    model, clip, _ = bundle
    loop, export = comfy.engine("train.loop"), comfy.engine("train.export")
    (cond,) = comfy.nodes.CLIPTextEncode().encode(comfy.engine("te.align").align_clip(clip, "sd2x"), "ohwx, a circle")
    out = loop.train_steps(_run(comfy, model, cond, tmp_path), 2, val_every=2)
    losses = [h["loss"] for h in out.history] + [out.history[-1]["val_loss"]]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert any(v.abs().sum() > 0 for k, v in out.state["adapters"].items() if "lora_up" in k)
    assert export.unmapped_keys(model, export.kohya_state_dict(out)) == []
    # resume is exact: 1 step, a checkpoint, a new Train Init from it, 1 more == the 2 straight steps bit for bit
    loop.train_steps(_run(comfy, model, cond, tmp_path, "half"), 1, val_every=2, checkpoint_every=1)
    resumed = loop.train_steps(_run(comfy, model, cond, tmp_path, "half", "latest"), 1, val_every=2)
    assert resumed.step == 2 and [h["loss"] for h in resumed.history] == [h["loss"] for h in out.history]
    assert all(torch.equal(v, resumed.state["adapters"][k]) for k, v in out.state["adapters"].items())


def test_sd2_v_set_by_model_sampling_node(comfy, tmp_path):
    """An SD2 v checkpoint ComfyUI detects as eps is run through its ``ModelSamplingDiscrete`` node
    (sampling v_prediction), an object patch on the MODEL: the trainer must train that model's velocity too."""
    from comfy.model_sampling import EPS

    eps_model = sd2.build_model(v_prediction=False)
    assert isinstance(eps_model.model.model_sampling, EPS)
    (model,) = comfy.node("ModelSamplingDiscrete")().patch(eps_model, "v_prediction", False)
    loop = comfy.engine("train.loop")
    cond = [[torch.randn(1, 77, sd2.UNET["context_dim"], generator=torch.Generator().manual_seed(3)), {}]]
    trainer = loop.Trainer(_run(comfy, model, cond, tmp_path))
    try:
        trainer.load()  # as train_steps does: ComfyUI's loader applies the node's object patch to the model
        g = torch.Generator().manual_seed(5)
        x0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
        with torch.no_grad():
            pred, target = trainer.predict(x0, noise, trainer.ms.sigmas[400].reshape(1), [cond])
    finally:
        trainer.release()
    out, v = _reference(model, cond, x0, noise, 400)
    assert torch.allclose(target, v, atol=1e-5), (target - v).abs().max()
    assert torch.allclose(pred, out, atol=1e-5), (pred - out).abs().max()
