"""The plain-PyTorch floor: the same diffusion model, the same layers wrapped with a LoRA of the same
rank, one forward + backward + AdamW step per iteration, written directly against ``torch.func`` with no
ComfyUI patching in the step. Our trainer and ComfyUI's TrainLoraNode are reported as ratios to this."""
from __future__ import annotations

import copy
import math
import time

import torch
from torch.func import functional_call


def lora_targets(diffusion_model: torch.nn.Module, min_ndim: int = 2) -> list[str]:
    """Parameter names of the weights ComfyUI can patch (layers with ``weight_function``)."""
    names = []
    for n, m in diffusion_model.named_modules():
        if hasattr(m, "weight_function") and getattr(m, "weight", None) is not None and m.weight.ndim >= min_ndim:
            names.append(f"{n}.weight")
    return names


def time_floor(model_patcher, latents: torch.Tensor, context: torch.Tensor, rank: int, steps: int,
               warmup: int, batch_size: int, lr: float = 1e-4, seed: int = 0,
               gradient_checkpointing: bool = False, targets: list[str] | None = None) -> list[float]:
    """Per-step wall times (s) of the floor after ``warmup`` steps. ``latents``: (N, C, H, W)."""
    torch.manual_seed(seed)
    with torch.inference_mode(False), torch.enable_grad():
        unet = copy.deepcopy(model_patcher.model.diffusion_model).float().train()
        for p in unet.parameters():
            p.requires_grad_(False)
        ms = model_patcher.model.model_sampling
        params = dict(unet.named_parameters())
        targets = targets or lora_targets(unet)
        lora = {}
        for name in targets:
            w = params[name]
            fan_in = math.prod(w.shape[1:])
            down = torch.nn.Parameter(torch.randn(rank, fan_in) / math.sqrt(fan_in))
            up = torch.nn.Parameter(torch.zeros(w.shape[0], rank))
            lora[name] = (down, up)
        opt = torch.optim.AdamW([p for pair in lora.values() for p in pair], lr=lr)
        latents = latents.clone().float()
        context = context.clone().float()
        times = []
        for step in range(steps + warmup):
            t0 = time.perf_counter()
            idx = torch.randint(0, latents.shape[0], (batch_size,))
            x0 = latents[idx]
            noise = torch.randn_like(x0)
            sigma = torch.tensor([float(ms.percent_to_sigma(torch.rand(()).item())) for _ in range(batch_size)])
            xt = ms.noise_scaling(sigma, noise, x0)
            x_in = ms.calculate_input(sigma, xt)
            timestep = ms.timestep(sigma).float()
            eff = {n: params[n] + (up @ down).view_as(params[n]) for n, (down, up) in lora.items()}
            ctx = context[idx % context.shape[0]]
            if gradient_checkpointing:
                out = torch.utils.checkpoint.checkpoint(
                    lambda a, b, c: functional_call(unet, eff, (a, b), {"context": c}), x_in, timestep, ctx,
                    use_reentrant=False)
            else:
                out = functional_call(unet, eff, (x_in, timestep), {"context": ctx})
            loss = torch.nn.functional.mse_loss(out, noise)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= warmup:
                times.append(time.perf_counter() - t0)
        return times
