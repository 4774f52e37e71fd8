"""The memory plan: Train Init's estimate of the training peak on the device, compared with what the device
has free, before anything trains.

peak = base weights on the device (by dtype as loaded, or quantized; offloaded blocks count as the two in flight)
     + adapters (fp32 parameters) and optimizer state (+ EMA)
     + activations and gradients of one step.

The last term is measured, not guessed, when it matters (a budget set by hand, or ComfyUI's rough estimate above
half the budget): a probe runs the trainer's own forward and backward (same hooks,
precision and checkpointing, the largest sample's reference latents for image-edit runs) at batch 1 on three small
latents cut from the largest bucket, counts the live bytes of every tensor the step allocates
(:class:`LiveBytes`), and extrapolates in latent area (a quadratic term where the probes show attention scores held
in memory: :func:`fit`) and linearly in batch (a slider with an anchor back-propagates the target and the anchor
prompt in one forward of twice the batch: :func:`grad_batch`; the extra latent adds the per-pixel part only).
Models above ``PROBE_MAX_PARAMS`` on a
CPU are not probed (a forward there takes minutes); they use ComfyUI's inference estimate times 3 (1 with
checkpointing), as the loader did before, and the plan says so.

A plan that does not fit is refused with a message listing settings that would fit. The budget is the device's
free memory (``comfy.model_management.get_free_memory``) plus what loaded models hold there (ComfyUI evicts them
to load ours; on the CPU only this model's share), or
``memory_budget_gb`` when set (or the environment variable ``ALIGNED_TRAINER_MEMORY_BUDGET_GB``)."""
from __future__ import annotations

import dataclasses
import math
import os
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import offload, quantize
from ..data.types import with_reference
from .config import ConfigError

GiB = 1024 ** 3
PROBE_AREA = 256          # latent pixels of the larger probe (16 x 16)
PROBE_MAX_PARAMS = 400e6  # larger models are not probed on a CPU
OPT_SLOTS = {"adamw": 2, "adamw8bit": 0.5, "prodigy": 4, "adafactor": 0.1, "lion": 1}
ENV_BUDGET = "ALIGNED_TRAINER_MEMORY_BUDGET_GB"
TIGHT = 0.5               # probe when ComfyUI's rough estimate is above this share of the budget


class MemoryError_(ConfigError):
    """A plan that does not fit the device (a ConfigError: raised by Train Init before training)."""


class LiveBytes(TorchDispatchMode):
    """Live bytes of the tensors created by torch ops inside the mode (each storage counted once, released when
    it is freed) and their peak. Thread-local: the CPU autograd engine runs backward on the calling thread."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, n: int) -> None:
        self._seen.discard(key)
        self.current -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if type(t) is torch.Tensor and t.device.type != "meta":
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self._seen:
                    self._seen.add(key)
                    n = st.nbytes()
                    self.current += n
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(st, self._free, key, n)
        return out


@dataclass(frozen=True)
class Activations:
    """Bytes of one step's activations and gradients: ``batch * (fixed + per_pixel * A + quad * A**2)`` for a
    latent area ``A``. ``quad``: attention that materialises its token-by-token scores (every token of the image,
    its reference images and the text); 0 where attention streams them (flash / memory-efficient kernels)."""
    fixed: float
    per_pixel: float
    probed: bool
    quad: float = 0.0

    def per_element(self, area: float) -> float:
        return self.per_pixel * area + self.quad * area * area

    def at(self, batch: int, area: int) -> int:
        return int(batch * max(self.fixed + self.per_element(area), 0.0))


@dataclass(frozen=True)
class Plan:
    weights: int
    adapters: int
    activations: int
    budget: int
    device: str
    settings: dict
    probed: bool
    load: int = 0  # the load's peak (load_bytes)

    @property
    def total(self) -> int:
        return max(self.weights + self.adapters + self.activations, self.load)

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def text(self) -> str:
        s = self.settings
        g = lambda b: f"{b / GiB:.3f} GiB" if b < 10 * GiB else f"{b / GiB:.1f} GiB"  # noqa: E731
        return (f"memory plan on {self.device}: peak {g(self.total)} of {g(self.budget)} "
                f"({'fits' if self.fits else 'does NOT fit'}) = weights {g(self.weights)} + adapters/optimizer "
                f"{g(self.adapters)} + activations {g(self.activations)}"
                f"{'' if self.probed else ' (not probed: ComfyUI inference estimate)'}; "
                + describe(s)
                + (f"; loading the model ({g(self.load)}) is the peak: offload_blocks acts after the load, "
                   "quantize or fp8 loading lower it" if self.load > self.weights + self.adapters + self.activations
                   else ""))


def describe(s: dict) -> str:
    return (f"precision {s['precision']}, quantize {s['quantize']}, offload_blocks {s['offload_blocks']}, "
            f"gradient_checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, batch_size "
            f"{s['batch_size']}, resolution {s['resolution']}")


def forced_budget(settings) -> float:
    return settings.memory_budget_gb or float(os.environ.get(ENV_BUDGET, 0) or 0)


def budget_bytes(settings, patcher, device) -> int:
    gb = forced_budget(settings)
    if gb > 0:
        return int(gb * GiB)
    import comfy.model_management as mm

    if torch.device(device).type == "cpu":
        held = patcher.loaded_size() if hasattr(patcher, "loaded_size") else 0
        return int(mm.get_free_memory(device)) + int(held)
    # on an accelerator ComfyUI evicts the other loaded models to load ours: what they hold counts as free
    held, seen = 0, set()
    for lm in list(mm.current_loaded_models):
        m = lm.model
        if m is not None and torch.device(lm.device) == torch.device(device) and id(m.model) not in seen:
            seen.add(id(m.model))
            held += int(lm.model_loaded_memory())
    return int(mm.get_free_memory(device)) + held


def weight_bytes(dm: torch.nn.Module, mode: str, offload_n: int, same_device: bool) -> int:
    """Bytes of the base weights on the training device. Quantized: packed values + scales (and the originals,
    when the offload device is the training device); offloaded units: two in flight instead of all."""
    from .loop import checkpoint_units

    total = sum(t.numel() * t.element_size() for t in dm.parameters()) + \
        sum(b.numel() * b.element_size() for b in dm.buffers())
    qsize = {}
    if mode != "none":
        for m in dm.modules():
            if quantize.eligible(m):
                w = m.weight
                q = quantize.quantized_bytes(w.numel(), w.shape[0], w.shape[1], mode)
                qsize[id(m)] = q
                total += q - (0 if same_device else w.numel() * w.element_size())
    if offload_n:
        units = offload.units(checkpoint_units(dm))[-offload_n:]
        sizes = []
        for u in units:
            b = 0
            for m in u.modules():
                for name, p in m._parameters.items():
                    if p is None:
                        continue
                    b += qsize[id(m)] if (name == "weight" and id(m) in qsize) else p.numel() * p.element_size()
            sizes.append(b)
        in_flight = sum(sorted(sizes)[-2:])
        total += in_flight if same_device else in_flight - sum(sizes)
    return int(total)


def load_bytes(dm: torch.nn.Module, mode: str, same_device: bool) -> int:
    """The load's peak on the training device: ComfyUI loads the model in full (offloaded blocks leave after the
    load), except the layers quantized around the load (placement.py), whose full weights reach the device one
    at a time."""
    if mode == "none":
        return weight_bytes(dm, "none", 0, True)
    largest = max((m.weight.numel() * m.weight.element_size() for m in dm.modules() if quantize.eligible(m)), default=0)
    return weight_bytes(dm, mode, 0, same_device) + largest


def adapter_bytes(trainer) -> int:
    n = sum(p.numel() for p in trainer.params)
    slots = 1 + OPT_SLOTS.get(trainer.run.optimizer.name, 2) + (1 if trainer.ema is not None else 0)
    return int(n * 4 * slots)


def _probe_shapes(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Three probe shapes cut from a latent's (C, [frames,] H, W): the frame count kept, the area reduced (the
    first to at most ``PROBE_AREA`` at the latent's aspect, then its width halved and quartered)."""
    lead, h, w = tuple(shape[:-2]), shape[-2], shape[-1]
    f = max(1.0, math.sqrt(h * w / PROBE_AREA))
    ph, pw = max(2, int(h / f) // 2 * 2), max(4, int(w / f) // 2 * 2)
    return [(*lead, ph, pw), (*lead, ph, max(2, pw // 2 // 2 * 2)), (*lead, ph, max(2, pw // 4 // 2 * 2))]


def fit(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """``(fixed, per_pixel, quad)`` of ``fixed + per_pixel * A + quad * A**2`` through the probes' ``(area, peak)``
    points (largest area first): exact through three distinct areas when the curvature is upward (attention
    scores held in memory), else the line through the two largest (the peak then grows linearly, or a probe too
    small to tell: curvature is never extrapolated downward)."""
    pts = sorted({a: m for a, m in points}.items(), reverse=True)
    if len(pts) >= 3:
        (a1, m1), (a2, m2), (a3, m3) = pts[:3]
        s12, s23 = (m1 - m2) / (a1 - a2), (m2 - m3) / (a2 - a3)
        quad = (s12 - s23) / (a1 - a3)
        if quad > 0:
            per = s12 - quad * (a1 + a2)
            return m1 - per * a1 - quad * a1 * a1, per, quad
    if len(pts) >= 2:
        (a1, m1), (a2, m2) = pts[:2]
        per = (m1 - m2) / (a1 - a2)
        return m1 - per * a1, per, 0.0
    (a1, m1), = pts
    return 0.0, m1 / a1, 0.0


def inference_bytes(patcher, shape, sample=None) -> float:
    """ComfyUI's inference estimate for a batch of latents of ``shape`` (batch first) whose every element carries
    ``sample``'s control latents as reference latents: the model's ``memory_required`` with the cond shapes its own
    ``extra_conds_shapes`` gives them, as ComfyUI's sampler asks it (``sampler_helpers``). Each reference adds its
    image tokens to the transformer's sequence (FLUX Kontext, FLUX.2, Qwen-Image-Edit)."""
    model = patcher.model
    refs = list(getattr(sample, "control_latents", ()) or ())
    if not refs:
        return model.memory_required(list(shape))
    extra = model.extra_conds_shapes(reference_latents=[r[None] for r in refs])
    return model.memory_required(list(shape), cond_shapes={k: [v] * int(shape[0]) for k, v in extra.items()})


def biggest_sample(trainer):
    """The training sample of the largest latent (with its control latents, if any)."""
    return max(trainer.samples, key=lambda smp: smp.latent.numel()
               + sum(c.numel() for c in (getattr(smp, "control_latents", ()) or ())))


def comfy_estimate(trainer, shape: tuple[int, ...]) -> Activations:
    """ComfyUI's inference estimate for the shape (and the largest sample's reference latents), x3 (x1 with
    checkpointing): what the loader used before."""
    acts = inference_bytes(trainer.patcher, [1, *shape], biggest_sample(trainer))
    acts *= 1 if trainer.run.settings.gradient_checkpointing else 3
    return Activations(0.0, acts / max(1, shape[-1] * shape[-2]), False)


def probe(trainer, shape: tuple[int, ...]) -> Activations:
    """Activation bytes per step from three probes (see the module's doc)."""
    from .loop import checkpointed_blocks

    dm = trainer.patcher.model.diffusion_model
    s = trainer.run.settings
    n_params = sum(p.numel() for p in dm.parameters())
    where = {p.device for p in dm.parameters()}
    if (n_params > PROBE_MAX_PARAMS and trainer.device.type == "cpu") or where != {torch.device(trainer.device)}:
        return comfy_estimate(trainer, shape)
    sample = biggest_sample(trainer)
    cond = sample.captions[0].conditioning
    n_refs = len(getattr(sample, "control_latents", ()) or ())
    points = []
    g = torch.Generator().manual_seed(0)
    rng = (trainer.gen.get_state(), trainer.py_rng.getstate())
    from .loop import freeze_base, unfreeze_inference_tensors

    with torch.inference_mode(False), torch.enable_grad():
        unfreeze_inference_tensors(dm)  # as Trainer.load does: weights read under inference mode cannot join autograd
        freeze_base(dm)
        for shp in _probe_shapes(shape):
            x0 = torch.randn((1, *shp), generator=g).to(trainer.device)
            noise = torch.randn((1, *shp), generator=g).to(trainer.device)
            sigma = torch.tensor([float(trainer.ms.percent_to_sigma(0.5))], device=trainer.device)
            # control latents come at the target's geometry (data/dataset.py): the probe's references too
            refs = [torch.randn(shp, generator=g).to(trainer.device) for _ in range(n_refs)]
            c = with_reference(cond, dataclasses.replace(sample, control_latents=tuple(refs))) if refs else cond
            for attempt in (0, 1):
                meter = LiveBytes()
                try:
                    with trainer.hooked(), checkpointed_blocks(dm, s.gradient_checkpointing,
                                                               lambda: trainer.clone_saved), \
                            trainer._saved_tensor_mode(), meter:
                        loss = trainer.predict_loss(x0, noise, sigma, [c]).mean()
                        loss.backward()
                    break
                except RuntimeError as e:  # FLUX: in-place changes of saved tensors, as Trainer.backward retries
                    if attempt or trainer.clone_saved or "modified by an inplace operation" not in str(e):
                        raise
                    trainer.clone_saved = True
                finally:
                    for p in trainer.params:
                        p.grad = None
            points.append((shp[-1] * shp[-2], meter.peak))
    trainer.gen.set_state(rng[0])
    trainer.py_rng.setstate(rng[1])
    fixed, per, quad = fit(points)
    return Activations(fixed, per, True, quad)


def plan(trainer, settings=None, acts: Activations | None = None) -> tuple[Plan, Activations]:
    """The plan for ``trainer`` (or for ``settings`` instead of its own, reusing the probe ``acts`` scaled by
    precision and checkpointing where they differ from the probed run)."""
    s0 = trainer.run.settings
    s = settings or s0
    dm = trainer.patcher.model.diffusion_model
    biggest = biggest_sample(trainer)
    largest = biggest.latent.shape
    if acts is None:  # probe only when the budget is tight or set by hand (a probe costs a few steps' time)
        acts = comfy_estimate(trainer, tuple(largest))
        rough, _ = plan(trainer, settings, acts)
        if forced_budget(s0) or rough.total > TIGHT * rough.budget:
            acts = probe(trainer, tuple(largest))
    area = largest[-1] * largest[-2] * s.area_scale if hasattr(s, "area_scale") else largest[-1] * largest[-2]
    a = acts.at(s.batch_size, int(area))
    # latents an objective back-propagates beside each batch element's (a slider's anchor) add their per-pixel part;
    # the probe's intercept (weight casts and buffers of the step, whatever the batch) is not repeated
    a += int((grad_batch(trainer) - 1) * s.batch_size * max(acts.per_element(area), 0.0))
    a = int(a * _factor(s) / _factor(s0))
    same = trainer.device == torch.device(trainer.patcher.offload_device)
    p = Plan(weight_bytes(dm, s.quantize, s.offload_blocks, same), adapter_bytes(trainer), a,
             budget_bytes(s0, trainer.patcher, trainer.device), str(trainer.device),
             {"precision": s.precision, "quantize": s.quantize, "offload_blocks": s.offload_blocks,
              "gradient_checkpointing": s.gradient_checkpointing, "batch_size": s.batch_size,
              "resolution": _resolution(biggest, getattr(s, "area_scale", 1.0))}, acts.probed,
             load_bytes(dm, s.quantize, same))
    return p, acts


def grad_batch(trainer) -> int:
    """Latents in each forward that back-propagates, per batch element: 1 for dataset training; an objective that
    batches more (a slider's anchor prompt beside its target, train/slider.py) says how many."""
    objective = getattr(trainer, "objective", None)
    return int(getattr(objective, "grad_batch", 1)) if objective is not None else 1


def _factor(s) -> float:
    """Relative activation size of a setting against fp32 without checkpointing (used only for the
    alternatives listed in a refusal; the plan itself is probed with the run's own settings)."""
    f = 0.55 if s.precision in ("bf16", "fp16") else 1.0
    return f * (0.35 if s.gradient_checkpointing else 1.0)


def _resolution(sample, area_scale: float) -> str:
    """The pixel size of ``sample`` (the largest one): its bucket, the size the dataset encoded through the model's
    VAE, so the VAE's own spatial compression is in it (SD/FLUX 8x, the Wan 2.2 TI2V 5B's 16x: the latents' size
    times a fixed 8 showed half the 5B's pixels); a sample made without a bucket gives its latent size, named so.
    ``area_scale`` scales the area (the alternatives' quarter resolution)."""
    k = math.sqrt(area_scale)
    w, h = sample.bucket
    if w > 0 and h > 0:
        return f"{int(w * k)}x{int(h * k)}"
    lh, lw = sample.latent.shape[-2:]
    return f"{int(lw * k)}x{int(lh * k)} latent"


@dataclass(frozen=True)
class _Alt:
    precision: str
    quantize: str
    offload_blocks: int
    gradient_checkpointing: bool
    batch_size: int
    area_scale: float = 1.0


def alternatives(trainer, acts: Activations) -> list[Plan]:
    """Settings that would fit, one change at a time and then cumulatively (cheapest in quality first)."""
    s = trainer.run.settings
    from .loop import checkpoint_units

    n_units = len(offload.units(checkpoint_units(trainer.patcher.model.diffusion_model)))
    base = _Alt(s.precision, s.quantize, s.offload_blocks, s.gradient_checkpointing, s.batch_size)
    steps = [dict(gradient_checkpointing=True), dict(precision="bf16"), dict(batch_size=1), dict(quantize="int8"),
             dict(offload_blocks=max(1, n_units // 2)), dict(quantize="int4"),
             dict(offload_blocks=max(1, n_units - 2)), dict(area_scale=0.25)]
    out, seen, cum = [], set(), base
    for change in steps:
        for cand in (dataclasses.replace(base, **change), dataclasses.replace(cum, **change)):
            if cand in seen or cand == base:
                continue
            seen.add(cand)
            p, _ = plan(trainer, cand, acts)
            if p.fits:
                out.append(p)
        cum = dataclasses.replace(cum, **change)
    out.sort(key=lambda p: p.total)
    return out[:4]


def check(trainer) -> Plan:
    """The run's plan; raises :class:`MemoryError_` with settings that would fit when it does not."""
    p, acts = plan(trainer)
    if p.fits:
        return p
    alts = alternatives(trainer, acts)
    fix = ("; ".join(f"{describe(a.settings)} (peak {a.total / GiB:.3f} GiB)" for a in alts) if alts else
           "none of precision bf16, checkpointing, quantize int8/int4, offload_blocks, batch 1 or a quarter of "
           "the resolution fits; load the model in fp8 (UNETLoader weight_dtype fp8_e4m3fn), free memory (close "
           "other models) or use a larger device")
    raise MemoryError_(f"this training plan needs about {p.total / GiB:.3f} GiB on {p.device} but "
                       f"{p.budget / GiB:.3f} GiB is available ({p.text()}). Settings that would fit: {fix}. "
                       f"(memory_budget_gb / {ENV_BUDGET} set the budget by hand)")
