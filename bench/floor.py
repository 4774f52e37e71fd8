"""The plain-PyTorch floors: the same diffusion model, the same layers with a LoRA of the same rank, one
forward + backward + AdamW step per iteration, in one of two formulations:

- ``merge``: the LoRA merged into the weight (``W + up @ down``, as ComfyUI's weight adapters and TrainLoraNode
  do, so the same arithmetic; backward computes a weight-sized gradient per layer);
- ``activation``: the LoRA on the activations (``base(x) + up(down(x))``, as our trainer does for LoRA/LoCon:
  Linear as two ``F.linear``; Conv2d with down as a conv with the layer's kernel/stride/padding/dilation and
  up as a 1x1 conv; other layers merged).

The step is written directly in PyTorch: each target layer's ``forward`` becomes ``F.linear`` /
``_conv_forward`` (restored afterwards), no ComfyUI sampling, conditioning or weight-patching machinery runs
inside the timed step. Our trainer and ComfyUI's TrainLoraNode are reported as ratios to these.

Gradient checkpointing wraps each block of the model's block lists (as ours does); a UNet's blocks (and its
middle block) through ComfyUI's ``forward_timestep_embed``, which is what runs them (their own ``forward`` is
never called). ComfyUI's
FLUX blocks add into tensors autograd saved (``img += ...``): the first step that fails on it is redone with
saved tensors copied, and checkpointed blocks then run on copies of their inputs and copy what their
recomputation saves (without which their gradients would be silently wrong)."""
from __future__ import annotations

import contextlib
import functools
import math
import time

import torch


def lora_targets(diffusion_model: torch.nn.Module, min_ndim: int = 2) -> list[str]:
    """Module names of the weights ComfyUI can patch (layers with ``weight_function``), >= ``min_ndim``-D."""
    names = []
    for n, m in diffusion_model.named_modules():
        if hasattr(m, "weight_function") and getattr(m, "weight", None) is not None and m.weight.ndim >= min_ndim:
            names.append(n)
    return names


def diffusion_kwargs(model_patcher, cond, x: torch.Tensor, guidance: float = 1.0) -> dict:
    """The diffusion model's keyword inputs for a batch shaped like ``x``, all from ``cond`` (CONDITIONING),
    made once before timing by the model's own ``extra_conds`` (SD: context; FLUX: context, pooled ``y``,
    ``guidance``)."""
    import comfy.sampler_helpers
    import comfy.samplers

    base = model_patcher.model
    c = [[cond[0][0].clone(), {**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in cond[0][1].items()},
                               "guidance": guidance}]]
    conv = comfy.samplers.encode_model_conds(base.extra_conds, comfy.sampler_helpers.convert_cond(c), x[:1],
                                             x.device, "positive", latent_image=x[:1])
    out = {}
    for k, v in conv[0]["model_conds"].items():
        t = v.process_cond(batch_size=x.shape[0], device=x.device, area=None).cond
        out["context" if k == "c_crossattn" else k] = t
    return out


def _merged(m, lora):
    down, up, scale = lora
    return m.weight + (scale * (up @ down)).view_as(m.weight).to(m.weight.dtype)


def _linear(m, lora, x):
    return torch.nn.functional.linear(x, _merged(m, lora), m.bias)


def _conv(m, lora, x):
    return m._conv_forward(x, _merged(m, lora), m.bias)


def _embedding(m, lora, x):
    return torch.nn.functional.embedding(x, _merged(m, lora), m.padding_idx, m.max_norm, m.norm_type,
                                         m.scale_grad_by_freq, m.sparse)


def _act_linear(m, lora, x):
    down, up, scale = lora
    return (torch.nn.functional.linear(x, m.weight, m.bias)
            + torch.nn.functional.linear(torch.nn.functional.linear(x, down), up * scale))


def _act_conv(m, lora, x):
    down, up, scale = lora
    F = torch.nn.functional
    h = F.conv2d(x, down.view(down.shape[0], *m.weight.shape[1:]), None, m.stride, m.padding, m.dilation)
    return m._conv_forward(x, m.weight, m.bias) + F.conv2d(h, (up * scale)[:, :, None, None])


def _plain_forward(m, formulation: str = "merge"):
    if isinstance(m, torch.nn.Linear):
        return _act_linear if formulation == "activation" else _linear
    if (formulation == "activation" and isinstance(m, torch.nn.Conv2d) and m.groups == 1
            and m.padding_mode == "zeros"):
        return _act_conv
    if hasattr(m, "_conv_forward"):
        return _conv
    if isinstance(m, torch.nn.Embedding):
        return _embedding
    raise TypeError(f"floor: no plain forward for {type(m).__name__}")


def _blocks(dm: torch.nn.Module) -> list[torch.nn.Module]:
    return [b for child in dm.children() if isinstance(child, torch.nn.ModuleList) for b in child]


class _CopyRecomputedSaves:
    """Recompute context for torch.utils.checkpoint: copy each tensor the recomputation saves, then hand the
    copy to checkpoint's own hook (a block may change it in place later in the same recomputation)."""

    def __enter__(self):
        pack, unpack = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self._h = torch.autograd.graph.saved_tensors_hooks(lambda t: pack(t.clone()), unpack)
        return self._h.__enter__()

    def __exit__(self, *exc):
        return self._h.__exit__(*exc)


def _ckpt_block(fwd, state, *args, **kwargs):
    if not state["copy"]:
        return torch.utils.checkpoint.checkpoint(fwd, *args, use_reentrant=False, **kwargs)

    def on_copies(*a, **k):
        cp = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
        return fwd(*map(cp, a), **{n: cp(v) for n, v in k.items()})

    return torch.utils.checkpoint.checkpoint(on_copies, *args, use_reentrant=False, **kwargs,
                                             context_fn=lambda: (contextlib.nullcontext(), _CopyRecomputedSaves()))


def _unet_ckpt(orig, blocks: set, state: dict):
    """ComfyUI's forward_timestep_embed with the whole call checkpointed for ``blocks`` (each call on its own
    copy of transformer_options: this floor sets no transformer patches)."""
    def call(ts, x, emb, context=None, transformer_options={}, *args, **kwargs):  # noqa: B006 - ComfyUI's signature
        if id(ts) not in blocks or not torch.is_grad_enabled():
            return orig(ts, x, emb, context, transformer_options, *args, **kwargs)
        fn = lambda x_, emb_, c_: orig(ts, x_, emb_, c_, dict(transformer_options), *args, **kwargs)  # noqa: E731
        return _ckpt_block(fn, state, x, emb, context)
    return call


@contextlib.contextmanager
def lora_model(diffusion_model: torch.nn.Module, lora: dict, gradient_checkpointing: bool, state: dict,
               formulation: str = "merge"):
    """The model with each target's forward using its merged weight (``merge``) or adding the LoRA to its
    output (``activation``), and blocks checkpointed; all undone on exit (the model is shared with the other
    trainers)."""
    mods = dict(diffusion_model.named_modules())
    saved = []
    orig_fte = None
    req = [(p, p.requires_grad) for p in diffusion_model.parameters()]
    try:
        for p, _ in req:
            p.requires_grad_(False)
        for name, pair in lora.items():
            m = mods[name]
            fn = _plain_forward(m, formulation)
            saved.append((m, m.__dict__.get("forward")))
            m.forward = functools.partial(fn, m, pair)
        if gradient_checkpointing:
            from comfy.ldm.modules.diffusionmodules import openaimodel

            unet = [b for b in _blocks(diffusion_model) if isinstance(b, openaimodel.TimestepEmbedSequential)]
            for b in _blocks(diffusion_model):
                if b not in unet:
                    saved.append((b, b.__dict__.get("forward")))
                    b.forward = functools.partial(_ckpt_block, b.forward, state)
            if unet:  # a UNet runs its blocks through forward_timestep_embed, never through block.forward
                unet.append(diffusion_model.middle_block)
                orig_fte = openaimodel.forward_timestep_embed
                openaimodel.forward_timestep_embed = _unet_ckpt(orig_fte, {id(b) for b in unet}, state)
        yield
    finally:
        if orig_fte is not None:
            from comfy.ldm.modules.diffusionmodules import openaimodel

            openaimodel.forward_timestep_embed = orig_fte
        for m, f in reversed(saved):
            if f is None:
                del m.forward
            else:
                m.forward = f
        for p, r in req:
            p.requires_grad_(r)


def make_floor(model_patcher, latents: torch.Tensor, cond, rank: int, batch_size: int, lr: float = 1e-4,
               seed: int = 0, precision: str = "fp32", device=None, targets: list[str] | None = None,
               formulation: str = "merge"):
    """(lora, step, setup): ``step()`` runs one training step inside ``setup(gradient_checkpointing)``.
    ``formulation``: ``merge`` or ``activation`` (module docstring)."""
    torch.manual_seed(seed)
    dm = model_patcher.model.diffusion_model
    device = torch.device(device) if device is not None else next(dm.parameters()).device
    ms = model_patcher.model.model_sampling
    import comfy.model_sampling

    flow = isinstance(ms, comfy.model_sampling.CONST)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    wdtype = next(dm.parameters()).dtype
    lora = {}
    for name in targets or lora_targets(dm):
        w = dict(dm.named_modules())[name].weight
        fan_in = math.prod(w.shape[1:])
        down = torch.nn.Parameter(torch.randn(rank, fan_in, device=device) / math.sqrt(fan_in))
        up = torch.nn.Parameter(torch.zeros(w.shape[0], rank, device=device))
        lora[name] = (down, up, 1.0)
    opt = torch.optim.AdamW([p for d, u, _ in lora.values() for p in (d, u)], lr=lr)
    latents = latents.to(device=device, dtype=torch.float32)
    kw = diffusion_kwargs(model_patcher, cond, latents[:1].expand(batch_size, *latents.shape[1:]).clone())
    kw = {k: v.to(device=device, dtype=wdtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
          else (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    state = {"copy": False}

    def one():
        idx = torch.randint(0, latents.shape[0], (batch_size,))
        x0 = latents[idx.to(latents.device)]
        noise = torch.randn_like(x0)
        sigma = torch.tensor([float(ms.percent_to_sigma(torch.rand(()).item())) for _ in range(batch_size)],
                             device=device)
        xt = ms.noise_scaling(sigma, noise, x0)
        x_in = ms.calculate_input(sigma, xt).to(wdtype)
        t = ms.timestep(sigma).float()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = dm(x_in, t, **kw)
        target = noise - x0 if flow else noise
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step():
        if state["copy"]:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
                return one()
        try:
            return one()
        except RuntimeError as e:
            if "modified by an inplace operation" not in str(e):
                raise
            opt.zero_grad(set_to_none=True)
            state["copy"] = True
            return step()

    def setup(gradient_checkpointing: bool):
        return lora_model(dm, lora, gradient_checkpointing, state, formulation)

    return lora, step, setup


def time_floor(model_patcher, latents: torch.Tensor, cond, rank: int, steps: int, warmup: int, batch_size: int,
               lr: float = 1e-4, seed: int = 0, gradient_checkpointing: bool = False, precision: str = "fp32",
               device=None, targets: list[str] | None = None, formulation: str = "merge") -> list[float]:
    """Per-step wall times (s) of the floor after ``warmup`` steps. ``latents``: (N, C, H, W)."""
    with torch.inference_mode(False), torch.enable_grad():
        _, step, setup = make_floor(model_patcher, latents, cond, rank, batch_size, lr, seed, precision, device,
                                    targets, formulation)
        cuda = latents.device.type == "cuda" or (device is not None and torch.device(device).type == "cuda")
        times = []
        with setup(gradient_checkpointing):
            for i in range(steps + warmup):
                t0 = time.perf_counter()
                step()
                if cuda:
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
        return times
