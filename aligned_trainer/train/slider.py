"""Concept sliders (LECO / Concept Sliders): a LoRA trained from prompts alone, no dataset.

The prompts: ``target`` (what the slider acts on, e.g. "a person"), ``positive`` and ``negative`` (the two ends,
e.g. "a smiling person" / "a frowning person") and an optional ``anchor`` (a prompt whose prediction must not
change, e.g. "a photo"). At a noisy latent ``x`` (made by a few denoising steps of the frozen base from pure noise
toward a drawn noise level, guided by the target prompt), the base model with the adapter off (no gradient) gives
``e(target)``, ``e(positive)``, ``e(negative)`` and ``e(anchor)`` in the model's own parametrisation (eps, v or flow
velocity). The adapter at ``+strength`` is trained so that, conditioned on the target prompt, it predicts

    e(target) + guidance_scale * (e(positive) - e(negative))

and at ``-strength`` the mirror ``e(target) - guidance_scale * (e(positive) - e(negative))``; with an anchor, the
adapter at either strength also predicts ``e(anchor)`` for the anchor prompt (weighted by ``anchor_weight``).

The prompts are encoded once, by the CLIP the slider node is given (the aligned encoders, read literally as
captions are), into a :class:`~aligned_trainer.data.types.TrainingSet` of one latent-shaped placeholder sample
(its shape is the resolution; the memory plan reads it) that carries the :class:`Slider` in ``meta['slider']``.
Train Init, Train Steps, checkpoints, resume and Save LoRA are the ordinary engine's: the loop calls
:func:`objective` once per trainer and, when it returns one, its ``micro_batch`` and ``validation_loss``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass

import torch

from ..data.types import CaptionVariant, Sample, TrainingSet
from . import timesteps as ts
from .config import ConfigError, check_finite

FORMAT = "aligned_trainer.slider.v1"


@dataclass(frozen=True)
class SliderConfig:
    target: str
    positive: str
    negative: str
    anchor: str = ""                 # empty: no anchor loss
    guidance_scale: float = 1.0      # how far each end lies from the target (LECO/ai-toolkit guidance)
    anchor_weight: float = 1.0
    strength: float = 1.0            # LoRA multiplier at which the positive end is trained (negative end at -strength)
    bidirectional: bool = True       # also train the negative end at -strength
    width: int = 512
    height: int = 512
    denoise_steps: int = 4           # base-model Euler steps from pure noise to the drawn noise level (0: pure noise)
    denoise_cfg: float = 3.0         # CFG of those steps (target vs empty prompt); 1 for guidance-distilled models

    def validate(self) -> None:
        check_finite(self)
        if not self.target.strip() and not self.positive.strip():
            raise ConfigError("slider: target and positive are both empty; write the concept to act on in target "
                              "(e.g. 'a person') and the direction in positive/negative")
        if self.positive == self.negative:
            raise ConfigError(f"slider: positive and negative are the same prompt ({self.positive!r}); the slider "
                              "learns their difference: make them the two ends (e.g. 'a smiling person' / "
                              "'a frowning person')")
        if self.strength <= 0:
            raise ConfigError(f"slider strength must be > 0 (got {self.strength}); 1.0 is usual")
        if self.anchor_weight < 0:
            raise ConfigError(f"slider anchor_weight must be >= 0 (got {self.anchor_weight})")
        if not 0 <= self.denoise_steps <= 1000:
            raise ConfigError(f"slider denoise_steps must be in 0..1000 (got {self.denoise_steps}); 4-10 is usual")
        if self.denoise_cfg < 0:
            raise ConfigError(f"slider denoise_cfg must be >= 0 (got {self.denoise_cfg})")
        if self.width < 8 or self.height < 8 or self.width % 8 or self.height % 8:
            raise ConfigError(f"slider resolution {self.width}x{self.height} must be multiples of 8 (>= 8)")

    def record(self) -> dict:
        return {"format": FORMAT, **asdict(self)}


@dataclass(frozen=True)
class Slider:
    """The config and the prompts' CONDITIONING (encoded once, by the slider node's CLIP)."""
    config: SliderConfig
    target: list
    positive: list
    negative: list
    anchor: list | None
    empty: list                      # the empty prompt: the unconditional side of the denoising steps' CFG
    clip_id: str = ""

    def record(self) -> dict:
        return {**self.config.record(), "clip_id": self.clip_id}


def prompt_set(config: SliderConfig, model, clip, unload: bool = True) -> TrainingSet:
    """The prompts-only training set the slider node hands to Train Init: the prompts encoded by ``clip`` as
    Cache Text Embeddings encodes captions (an aligned CLIP reads them literally), the latent shape from ``model``
    at the config's resolution. The text encoder leaves memory afterwards (``unload``), as after caching."""
    import comfy.sample

    from ..data import cache

    if hasattr(clip, "training_clip"):  # an aligned CLIP: prompts are read literally, as captions are
        clip = clip.training_clip()

    def encode(text: str) -> list:
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    clip_id = cache.clip_identity(clip)
    config.validate()
    lf = model.get_model_object("latent_format")
    if getattr(lf, "latent_dimensions", 2) != 2:
        raise ConfigError("sliders train image models; this model's latents are video-shaped (Wan): use an image "
                          "model (SD1.x/SD2.x/SDXL/SD3/FLUX)")
    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros([1, 4, config.height // 8, config.width // 8]))[0]
    conds = {k: encode(getattr(config, k)) for k in ("target", "positive", "negative")}
    anchor = encode(config.anchor) if config.anchor.strip() else None
    slider = Slider(config, conds["target"], conds["positive"], conds["negative"], anchor, encode(""), clip_id)
    if unload:
        cache.unload_text_encoder(clip)
    digest = hashlib.sha256(json.dumps(slider.record(), sort_keys=True).encode()).hexdigest()[:16]
    sample = Sample(key=f"slider:{digest}", latent=latent, captions=(CaptionVariant(config.target, conds["target"]),),
                    bucket=(config.width, config.height))
    spec = getattr(clip, "spec", None)
    meta = {"slider": slider, "dataset_hash": f"slider:{digest}", "clip_id": clip_id,
            "prompt_syntax": getattr(clip, "prompt_syntax", "comfyui"),
            "report": {"images": 0, "slider": slider.record()}}
    return TrainingSet((sample,), empty_conditioning=slider.empty, te_spec_id=getattr(spec, "key", None), meta=meta)


def of(training_set) -> Slider | None:
    return (getattr(training_set, "meta", None) or {}).get("slider")


def objective(trainer) -> "SliderObjective | None":
    """The slider objective for a trainer whose training set is a slider's, else None. Sliders scale the
    adapter's output by +/- strength, which the activation-side LoRA/LoCon adapters do; others are refused."""
    slider = of(trainer.run.training_set)
    if slider is None:
        return None
    weight_side = [n for n, a in trainer.adapters.items() if not a.kind]
    if weight_side:
        raise ConfigError(f"sliders train lora/locon without DoRA on linear and plain convolution layers (the "
                          f"adapter's output is scaled by +/- strength); {len(weight_side)} target layer(s) (e.g. "
                          f"'{weight_side[0]}') would be weight patches: set LoRA Config algorithm to lora, dora off, "
                          "or exclude those layers")
    if trainer.run.preservation is not None:
        raise ConfigError("differential output preservation (dop_weight, preservation_prompt) is a dataset-training "
                          "loss; a slider keeps a prompt unchanged with its anchor: set dop_weight to 0 and write the "
                          "prompt in Slider Prompts' anchor")
    if trainer.run.settings.processes > 1:
        raise ConfigError(f"sliders train in ComfyUI's own process (processes {trainer.run.settings.processes} "
                          "asked): data-parallel workers shard dataset micro-batches, and a slider has none; set "
                          "Train Init processes to 1")
    return SliderObjective(slider)


@contextlib.contextmanager
def multiplier(adapters: dict, m: float):
    """Every adapter's output scaled by ``m`` inside (restored on exit)."""
    old = {n: a.scale for n, a in adapters.items()}
    try:
        for n, a in adapters.items():
            a.scale = old[n] * m
        yield
    finally:
        for n, a in adapters.items():
            a.scale = old[n]


@contextlib.contextmanager
def base_model(adapters: dict):
    """The frozen base: every adapter off inside."""
    for a in adapters.values():
        a.enabled = False
    try:
        yield
    finally:
        for a in adapters.values():
            a.enabled = True


class SliderObjective:
    def __init__(self, slider: Slider):
        self.slider = slider
        self.cfg = slider.config
        # the anchor prompt's prediction is trained beside the target's, in one forward of twice the batch
        self.anchored = slider.anchor is not None and self.cfg.anchor_weight > 0
        self.grad_batch = 2 if self.anchored else 1  # latents per back-propagated forward (the memory plan reads it)

    # -- latents ------------------------------------------------------------------------------------------
    @staticmethod
    def predict(trainer, x: torch.Tensor, sigma: torch.Tensor, conds: list[list], denoised: bool = False) -> list:
        """The model's outputs at ``x`` for each CONDITIONING in ``conds``, in one batched forward (the batch is
        ``x`` repeated once per conditioning); a list of ``len(conds)`` tensors shaped like ``x``."""
        n = x.shape[0]
        xs, ss = torch.cat([x] * len(conds)), torch.cat([sigma] * len(conds))
        per = [c for c in conds for _ in range(n)]
        out = (trainer.denoised_at if denoised else trainer.predict_at)(xs, ss, per)
        return list(out.split(n))

    @torch.no_grad()
    def noisy_latent(self, trainer, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``x`` at ``sigma``: from pure noise at the model's largest sigma, ``denoise_steps`` Euler steps of the base
        model (target prompt, CFG ``denoise_cfg`` against the empty prompt) down to ``sigma`` (per sample)."""
        ms = trainer.ms
        shape = (-1, *[1] * (noise.ndim - 1))
        k = self.cfg.denoise_steps
        if k == 0:
            return ms.noise_scaling(sigma.view(shape), noise, torch.zeros_like(noise))
        top = torch.full_like(sigma, float(ms.sigma_max))
        x = ms.noise_scaling(top.view(shape), noise, torch.zeros_like(noise), max_denoise=True)
        guided = self.cfg.denoise_cfg != 1.0
        with base_model(trainer.adapters):
            for i in range(k):
                s0 = top + (sigma - top) * (i / k)
                s1 = top + (sigma - top) * ((i + 1) / k)
                outs = self.predict(trainer, x, s0, [self.slider.target, self.slider.empty] if guided
                                    else [self.slider.target], denoised=True)
                den = outs[1] + self.cfg.denoise_cfg * (outs[0] - outs[1]) if guided else outs[0]
                x = x + (x - den) / s0.view(shape) * (s1 - s0).view(shape)
        return x

    # -- loss ---------------------------------------------------------------------------------------------
    def loss(self, trainer, x: torch.Tensor, sigma: torch.Tensor, backward: float = 0.0) -> float:
        """The slider loss at ``x``/``sigma``; with ``backward`` > 0 each direction's loss times it is
        back-propagated as soon as it is computed (one direction's activations alive at a time)."""
        sl = self.slider
        anchored = self.anchored
        with torch.no_grad(), base_model(trainer.adapters):
            base = self.predict(trainer, x, sigma, [sl.target, sl.positive, sl.negative] + ([sl.anchor] if anchored
                                                                                              else []))
        e_t, diff = base[0], base[1] - base[2]
        signs = (1.0, -1.0) if self.cfg.bidirectional else (1.0,)
        total = 0.0
        for sign in signs:
            goal = e_t + sign * self.cfg.guidance_scale * diff
            # backward inside the scope too: gradient checkpointing recomputes the forward there
            with multiplier(trainer.adapters, sign * self.cfg.strength):
                pred = self.predict(trainer, x, sigma, [sl.target, sl.anchor] if anchored else [sl.target])
                part = ((pred[0] - goal) ** 2).mean()
                if anchored:
                    part = part + self.cfg.anchor_weight * ((pred[1] - base[3]) ** 2).mean()
                part = part / len(signs)
                if backward:
                    trainer.scaler.scale(part * backward).backward()
            total += float(part.detach())
        return total

    def micro_batch(self, trainer) -> float:
        """One micro-batch of ``batch_size`` noisy latents (noise and noise levels from the run's generator and
        Timestep Strategy density/shift), loss back-propagated; returns the loss divided by ``grad_accum``."""
        s = trainer.run.settings
        shape = (s.batch_size, *trainer.samples[0].latent.shape)
        like = torch.zeros(shape)
        noise = ts.training_noise(trainer.run.timesteps, like, trainer.gen)
        u = ts.sample_u(trainer.run.timesteps, s.batch_size, trainer.gen)
        sigma = ts.sigmas_for(trainer.run.timesteps, trainer.ms, u, shape, trainer.shift_rule)
        noise, sigma = noise.to(trainer.device), sigma.to(trainer.device)
        x = self.noisy_latent(trainer, noise, sigma)
        return self.loss(trainer, x, sigma, backward=1.0 / s.grad_accum) / s.grad_accum

    @torch.no_grad()
    def validation_loss(self, trainer) -> float:
        """The slider loss at fixed noise (seed 12345) and ``val_timesteps`` fixed noise levels (comparable across
        steps and runs)."""
        g = torch.Generator().manual_seed(12345)
        shape = (1, *trainer.samples[0].latent.shape)
        losses = []
        for u in torch.linspace(0.1, 0.9, trainer.run.settings.val_timesteps):
            noise = torch.randn(shape, generator=g).to(trainer.device)
            sigma = torch.tensor([float(trainer.ms.percent_to_sigma(1.0 - float(u)))], device=trainer.device)
            losses.append(self.loss(trainer, self.noisy_latent(trainer, noise, sigma), sigma))
        return sum(losses) / len(losses)


def metadata(run) -> dict[str, str]:
    """Save LoRA's record of a slider run (empty for other runs): the prompts and settings."""
    slider = of(run.training_set)
    return {"aligned_trainer.slider": json.dumps(slider.record())} if slider is not None else {}


def check_resume(config: dict, training_set) -> None:
    """A checkpoint of a slider run continues only with the same prompts and settings, and a slider run only
    from a slider checkpoint (and the other way round)."""
    from .state import CheckpointError

    was = (config or {}).get("slider")
    slider = of(training_set)
    now = slider.config.record() if slider is not None else None
    if was is None and now is None:
        return
    if was is None or now is None:
        raise CheckpointError("this checkpoint belongs to a " + ("dataset" if was is None else "slider") + " run and "
                              "this run is a " + ("slider" if was is None else "dataset") + " run: resume it with "
                              "the same kind of training set, or set resume to 'none'")
    changed = sorted(k for k in now if was.get(k) != now[k])
    if changed:
        raise CheckpointError(f"this checkpoint's slider was trained with other settings ({', '.join(changed)}: "
                              f"{', '.join(repr(was.get(k)) for k in changed)}): set them back to resume, or set "
                              "resume to 'none'")
