"""Render images with ComfyUI's sampling path (the code the stock KSampler runs) and lay them out."""
from __future__ import annotations

import gc
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.sample
import node_helpers
import torch

from .. import imaging


@dataclass(frozen=True)
class SampleSettings:
    steps: int = 20
    cfg: float = 7.0
    guidance: float = 3.5           # FLUX-style distilled guidance; only models that read it use it
    sampler: str = "euler"
    scheduler: str = "normal"
    width: int = 512
    height: int = 512
    seed: int = 0
    seed_mode: str = "fixed"        # fixed | walk (seed + step)

    def seed_for(self, step: int = 0) -> int:
        return self.seed + step if self.seed_mode == "walk" else self.seed


def encode(clip, text: str, guidance: float) -> list:
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    return node_helpers.conditioning_set_values(cond, {"guidance": guidance})


@torch.no_grad()
def sample(model, vae, positive: list, negative: list, s: SampleSettings, seed: int) -> torch.Tensor:
    """One image (1, H, W, 3): empty latent -> comfy.sample.sample -> VAE decode, as KSampler + VAEDecode."""
    latent = torch.zeros([1, 4, s.height // 8, s.width // 8])
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed, None)
    samples = comfy.sample.sample(model, noise, s.steps, s.cfg, s.sampler, s.scheduler, positive, negative, latent,
                                  denoise=1.0, disable_pbar=True, seed=seed)
    images = vae.decode(samples)
    if images.ndim == 5:  # video VAEs
        images = images.reshape(-1, *images.shape[-3:])
    return images[:1].float().cpu()


def release(model) -> None:
    """Drop the sampling model from ComfyUI's loaded set and free cached memory (before training resumes)."""
    for i in reversed(range(len(mm.current_loaded_models))):
        lm = mm.current_loaded_models[i]
        if lm.model is model:
            lm.model_unload()
            mm.current_loaded_models.pop(i)
    gc.collect()
    mm.soft_empty_cache()


def grid(images: list[list[torch.Tensor]], row_labels: list[str], col_labels: list[str],
         cell_labels: list[list[str]] | None = None) -> tuple[torch.Tensor, dict]:
    cells = [[imaging.to_pil(im) for im in row] for row in images]
    img, geo = imaging.labelled_grid(cells, row_labels, col_labels, cell_labels)
    return imaging.to_tensor(img), geo


def short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
