"""A peer trainer in the same run (issue #25): the LoRA training step of diffusers' own examples
(``examples/dreambooth/train_dreambooth_lora_sdxl.py`` and ``train_dreambooth_lora_flux.py``), written out
without accelerate's wrapper, on diffusers' own model classes (``UNet2DConditionModel``,
``FluxTransformer2DModel``) with the architecture of the ComfyUI config the floors and ours train, and the same
shapes and settings:

- base weights in the compute dtype, frozen; peft LoRA (``add_adapter(LoraConfig(...))``, gaussian init) of the
  same rank and alpha on the same layers (every Linear and Conv2d: what ours and the floors call "every
  patchable >= 2-D weight"); the trainable parameters cast to fp32 (``cast_training_params``), as the examples do;
- forward under ``torch.autocast`` in the compute dtype (what accelerate's ``mixed_precision`` does), loss = MSE
  in fp32 against the family's target (SDXL: the noise of ``DDPMScheduler.add_noise``; FLUX: ``noise - x0`` at a
  uniformly drawn sigma, latents packed 2x2, guidance 1.0), ``torch.optim.AdamW`` (lr 1e-4, weight decay 0), no
  gradient clipping (ours and the floors clip nothing in the benchmark);
- gradient checkpointing through diffusers' ``enable_gradient_checkpointing()`` where the family's row has it.

Random weights (diffusers' own initialisation); the timings do not depend on the values."""
from __future__ import annotations

import time

import torch


def diffusers_config(family: str, unet: dict) -> dict:
    """diffusers' config of the model that ComfyUI's ``unet`` config (bench/bundles.py) describes."""
    if family == "sdxl":
        mc, mult, nres = unet["model_channels"], unet["channel_mult"], unet["num_res_blocks"]
        per_level = [unet["transformer_depth"][sum(nres[:i])] for i in range(len(mult))]
        blocks = [mc * m for m in mult]
        return dict(
            sample_size=unet.get("image_size", 32) * 4, in_channels=unet["in_channels"], out_channels=unet["out_channels"],
            down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in per_level),
            up_block_types=tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(per_level)),
            block_out_channels=tuple(blocks), layers_per_block=nres[0],
            transformer_layers_per_block=tuple(max(d, 1) for d in per_level),
            attention_head_dim=tuple(max(b // unet.get("num_head_channels", 64), 1) for b in blocks),
            cross_attention_dim=unet["context_dim"], use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=unet["adm_in_channels"],
            norm_num_groups=32)
    if family == "flux1":
        return dict(
            patch_size=1, in_channels=unet["in_channels"] * 4, num_layers=unet["depth"],
            num_single_layers=unet["depth_single_blocks"], attention_head_dim=unet["hidden_size"] // unet["num_heads"],
            num_attention_heads=unet["num_heads"], joint_attention_dim=unet["context_in_dim"],
            pooled_projection_dim=unet["vec_in_dim"], guidance_embeds=bool(unet.get("guidance_embed")),
            axes_dims_rope=tuple(unet["axes_dim"]))
    raise ValueError(f"no diffusers peer for {family!r}")


def build(family: str, unet: dict, device: str, dtype: torch.dtype):
    """The diffusers model, random weights in ``dtype`` on ``device``, frozen."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    cls = {"sdxl": UNet2DConditionModel, "flux1": FluxTransformer2DModel}[family]
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**diffusers_config(family, unet))
    finally:
        torch.set_default_dtype(prev)
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype)


def lora_targets(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def _pack(x: torch.Tensor) -> torch.Tensor:  # FLUX: (B, C, H, W) -> (B, H/2*W/2, C*4), as FluxPipeline packs
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _image_ids(h: int, w: int, device) -> torch.Tensor:
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device)


def make_step(family: str, model, latents: torch.Tensor, cond, rank: int, batch: int, gc_on: bool,
              dtype: torch.dtype, device: str, lr: float = 1e-4, seed: int = 0):
    """``step()``: one training step of the peer on ``model`` (LoRA added here)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                 target_modules=lora_targets(model)))
    cast_training_params(model, dtype=torch.float32)
    if gc_on:
        model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator(device=device).manual_seed(seed)
    x0 = latents[:1].expand(batch, *latents.shape[1:]).to(device=device, dtype=torch.float32).contiguous()
    ctx = cond[0][0].to(device=device, dtype=dtype).expand(batch, -1, -1)
    pooled = cond[0][1]["pooled_output"].to(device=device, dtype=dtype).expand(batch, -1)
    cuda = torch.device(device).type == "cuda"
    auto = torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)
    if family == "sdxl":
        sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000)
        side = x0.shape[-1] * 8
        time_ids = torch.tensor([[side, side, 0, 0, side, side]], device=device, dtype=dtype).expand(batch, -1)

        def loss_fn():
            noise = torch.randn(x0.shape, generator=g, device=device)
            t = torch.randint(0, 1000, (batch,), generator=g, device=device)
            noisy = sched.add_noise(x0, noise, t)
            with auto:
                pred = model(noisy.to(dtype), t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                             return_dict=False)[0]
            return torch.nn.functional.mse_loss(pred.float(), noise.float())
    else:
        _, _, h, w = x0.shape
        img_ids = _image_ids(h, w, device)
        txt_ids = torch.zeros(ctx.shape[1], 3, device=device)
        guidance = torch.ones(batch, device=device)

        def loss_fn():
            noise = torch.randn(x0.shape, generator=g, device=device)
            sigma = torch.rand(batch, generator=g, device=device)
            s = sigma.view(-1, 1, 1, 1)
            noisy = (1 - s) * x0 + s * noise
            with auto:
                pred = model(hidden_states=_pack(noisy).to(dtype), timestep=sigma.to(dtype), guidance=guidance,
                             pooled_projections=pooled, encoder_hidden_states=ctx, txt_ids=txt_ids, img_ids=img_ids,
                             return_dict=False)[0]
            return torch.nn.functional.mse_loss(pred.float(), _pack(noise - x0).float())

    from torch.nn.attention import SDPBackend, sdpa_kernel

    # without cuDNN's SDPA: with it, diffusers' FLUX.1 backward hit "an illegal memory access" on an H200 (torch
    # 2.11, 2026-11-30); the flash / memory-efficient kernels remain, as for ComfyUI's model
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    def step():
        with sdpa_kernel(backends):
            loss = loss_fn()
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return float(loss.detach())

    return step


def time_peer(family: str, unet: dict, latents, cond, rank: int, steps: int, warmup: int, batch: int, gc_on: bool,
              precision: str = "bf16", device: str = "cuda") -> list[float]:
    """Per-step wall times (s) of the peer after ``warmup`` steps; builds its own model (freed afterwards)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    with torch.inference_mode(False), torch.enable_grad():
        model = build(family, unet, device, dtype)
        step = make_step(family, model, latents, cond, rank, batch, gc_on, dtype, device)
        times = []
        for i in range(steps + warmup):
            t0 = time.perf_counter()
            step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        del model, step
    return times
