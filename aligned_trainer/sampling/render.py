"""Render images with ComfyUI's sampling path (the code the stock KSampler runs) and lay them out.

One image is exactly what ``EmptyLatentImage -> KSampler -> VAEDecode`` gives for the same model,
conditioning, seed and settings: ``comfy.sample.prepare_noise`` + ``comfy.sample.sample`` + ``VAE.decode``."""
from __future__ import annotations

import gc
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import node_helpers
import torch

from .. import imaging
from ..train.config import check_finite


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
    frames: int = 1                 # video models: frames per sample (rounded down to what the VAE decodes: Wan 4k+1)

    def __post_init__(self):
        check_finite(self)  # cfg, guidance: NaN passes every range check of a JSON prompt
        if self.seed_mode not in ("fixed", "walk"):
            raise ValueError(f"seed_mode must be 'fixed' or 'walk', not {self.seed_mode!r}")
        if self.sampler not in comfy.samplers.KSampler.SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; pick one of comfy.samplers.KSampler.SAMPLERS")
        if self.scheduler not in comfy.samplers.KSampler.SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; pick one of comfy.samplers.KSampler.SCHEDULERS")
        if self.steps < 1 or self.width < 8 or self.height < 8:
            raise ValueError("steps must be >= 1 and width/height >= 8")
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1 (got {self.frames}); 1 for image models, 4k+1 (17, 33) for Wan")

    def seed_for(self, step: int = 0) -> int:
        """fixed: the base seed at every step; walk: base seed + training step (step 0 = the base seed)."""
        return self.seed + int(step) if self.seed_mode == "walk" else self.seed


def encode(clip, text: str, guidance: float, images: tuple = ()) -> list:
    """CLIPTextEncode, then FluxGuidance's ``guidance`` value on the conditioning. Models without a guidance
    embedding (SD1.5, SDXL, SD3, FLUX schnell) ignore the value, as they do in a stock workflow. ``images``
    (:func:`text_images`): the input images a CLIP whose spec puts images in the prompt encodes the text with, as
    ComfyUI's TextEncodeQwenImageEdit calls it (``clip.tokenize(text, images=[...])``)."""
    tokens = clip.tokenize(text, images=list(images)) if images else clip.tokenize(text)
    cond = clip.encode_from_tokens_scheduled(tokens)
    return node_helpers.conditioning_set_values(cond, {"guidance": guidance})


def text_images(clip, images: torch.Tensor | None) -> tuple:
    """The images each prompt is encoded with: for a CLIP aligned with a spec that reads input images in its prompt
    (an encoder's ``image_placeholder``: Qwen-Image-Edit), each image of the control batch ``images`` (B, H, W, C),
    its first three channels, in batch order (the spec's resize is the aligned CLIP's own, as in training, where a
    caption is encoded with its control's pixels); ``()`` for every other CLIP. Such a spec without a control image
    is refused: its prompts are never encoded without the image. ``images``' shape is checked by
    :func:`reference_latents`, and their number by the aligned CLIP (as many as its template has placeholders)."""
    from ..te import vision

    spec = getattr(clip, "spec", None)
    if not vision.needs_images(spec):
        return ()
    if images is None:
        raise ValueError(f"text-encoder spec '{spec.key}' encodes each prompt with the input image, and no "
                         "control_image is connected: connect the image to edit (Load Image -> "
                         "ImageScaleToTotalPixels) to control_image, or pick the family's text-to-image spec on Load "
                         "Aligned Text Encoders for text-only previews.")
    return tuple(images[i:i + 1, :, :, :3] for i in range(images.shape[0]))


def reference_latents(vae, images: torch.Tensor | None) -> tuple:
    """The control (reference) images of an edit preview as ComfyUI's own graph attaches them: each image of the
    batch ``images`` (B, H, W, C) through ``VAEEncode`` (its first three channels), in batch order, each becoming one
    entry of the conditioning's ``reference_latents`` as one ``ReferenceLatent`` node per image chained in that
    order would add it. No images: ``()``."""
    if images is None:
        return ()
    if images.ndim != 4 or images.shape[0] < 1 or images.shape[-1] < 3:
        raise ValueError(f"control_image: expected a batch of RGB images (B, H, W, 3), got shape {tuple(images.shape)}")
    return tuple(vae.encode(images[i:i + 1, :, :, :3]) for i in range(images.shape[0]))


def with_references(cond: list, latents: tuple) -> list:
    """``cond`` with ``latents`` appended to its ``reference_latents`` (what chained ReferenceLatent nodes give);
    ``cond`` itself when there are none."""
    if not latents:
        return cond
    return node_helpers.conditioning_set_values(cond, {"reference_latents": list(latents)}, append=True)


def latent_geometry(vae) -> tuple[int, int, int | None]:
    """``(channels, spatial, temporal)`` of the latents ``vae`` decodes, read from the ``comfy.sd.VAE`` ComfyUI built
    for the file (``latent_channels``, ``spacial_compression_decode()``, ``temporal_compression_decode()``; the
    last is None for image VAEs): SD 4/8, SD3/FLUX 16/8, Wan 2.1 16/8/4, Wan 2.2 48/16/4, FLUX.2 128/16."""
    try:
        return int(vae.latent_channels), int(vae.spacial_compression_decode()), vae.temporal_compression_decode()
    except (AttributeError, TypeError) as e:
        raise ValueError(f"the VAE ({type(vae).__name__}) gives no latent size (latent_channels, compression); "
                         "connect the model's VAE from a VAE or checkpoint loader") from e


def empty_latent(model, vae, s: SampleSettings) -> torch.Tensor:
    """:func:`latent_shape` of zeros, as the stock empty-latent nodes make it."""
    return comfy.sample.fix_empty_latent_channels(model, torch.zeros(latent_shape(model, vae, s)))


def latent_shape(model, vae, s: SampleSettings) -> list[int]:
    """The shape of the empty latent the stock nodes start from, sized by the VAE: ``(1, C, H / k, W / k)`` for a
    still image (EmptyLatentImage / EmptySD3LatentImage / EmptyFlux2LatentImage), or for ``frames`` > 1 on a video
    model
    ``(1, C, (frames - 1) // t + 1, H / k, W / k)`` (EmptyHunyuanLatentVideo for Wan 2.1, Wan22ImageToVideoLatent's
    H / 16 and 48 channels for the Wan 2.2 VAE), with C, k, t the VAE's channels, spatial and temporal
    compression, so the decode comes out at the width, height and frames asked (frames rounded down to what the
    VAE decodes: Wan 4k+1)."""
    fmt = model.get_model_object("latent_format")
    video_vae = hasattr(vae, "temporal_compression_decode") and bool(vae.temporal_compression_decode())
    if s.frames > 1 and not (video_vae and fmt.latent_dimensions == 3):
        raise ValueError(f"frames = {s.frames} needs a video model and its VAE (Wan); this model or VAE makes still "
                         "images: set frames to 1.")
    channels, spatial, temporal = latent_geometry(vae)
    if channels != fmt.latent_channels:
        raise ValueError(f"the VAE makes {channels}-channel latents but the model ({type(fmt).__name__} latents) "
                         f"takes {fmt.latent_channels}: connect the VAE of the model's family")
    size = [s.height // spatial, s.width // spatial]
    if min(size) < 1:
        raise ValueError(f"width x height {s.width}x{s.height} is below one latent pixel of this VAE ({spatial} px): "
                         f"use at least {spatial} px")
    return [1, channels, (s.frames - 1) // temporal + 1, *size] if s.frames > 1 else [1, channels, *size]


@torch.no_grad()
def sample(model, vae, positive: list, negative: list, s: SampleSettings, seed: int) -> torch.Tensor:
    """One image (1, H, W, 3), or one clip (F, H, W, 3) when ``s.frames`` > 1: empty latent -> comfy.sample.sample
    -> VAE decode, as KSampler + VAEDecode (EmptyHunyuanLatentVideo for a clip)."""
    latent = empty_latent(model, vae, s)
    noise = comfy.sample.prepare_noise(latent, seed, None)
    samples = comfy.sample.sample(model, noise, s.steps, s.cfg, s.sampler, s.scheduler, positive, negative, latent,
                                  denoise=1.0, disable_pbar=True, seed=seed)
    del noise, latent
    images = vae.decode(samples)
    del samples
    if images.ndim == 5:  # video VAEs: (1, F, H, W, 3), flattened as VAEDecode does
        images = images.reshape(-1, *images.shape[-3:])
    return images[:1 if s.frames == 1 else None].float().cpu().clone()


def release(*models) -> None:
    """Drop sampling models from ComfyUI's loaded set (restoring un-patched weights) and free cached memory,
    so training does not resume with sampling memory still held."""
    for model in models:
        for i in reversed(range(len(mm.current_loaded_models))):
            lm = mm.current_loaded_models[i]
            if lm.model is model:
                lm.model_unload()
                mm.current_loaded_models.pop(i)
    gc.collect()
    mm.soft_empty_cache()


def grid(images: list[list[torch.Tensor]], row_labels: list[str], col_labels: list[str],
         cell_labels: list[list[str]] | None = None) -> tuple[torch.Tensor, dict]:
    """Labelled grid as an IMAGE plus its geometry: ``cell_boxes[i][j]`` (x0, y0, x1, y1) and the labels."""
    cells = [[imaging.to_pil(im) for im in row] for row in images]
    img, geo = imaging.labelled_grid(cells, row_labels, col_labels, cell_labels)
    geo.update(row_labels=list(row_labels), col_labels=list(col_labels),
               cell_labels=[list(r) for r in cell_labels] if cell_labels else None)
    return imaging.to_tensor(img), geo


def grid_frames(images: list[list[torch.Tensor]], row_labels: list[str], col_labels: list[str],
                cell_labels: list[list[str]] | None = None) -> tuple[torch.Tensor, dict]:
    """``grid`` for cells of F frames each (F, H, W, 3): one labelled grid per frame, (F, GH, GW, 3); the
    geometry of the first frame (every frame has the same). Cells of one frame give ``grid`` unchanged."""
    n = min(int(im.shape[0]) for row in images for im in row)
    out = [grid([[im[f:f + 1] for im in row] for row in images], row_labels, col_labels, cell_labels) for f in range(n)]
    return torch.cat([g for g, _ in out]), out[0][1]


def short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
