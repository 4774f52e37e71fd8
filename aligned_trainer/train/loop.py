"""The training loop. ``init_run`` validates everything and returns a fresh :class:`TrainRun`;
``train_steps`` rebuilds a live trainer from a run's state, runs K optimizer steps and returns a NEW run
(the input run is never changed, so re-queueing the same graph repeats the same K steps from the same
state; chain Train Steps nodes, or resume from a checkpoint, to continue)."""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import comfy.model_management as mm
import comfy.sampler_helpers
import comfy.samplers
import torch
import torch.utils.checkpoint
from comfy.ldm.modules.diffusionmodules import openaimodel

from ..data.types import TrainingSet, with_reference
from ..te import specs
from . import adapters as ad
from . import attention, experts, lora_math, memory, placement, quantize, slider, speed, speed_channels_last, te_swap, text_mask
from . import resume as resume_mod
from . import state as st
from . import timesteps as ts
from .config import ConfigError, LoraConfig, OptimizerConfig, TimestepConfig
from .optim import build_ema, build_optimizer, build_scheduler, load_optimizer_state

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_PROCESSES = 64  # data-parallel workers on one machine (Train Init's ``processes``)


class NonFiniteLoss(RuntimeError):
    """A step's loss was NaN or infinite (a diverged run): its update is not applied."""


def default_runs_root() -> Path:
    import folder_paths

    return Path(folder_paths.get_output_directory()) / "aligned_trainer" / "runs"


def init_run(model, training_set: TrainingSet, lora: LoraConfig, timesteps: TimestepConfig,
             optimizer: OptimizerConfig, settings: st.RunSettings, resume: str = "none",
             runs_root: Path | None = None, preservation: list | None = None,
             if_exists: str = "new_name", init_lora: str | None = None) -> st.TrainRun:
    """Validate all settings (one clear error before any training) and create or resume a run.
    ``preservation``: CONDITIONING of the preservation prompt for differential output preservation.
    ``resume``: 'none', 'latest', a run name or a checkpoint file inside the runs folder; ``if_exists``: what to
    do when the run name already holds another run's checkpoints ('new_name', 'overwrite', 'resume'; see
    ``state.claim_run_dir``). ``init_lora``: a LoRA file (kohya, ai-toolkit, diffusers/peft) inside the loras
    folders that the run starts from (``interop.start_from``); ignored when resuming from a checkpoint."""
    for cfg in (lora, timesteps, optimizer):
        cfg.validate()
    timesteps = experts.resolve(timesteps, model)  # an expert's official boundary (Wan 2.2 A14B)
    if settings.batch_size < 1 or settings.grad_accum < 1:
        raise ConfigError("batch_size and grad_accum must be >= 1")
    if not 1 <= settings.processes <= MAX_PROCESSES:
        raise ConfigError(f"processes must be between 1 and {MAX_PROCESSES} (got {settings.processes}); 1 trains in "
                          "ComfyUI's own process")
    if settings.precision not in DTYPES:
        raise ConfigError(f"precision must be one of {tuple(DTYPES)}")
    if not 0.0 <= settings.ema_decay < 1.0:
        raise ConfigError("ema_decay must be in [0, 1) (0 turns EMA off)")
    st.check_run_name(settings.run_name)
    if settings.reg_weight < 0:
        raise ConfigError(f"reg_weight must be >= 0 (got {settings.reg_weight})")
    if settings.dop_weight < 0:
        raise ConfigError(f"dop_weight must be >= 0 (got {settings.dop_weight})")
    if settings.dop_weight > 0 and preservation is None:
        raise ConfigError("differential output preservation (dop_weight > 0) needs a preservation prompt: connect "
                          "its CONDITIONING (e.g. 'a photo of a person') to Train Init, or set dop_weight to 0")
    if len(training_set) == 0:
        raise ConfigError("the training set is empty")
    quantize.check(settings.quantize)
    speed.of(settings).validate()
    attention.check(settings.attention, mm.get_torch_device())
    lora_math.check(lora, settings)
    if settings.offload_blocks < 0 or settings.memory_budget_gb < 0:
        raise ConfigError("offload_blocks and memory_budget_gb must be >= 0")
    names = ad.target_layers(model.model.diffusion_model, lora)  # fails early on an incompatible preset
    if lora.network_dropout:  # and on layers it cannot act on, before any training
        modules = dict(model.model.diffusion_model.named_modules())
        ad.refuse_network_dropout_on_weights(lora, {n: ad.activation_kind(modules[n], lora) for n in names})
    te_spec = None
    if training_set.te_spec_id:
        te_spec = {"id": training_set.te_spec_id}
        try:
            te_spec = specs.get_spec(training_set.te_spec_id).identity()  # id, variant, hash
        except Exception:  # a spec file removed since caching: keep the id
            pass
    opened = resume_mod.open_run(Path(runs_root or default_runs_root()), settings.run_name, resume, if_exists,
                                 model, names + te_swap.extra_targets(model), lora, optimizer, te_spec)
    run_dir = opened.run_dir
    run = st.TrainRun(model=model, training_set=training_set, lora=lora, timesteps=timesteps, optimizer=optimizer,
                      settings=settings, run_dir=str(run_dir), te_spec=te_spec,
                      meta={"dataset_hash": training_set.meta.get("dataset_hash"), "started_at": time.time(),
                            "expert_note": experts.note(timesteps, model),
                            "speed_note": speed.note(settings, optimizer, model.model.diffusion_model)},
                      preservation=preservation if settings.dop_weight > 0 else None)
    if opened.checkpoint is not None:
        ck = opened.checkpoint
        slider.check_resume(ck.get("config"), training_set)
        run = run.advanced(step=ck["step"], state=ck["state"], history=ck["history"], checkpoints=opened.kept,
                           meta={**run.meta, "started_at": ck.get("started_at") or run.meta["started_at"],
                                 "resume_note": resume_mod.data_order_note(ck, settings)})
    elif (init_lora or "none").strip() != "none":  # spaces around a typed name or 'none' are ignored, as resume's
        from . import interop

        run = interop.start_from(run, init_lora.strip(), Trainer)
    with torch.inference_mode(False):
        probe = Trainer(run)
        try:
            run = run.advanced(meta={**run.meta, "memory_plan": memory.check(probe).text(),
                                     "lora_math_note": lora_math.note(probe)})
        finally:
            probe.release()
    for old in opened.replaced:  # if_exists 'overwrite', after every check has passed
        old.unlink(missing_ok=True)
    return run


def native(model_sampling, sigma: torch.Tensor, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The model output that ComfyUI's ``calculate_denoised`` maps to ``denoised`` (eps, v or flow velocity).
    calculate_denoised is affine in the output, so out = (denoised - d(0)) / (d(1) - d(0))."""
    zero = model_sampling.calculate_denoised(sigma, torch.zeros_like(x), x)
    one = model_sampling.calculate_denoised(sigma, torch.ones_like(x), x)
    return (denoised - zero) / (one - zero)


def checkpoint_units(diffusion_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks to recompute in backward: the children of the model's block lists (the layers of a container
    other than a UNet block), plus a UNet's middle block. UNet blocks (``TimestepEmbedSequential``) are run by
    ComfyUI's ``forward_timestep_embed`` function, not by their own ``forward``; ``checkpointed_blocks`` wraps
    that call for them."""
    units = []
    for child in diffusion_model.children():
        if isinstance(child, torch.nn.ModuleList):
            for block in child:
                if isinstance(block, openaimodel.TimestepEmbedSequential) or \
                        not isinstance(block, (torch.nn.Sequential, torch.nn.ModuleList)):
                    units.append(block)
                else:  # another container the model may iterate itself: its layers
                    units += list(block)
    middle = getattr(diffusion_model, "middle_block", None)
    if isinstance(middle, openaimodel.TimestepEmbedSequential):
        units.append(middle)
    return [u for u in units if any(p.numel() for p in u.parameters())]



def concat_groups(per: list[dict]) -> list[list[int]]:
    """Indices of consecutive samples whose ComfyUI model conds batch together (same keys, every cond's
    ``can_concat`` with the group's first), in order."""
    groups: list[list[int]] = []
    for i, p in enumerate(per):
        head = per[groups[-1][0]] if groups else None
        if head is not None and head.keys() == p.keys() and all(head[k].can_concat(p[k]) for k in head):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def concat_conds(per: list[dict]) -> dict:
    """One batch of model kwargs from per-sample model conds (ComfyUI's ``concat``)."""
    return {k: per[0][k].concat([p[k] for p in per[1:]]) if len(per) > 1 else per[0][k].cond for k in per[0]}


class _CloneRecomputedSaves:
    """Recompute context for ``torch.utils.checkpoint``: each tensor the recomputation saves for backward is
    copied first, then handed to checkpoint's own hook. torch keeps recomputed tensors by reference, so a block
    that later changes them in place (FLUX's ``img += ...`` after ``img_norm1(img)`` saved ``img``) would
    otherwise give backward the changed values: wrong gradients, no error."""

    def __enter__(self):
        # the hooks on top now are checkpoint's recomputation hooks (this context is entered inside them)
        pack, unpack = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: pack(t.clone()), unpack)
        return self._hooks.__enter__()

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def _recompute_contexts():
    return contextlib.nullcontext(), _CloneRecomputedSaves()


def _on_copies(fwd):
    """``fwd`` called with copies of its tensor arguments: a block that adds into its input in place leaves
    the input checkpoint saved (and recomputes from) unchanged."""
    def call(*args, **kwargs):
        copy = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
        return fwd(*map(copy, args), **{k: copy(v) for k, v in kwargs.items()})
    return call


def _checkpointed(fwd, protect: Callable[[], bool], *args, **kwargs):
    if not protect():
        return torch.utils.checkpoint.checkpoint(fwd, *args, use_reentrant=False, **kwargs)
    return torch.utils.checkpoint.checkpoint(_on_copies(fwd), *args, use_reentrant=False,
                                             context_fn=_recompute_contexts, **kwargs)


_TIMESTEP_EMBED = inspect.signature(openaimodel.forward_timestep_embed)


def _checkpointed_timestep_embed(orig, blocks: set[int], protect: Callable[[], bool]):
    """A stand-in for ComfyUI's ``forward_timestep_embed`` that checkpoints the whole call for ``blocks``.
    That function also counts ``transformer_options["transformer_index"]`` up in place: the forward pass
    works on the caller's dict as usual, the recomputation on a copy of the dict as it was at the start."""
    def call(ts, x, *args, **kwargs):
        if id(ts) not in blocks or not torch.is_grad_enabled():
            return orig(ts, x, *args, **kwargs)
        bound = _TIMESTEP_EMBED.bind(ts, x, *args, **kwargs)
        bound.apply_defaults()
        fixed = dict(bound.arguments)
        at_start = dict(fixed["transformer_options"])
        first = [True]

        def run(x_, emb_, context_):
            a = {**fixed, "x": x_, "emb": emb_, "context": context_}
            if not first[0]:
                a["transformer_options"] = dict(at_start)
            first[0] = False
            return orig(**a)

        return _checkpointed(run, protect, fixed["x"], fixed["emb"], fixed["context"])
    return call


@contextlib.contextmanager
def checkpointed_blocks(diffusion_model: torch.nn.Module, enabled: bool, protect: Callable[[], bool] = lambda: False):
    """Gradient checkpointing of each block, undone afterwards (the modules are shared with every other
    user of the model). While ``protect()`` is true (a model that modifies saved activations in place, see
    ``Trainer.step``) blocks run on copies of their inputs and the recomputation keeps copies of what it saves.
    UNet blocks: ComfyUI's ``forward_timestep_embed`` is replaced, for the duration, by one that checkpoints
    these blocks and calls the original for any other."""
    patched = []
    unet_blocks = set()
    if enabled:
        for block in checkpoint_units(diffusion_model):
            if isinstance(block, openaimodel.TimestepEmbedSequential):
                unet_blocks.add(id(block))
                continue
            had, fwd = "forward" in block.__dict__, block.forward
            block.forward = functools.partial(_checkpointed, fwd, protect)
            patched.append((block, had, fwd))
    orig = openaimodel.forward_timestep_embed
    if unet_blocks:
        openaimodel.forward_timestep_embed = _checkpointed_timestep_embed(orig, unet_blocks, protect)
    try:
        yield
    finally:
        openaimodel.forward_timestep_embed = orig
        for block, had, fwd in patched:  # as it was: no instance attribute left behind (it would hold a bound
            if had:                      # method of the block, a reference cycle on the shared model)
                block.forward = fwd
            else:
                del block.forward


@dataclass
class MicroBatch:
    """One micro-batch as drawn from the run's seeded stream. ``dropout_seed``: per micro-batch, the global RNG
    is seeded from the trainer's generator (so dropout masks follow the run's seed and survive resume), only when
    some dropout is on (no draw otherwise: runs without dropout keep their random stream)."""
    dropout_seed: int | None
    x0: torch.Tensor
    noise: torch.Tensor
    sigma: torch.Tensor
    weights: torch.Tensor
    conds: list


@dataclass
class StepResult:
    step: int
    loss: float
    lr: float
    val_loss: float | None = None
    seconds: float = 0.0


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device):
    """torch's global RNG (CPU, and ``device``'s when it has its own) seeded with ``seed`` inside, restored on
    exit. Dropout draws from it; ``torch.utils.checkpoint`` restores the same states for its recomputation."""
    device = torch.device(device)
    devices = [device] if device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(seed)  # the CPU generator and every accelerator's
        yield


class Trainer:
    """Live training objects rebuilt from a run's state. ``activation_side=False`` runs every adapter through
    ComfyUI's weight wrappers (the comparison the tests make; network dropout then has nowhere to act)."""

    def __init__(self, run: st.TrainRun, activation_side: bool = True):
        self.run = run
        s = run.settings
        self.patcher = run.model.clone()
        self.ms = self.patcher.get_model_object("model_sampling")  # with object patches (ModelSampling* nodes)
        self.shift_rule = ts.resolution_rule(run.model)  # the family's resolution shift (resolution_shift.json)
        dm = self.patcher.model.diffusion_model
        self.device = mm.get_torch_device()  # where load() puts the model; RNG draws stay on the CPU
        self.forward_options = attention.transformer_options(s.attention)  # the model's transformer_options
        self.gen = torch.Generator().manual_seed(s.seed)
        init_gen = torch.Generator().manual_seed(s.seed + 1)
        self.names = ad.target_layers(dm, run.lora)
        modules = dict(dm.named_modules())
        self.adapters: dict[str, ad.TrainAdapter] = {}
        self.hooked_layers: list[tuple[torch.nn.Module, ad.TrainAdapter]] = []  # activation side
        for name in self.names:
            layer = modules[name]
            a = ad.create(layer.weight.detach(), run.lora, init_gen, self.device, layer if activation_side else None)
            self.adapters[name] = a
            if a.kind:
                self.hooked_layers.append((layer, a))
            else:
                self.patcher.add_weight_wrapper(f"diffusion_model.{name}.weight", quantize.weight_wrapper(layer, a))
        ad.refuse_network_dropout_on_weights(run.lora, {n: a.kind for n, a in self.adapters.items()})
        te_swap.attach(self)  # a text-encoder swap's projection joins the adapters and sets ``context``
        self.dropout = any(a.rank_dropout or a.module_dropout or a.network_dropout for a in self.adapters.values())
        self.params = [p for a in self.adapters.values() for n, p in a.named_parameters() if p.requires_grad]
        self.opt = build_optimizer(run.optimizer, self.params, s.optimizer_impl)
        self.sched = build_scheduler(run.optimizer, self.opt)
        # fp16 autocast: scale the loss so small gradients do not underflow (bf16/fp32 need no scaling)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=s.precision == "fp16")
        self.ema = None
        if s.ema_decay:
            self.ema = build_ema(self.params, s.ema_decay)
        self.py_rng = random.Random(s.seed)
        self.samples = list(run.training_set.samples)
        if s.val_count and s.val_count >= len(self.samples):
            from .config import ConfigError

            raise ConfigError(f"val_count {s.val_count} would hold out every sample of the dataset "
                              f"({len(self.samples)}), leaving nothing to train on; use at most {len(self.samples) - 1}, "
                              "or 0 to validate on the training samples")
        n_val = s.val_count if 0 < s.val_count < len(self.samples) else 0
        self.val_samples = self.samples[-n_val:] if n_val else list(self.samples)
        self.train_samples = self.samples[:-n_val] if n_val else list(self.samples)
        self.objective = slider.objective(self)  # a prompts-only objective (concept sliders), else None
        if run.state is not None:
            self.load_state(run.state)

    # -- state ---------------------------------------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {f"{n}.{k}": v.detach().clone() for n, a in self.adapters.items() for k, v in a.inner.state_dict().items()}

    def ema_adapter_state(self) -> dict[str, torch.Tensor] | None:
        """The adapter state with the EMA's averaged weights in place of the trained ones (None without EMA)."""
        if self.ema is None:
            return None
        shadow = iter(self.ema.shadow_params)  # same order as self.params
        out = self.adapter_state()
        for n, a in self.adapters.items():
            for k, p in a.inner.named_parameters():
                if p.requires_grad:
                    out[f"{n}.{k}"] = next(shadow).detach().clone()
        return out

    def state(self) -> dict:
        return {"adapters": self.adapter_state(), "ema_adapters": self.ema_adapter_state(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "rng": self.gen.get_state(), "py_rng": list(self.py_rng.getstate()[1]) + [self.py_rng.getstate()[2]]}

    def load_state(self, state: dict) -> None:
        """Continue from ``state`` (a run's or a checkpoint's). Its tensors are copied first, outside inference
        mode: the optimizer updates its moments in place, which inference tensors (read under ComfyUI's
        ``torch.inference_mode()``) refuse, and the run that holds ``state`` must stay unchanged."""
        with torch.inference_mode(False):
            state = _ordinary_copy(state)
        sd = state["adapters"]
        for n, a in self.adapters.items():
            a.inner.load_state_dict({k: sd[f"{n}.{k}"] for k in a.inner.state_dict()})
        load_optimizer_state(self.opt, state["optimizer"])  # keeps this run's optimizer_impl
        self.sched.load_state_dict(state["scheduler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.gen.set_state(state["rng"])
        pr = state["py_rng"]
        self.py_rng.setstate((3, tuple(int(x) for x in pr[:-1]), pr[-1]))

    # -- data ----------------------------------------------------------------------------------------------
    def draw_batch(self) -> list:
        pool = self.train_samples
        weights = [s.repeats for s in pool]
        first = self.py_rng.choices(range(len(pool)), weights=weights)[0]
        same = [i for i, s in enumerate(pool) if s.latent.shape == pool[first].latent.shape]
        rest = self.py_rng.choices(same, weights=[pool[i].repeats for i in same], k=self.run.settings.batch_size - 1)
        return [pool[i] for i in [first, *rest]]

    def conditioning(self, sample) -> list:
        """The step's caption conditioning for ``sample`` (a drawn variant, or the empty caption on caption
        dropout: the sample's own when it has one, Qwen-Image-Edit's encoded with its control image), carrying the sample's control latent as ``reference_latents`` (image-edit training) either way."""
        tset = self.run.training_set
        empty = sample.empty_conditioning if sample.empty_conditioning is not None else tset.empty_conditioning
        if empty is not None and tset.caption_dropout and self.py_rng.random() < tset.caption_dropout:
            return with_reference(empty, sample)
        return with_reference(self.py_rng.choice(sample.captions).conditioning, sample)

    def model_conds(self, conds: list, x: torch.Tensor) -> list[dict]:
        """Each sample's conditioning through ComfyUI's own cond machinery (extra_conds) as its model conds
        (``comfy.conds``), ready to batch (``concat_groups``, ``concat_conds``); an aligned text mask goes in the
        form the model takes (``text_mask``)."""
        per = []
        for i, cond in enumerate(conds):
            extras = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in cond[0][1].items()}
            extras = text_mask.for_model(self.patcher.model, extras, x[i:i + 1])
            states, extras = self.context(cond[0][0].detach().clone(), extras)
            c = [[states, {**extras, "guidance": self.run.settings.guidance}]]
            conv = comfy.sampler_helpers.convert_cond(c)
            conv = comfy.samplers.encode_model_conds(self.patcher.model.extra_conds, conv, x[i:i + 1], x.device,
                                                     "positive", latent_image=x[i:i + 1])
            per.append({k: v.process_cond(batch_size=1, device=x.device, area=None)
                        for k, v in conv[0]["model_conds"].items()})
        return per

    def predict_loss(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, conds: list) -> torch.Tensor:
        """Per-sample loss in the model's own parametrisation (eps / v / flow velocity)."""
        pred, target = self.predict(x0, noise, sigma, conds)
        return ((pred - target) ** 2).mean(dim=tuple(range(1, x0.ndim)))

    def predict(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, conds: list):
        """(prediction, target), both in the model's own parametrisation (eps / v / flow velocity)."""
        xt = self.ms.noise_scaling(sigma, noise, x0)
        sig = sigma.view(sigma.shape[:1] + (1,) * (x0.ndim - 1))
        return self.predict_at(xt, sigma, conds), native(self.ms, sig, xt, x0)

    def denoised_at(self, xt: torch.Tensor, sigma: torch.Tensor, conds: list) -> torch.Tensor:
        """The model's denoised estimate at the noisy latent ``xt`` (fp32)."""
        per = self.model_conds(conds, xt)
        dtype = DTYPES[self.run.settings.precision]
        outs = []
        # samples whose conditionings cannot batch (LLM captions of different lengths: Lumina 2's masks, Qwen-Image's
        # states) run in separate forwards, as ComfyUI's sampler runs them; one group when they all batch
        for idx in concat_groups(per):
            with torch.autocast(xt.device.type, dtype=dtype, enabled=dtype != torch.float32):
                outs.append(self.patcher.model.apply_model(xt[idx], sigma[idx], **concat_conds([per[i] for i in idx]),
                                                           transformer_options=dict(self.forward_options)))
        return (outs[0] if len(outs) == 1 else torch.cat(outs)).float()

    def predict_at(self, xt: torch.Tensor, sigma: torch.Tensor, conds: list) -> torch.Tensor:
        """The model's output at ``xt`` in its own parametrisation (eps / v / flow velocity)."""
        sig = sigma.view(sigma.shape[:1] + (1,) * (xt.ndim - 1))
        return native(self.ms, sig, xt, self.denoised_at(xt, sigma, conds))

    def preservation_loss(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Differential output preservation (ai-toolkit): with the preservation prompt, the trained model's
        prediction should stay what the base model (adapters off) predicts."""
        conds = [self.run.preservation] * x0.shape[0]
        for a in self.adapters.values():
            a.enabled = False
        try:
            with torch.no_grad():
                base, _ = self.predict(x0, noise, sigma, conds)
        finally:
            for a in self.adapters.values():
                a.enabled = True
        pred, _ = self.predict(x0, noise, sigma, conds)
        return ((pred - base.detach()) ** 2).mean()

    # -- steps ---------------------------------------------------------------------------------------------
    # (text states, extras) -> what the model reads (te_swap.attach: a projection, and a pooled vector for an adm)
    context = staticmethod(lambda cond, extras: (cond, extras))
    clone_saved = False  # set when the model's inference code modifies saved activations in place

    @contextlib.contextmanager
    def hooked(self):
        """The activation-side adapters' forward hooks on their layers, removed on exit (the layers are shared
        with every other user of the model: previews, samplers, other runs)."""
        handles = []
        try:
            for layer, a in self.hooked_layers:
                handles.append(lora_math.attach(layer, a, self.run.settings.lora_math))
            yield
        finally:
            for h in handles:
                h.remove()

    def step(self) -> tuple[float, float]:
        """One optimizer step: ``backward`` then the update. A NaN or infinite loss raises :class:`NonFiniteLoss`
        before anything is updated (adapters, optimizer state, EMA and schedule stay as they were)."""
        total = self.backward()
        if not math.isfinite(total):
            self.opt.zero_grad(set_to_none=True)
            raise NonFiniteLoss(f"the loss became {total} at step {self.sched.last_epoch + 1}")
        return self._update(total)

    def backward(self) -> float:
        """Forward and backward over ``grad_accum`` micro-batches; the gradients are left in the adapters'
        ``.grad``; returns the loss. Some ComfyUI models (FLUX's blocks: ``x += ...``) modify tensors in place
        that autograd saved; the first time that happens the pass is retried, from the same RNG state, with
        saved tensors cloned at save time (more memory, same result). With gradient checkpointing the
        checkpointed blocks then also run on copies of their inputs and clone what their recomputation saves
        (``checkpointed_blocks``), without which their gradients would be silently wrong."""
        rng, py = self.gen.get_state(), self.py_rng.getstate()
        try:
            with self.hooked(), self._saved_tensor_mode():
                return self._backward()
        except RuntimeError as e:
            if self.clone_saved or "modified by an inplace operation" not in str(e):
                raise
            self.opt.zero_grad(set_to_none=True)
            self.gen.set_state(rng)
            self.py_rng.setstate(py)
            self.clone_saved = True
            with self.hooked(), self._saved_tensor_mode():
                return self._backward()

    def _saved_tensor_mode(self):
        if not self.clone_saved:
            return contextlib.nullcontext()
        return torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)

    def _backward(self) -> float:
        s = self.run.settings
        total = 0.0
        for _ in range(s.grad_accum):
            if self.objective is not None:  # another objective (train/slider.py) draws and computes its own
                total += self._objective_micro_batch()
            else:
                total += self.run_micro_batch(self.draw_micro_batch(), s.grad_accum)
        return total

    def _objective_micro_batch(self) -> float:
        """The objective's micro-batch, with dropout drawing from the global RNG seeded from the run's stream
        (as ``draw_micro_batch`` does for the denoising objective)."""
        seed = int(torch.randint(0, 2**62, (1,), generator=self.gen)) if self.dropout else None
        with seeded_global_rng(seed, self.device) if seed is not None else contextlib.nullcontext():
            return self.objective.micro_batch(self)

    def draw_micro_batch(self) -> "MicroBatch":
        """Everything random about one micro-batch, drawn from the run's stream in a fixed order (dropout seed,
        samples, noise, timesteps, captions); drawing it computes nothing (``train.distributed`` draws every
        micro-batch of a step on every rank and runs only its own)."""
        s = self.run.settings
        seed = int(torch.randint(0, 2**62, (1,), generator=self.gen)) if self.dropout else None
        batch = self.draw_batch()
        x0 = self.patcher.model.process_latent_in(torch.stack([b.latent.detach() for b in batch]).float())
        noise = ts.training_noise(self.run.timesteps, x0, self.gen)
        u = ts.sample_u(self.run.timesteps, len(batch), self.gen)
        sigma = ts.sigmas_for(self.run.timesteps, self.ms, u, x0.shape, self.shift_rule)
        weights = ts.loss_weights(self.run.timesteps, self.ms, sigma, u) * torch.tensor(
            [b.weight * (s.reg_weight if b.is_reg else 1.0) for b in batch])
        conds = [self.conditioning(b) for b in batch]
        return MicroBatch(seed, x0, noise, sigma, weights, conds)

    def run_micro_batch(self, mb: "MicroBatch", divisor: int) -> float:
        """Forward and backward of one drawn micro-batch, its loss divided by ``divisor`` (the micro-batches of
        the step); returns that loss. Dropout draws from the global RNG seeded with the micro-batch's seed."""
        s = self.run.settings
        rng = seeded_global_rng(mb.dropout_seed, self.device) if mb.dropout_seed is not None \
            else contextlib.nullcontext()
        with rng:
            x0, noise, sigma, weights = (t.to(self.device) for t in (mb.x0, mb.noise, mb.sigma, mb.weights))
            per = self.predict_loss(x0, noise, sigma, mb.conds)
            loss = (per * weights).mean()
            if self.run.preservation is not None and s.dop_weight > 0:
                loss = loss + s.dop_weight * self.preservation_loss(x0, noise, sigma)
            loss = loss / divisor
            self.scaler.scale(loss).backward()
        return float(loss.detach())

    def _update(self, total: float) -> tuple[float, float]:
        self.scaler.unscale_(self.opt)  # no-op unless fp16; clipping and max-norm see true gradients
        if self.run.optimizer.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.run.optimizer.grad_clip)
        lr = float(self.sched.get_last_lr()[0]) * float(self.opt.param_groups[0].get("d", 1.0))  # Prodigy: d*lr
        self.scaler.step(self.opt)  # skips the update when fp16 gradients overflowed, then lowers the scale
        self.scaler.update()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        ad.apply_max_norm(self.adapters, self.run.lora.max_norm)
        if self.ema is not None:
            self.ema.step(self.params)
        return total, lr

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean loss over the validation samples at fixed timesteps and fixed noise (comparable across runs)."""
        for a in self.adapters.values():
            a.eval()
        if self.objective is not None:
            try:
                with self.hooked():
                    return self.objective.validation_loss(self)
            finally:
                for a in self.adapters.values():
                    a.train()
        g = torch.Generator().manual_seed(12345)
        k = self.run.settings.val_timesteps
        us = torch.linspace(0.1, 0.9, k)
        losses = []
        sigmas = [float(self.ms.percent_to_sigma(1.0 - float(u))) for u in us]
        with self.hooked():
            for sample in self.val_samples:
                x0 = self.patcher.model.process_latent_in(sample.latent[None].float())
                noise = torch.randn(x0.shape, generator=g).to(self.device)
                x0 = x0.to(self.device)
                n = self._timesteps_per_forward(x0.shape, k, sample)
                for i in range(0, k, n):  # a sample's timesteps batched, as many as fit (same noise, same caption)
                    sig = torch.tensor(sigmas[i:i + n], device=self.device)
                    m = len(sig)
                    out = self.predict_loss(x0.expand(m, *x0.shape[1:]), noise.expand(m, *noise.shape[1:]), sig,
                                            [with_reference(sample.captions[0].conditioning, sample)] * m)
                    losses += [float(v) for v in out]
        for a in self.adapters.values():
            a.train()
        return sum(losses) / len(losses)

    def _timesteps_per_forward(self, shape: torch.Size, k: int, sample=None) -> int:
        """How many of a validation sample's ``k`` timesteps run in one forward: the most whose inference memory
        (its reference latents included) fits in free memory with ComfyUI's sampler's margin
        (``comfy.samplers.calc_cond_batch`` batches conds by the same rule: ``memory_required(shape) * 1.5 <
        free``); 1 when none does."""
        free = mm.get_free_memory(self.device)
        for n in range(k, 1, -1):
            if memory.inference_bytes(self.patcher, [n, *shape[1:]], sample) * 1.5 < free:
                return n
        return 1

    def release(self) -> None:
        """Take this trainer's weight wrappers (LoHa, LoKr, DoRA) off the modules it shares with the base model:
        ComfyUI's unpatch leaves ``weight_function`` as it is after a full load, so a later use of those modules
        that does not go through ComfyUI's loader (which wipes them) would still compute with the adapters."""
        mine = {id(a) for a in self.adapters.values()}
        for m in self.patcher.model.diffusion_model.modules():
            fs = getattr(m, "weight_function", None)
            if fs:
                m.weight_function = [f for f in fs if id(getattr(f, "adapter", f)) not in mine]

    def load(self) -> None:
        """Load through ComfyUI's memory manager with a real estimate (not 'evict everything')."""
        # load_models_gpu already counts the model's weights; memory_required is what training needs on top:
        # adapter fp32 params/grads/two optimizer moments (+ EMA) and the activations of the largest training
        # batch kept for backward (ComfyUI's inference estimate x3; x1 with gradient checkpointing)
        biggest = memory.biggest_sample(self)
        acts = memory.inference_bytes(self.patcher, [self.run.settings.batch_size, *biggest.latent.shape], biggest)
        est = sum(p.numel() * 4 * (5 if self.ema else 4) for p in self.params)
        est += acts * (1 if self.run.settings.gradient_checkpointing else 3)
        self.memory_estimate = int(est)
        mm.load_models_gpu([self.patcher], memory_required=est, force_full_load=True)
        unfreeze_inference_tensors(self.patcher.model.diffusion_model)
        freeze_base(self.patcher.model.diffusion_model)


def _ordinary_copy(obj):
    """``obj`` (nested dicts/lists/tuples) with every tensor cloned into an ordinary (non-inference) tensor."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _ordinary_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_ordinary_copy(v) for v in obj)
    return obj


def unfreeze_inference_tensors(module: torch.nn.Module) -> int:
    """ComfyUI runs nodes under ``torch.inference_mode()``, so weights loaded there are inference tensors,
    which autograd cannot save for backward. Replace them (same values, same device) by normal tensors."""
    n = 0
    with torch.inference_mode(False):
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    m._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
                    n += 1
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_inference():
                    m._buffers[name] = b.clone()
                    n += 1
    return n


def freeze_base(module: torch.nn.Module) -> None:
    """Only the adapters train: no gradient is computed or kept for the model's own weights. ComfyUI's loaders
    leave ``requires_grad`` on when a model is loaded outside inference mode; backward would then compute and
    keep (in ``.grad``, never freed) a gradient as large as the model."""
    for p in module.parameters():
        p.requires_grad_(False)
        p.grad = None


Callback = Callable[[StepResult, "Trainer"], None]


Preview = Callable[["Trainer", int], None]


def train_steps(run: st.TrainRun, steps: int, checkpoint_every: int = 0, keep_last: int = 3, val_every: int = 0,
                on_step: Callback | None = None, preview: Preview | None = None, preview_every: int = 0,
                trainer_cls: type[Trainer] = Trainer, save=st.save_checkpoint) -> st.TrainRun:
    """Run ``steps`` optimizer steps from ``run``; return the new run. On interrupt (ComfyUI Cancel) the
    last completed step is checkpointed, then the interrupt propagates. ``preview(trainer, step)`` runs every
    ``preview_every`` steps without gradients; sampling may swap models in ComfyUI's memory manager, so the
    training model is loaded again afterwards. ``trainer_cls`` and ``save(run, keep_last) -> kept paths`` are
    where ``train.distributed`` plugs in (a trainer that shards micro-batches over ranks; rank 0 alone saves)."""
    if steps < 1:
        raise ConfigError("steps must be >= 1")
    history = list(run.history)
    step = run.step
    checkpoints = run.checkpoints

    def snapshot():
        return run.advanced(step=step, state=trainer.state(), history=tuple(history), checkpoints=checkpoints)

    with torch.inference_mode(False), torch.enable_grad():
        trainer = trainer_cls(run)  # adapters, optimizer state: normal tensors even when called under inference mode
        dm = trainer.patcher.model.diffusion_model
        with placement.placed(trainer) as placed, \
                checkpointed_blocks(dm, run.settings.gradient_checkpointing, lambda: trainer.clone_saved), \
                speed_channels_last.applied(trainer):
            for a in trainer.adapters.values():
                a.train()
            in_step = None  # the random state before the step in progress (None between steps)
            try:
                for _ in range(steps):
                    mm.throw_exception_if_processing_interrupted()
                    t0 = time.perf_counter()
                    in_step = (trainer.gen.get_state(), trainer.py_rng.getstate())
                    loss, lr = trainer.step()
                    in_step = None
                    step += 1
                    rec = {"step": step, "loss": loss, "lr": lr}
                    history.append(rec)
                    val = None
                    if val_every and step % val_every == 0:
                        val = trainer.validation_loss()
                        rec["val_loss"] = val
                    if checkpoint_every and step % checkpoint_every == 0:
                        checkpoints = save(snapshot(), keep_last)
                    if on_step:
                        on_step(StepResult(step, loss, lr, val, time.perf_counter() - t0), trainer)
                    if preview is not None and preview_every and step % preview_every == 0:
                        for a in trainer.adapters.values():
                            a.eval()
                        with placed.suspended():  # loads the training model again on the way out
                            with torch.inference_mode():
                                preview(trainer, step)
                        for a in trainer.adapters.values():
                            a.train()
            except mm.InterruptProcessingException:
                # ComfyUI's ops raise the interrupt inside a forward pass: the step in progress has drawn its batch,
                # noise and timesteps but updated nothing, so the checkpoint takes the random state from before it
                # (resuming then repeats that step exactly, as an uninterrupted run takes it)
                if in_step is not None:
                    trainer.gen.set_state(in_step[0])
                    trainer.py_rng.setstate(in_step[1])
                if step > run.step:
                    save(snapshot(), keep_last)
                raise
            except NonFiniteLoss as e:
                # a diverged run: the bad step updated nothing; checkpoint the last good one (later periodic
                # checkpoints of NaN weights would rotate the good ones out) and stop with what to change
                if in_step is not None:
                    trainer.gen.set_state(in_step[0])
                    trainer.py_rng.setstate(in_step[1])
                if step > run.step:
                    checkpoints = save(snapshot(), keep_last)
                kept = f"the checkpoint {checkpoints[-1]} holds step {step}" if checkpoints else \
                    "no checkpoint was written (set checkpoint_every to keep one)"
                raise NonFiniteLoss(f"training stopped: {e}, so that step was not applied; {kept}. Resume it with a "
                                    "lower learning_rate, grad_clip on (e.g. 1.0), or precision fp32/bf16 instead of "
                                    "fp16.") from None
            finally:
                for a in trainer.adapters.values():
                    a.eval()
                trainer.release()
                lora_math.report(trainer, step - run.step)
    return snapshot()


def validation_loss(run: st.TrainRun) -> float:
    with torch.inference_mode(False):
        tr = Trainer(run)
        tr.load()
        try:
            return tr.validation_loss()
        finally:
            tr.release()
