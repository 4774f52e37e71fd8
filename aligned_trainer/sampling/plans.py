"""Sample previews and the preview plan Train Steps renders every N steps."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import render
from .render import SampleSettings, short


def prompt_list(text: str) -> list[str]:
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if not lines:
        raise ValueError("prompts: give at least one prompt (one per line)")
    return lines


def _row(model, vae, positives, negative, s: SampleSettings, step: int, prompts) -> tuple[torch.Tensor, list, dict]:
    seed = s.seed_for(step)
    cells = [render.sample(model, vae, pos, negative, s, seed) for pos in positives]
    g, geo = render.grid_frames([cells], [f"step {step}"], [short(p) for p in prompts],
                                [[f"seed {seed}" for _ in prompts]])
    geo["seeds"] = [[seed for _ in prompts]]
    return g, cells, geo


def _conditionings(clip, vae, prompts, negative: str, s: SampleSettings, control) -> tuple[list, list]:
    """Each prompt's conditioning and the negative's, with the control images' reference latents attached to all of
    them (:func:`render.reference_latents`; as ComfyUI's TextEncodeQwenImageEdit gives its image to the positive and
    the negative encoding; at cfg 1, as FLUX.1 Kontext samples, the negative is never evaluated). A CLIP whose spec
    reads images in the prompt (Qwen-Image-Edit) also encodes every prompt and the negative with the control images
    in the text (:func:`render.text_images`)."""
    refs = render.reference_latents(vae, control)  # checks the batch's shape
    images = render.text_images(clip, control)
    pos = [render.with_references(render.encode(clip, p, s.guidance, images), refs) for p in prompts]
    return pos, render.with_references(render.encode(clip, negative, s.guidance, images), refs)


def preview_grid(model, clip, vae, prompts: list[str], negative: str, s: SampleSettings, step: int = 0,
                 release: bool = False, control=None):
    """One row: each prompt at this step's seed. Returns (grid, cells batch, geometry); with ``s.frames`` > 1 on a
    video model the grid has one frame per clip frame and the cells are the clips one after another. ``control``
    (an IMAGE batch, or None): the control images of an image-edit model, each attached as a reference latent."""
    pos, neg = _conditionings(clip, vae, prompts, negative, s, control)
    try:
        g, cells, geo = _row(model, vae, pos, neg, s, step, prompts)
    finally:
        if release:
            render.release(model)
    return g, torch.cat(cells), geo


@dataclass(frozen=True)
class PreviewPlan:
    """What Train Steps renders every ``every_n`` steps (immutable). Conditionings are encoded once, when the
    plan is made, so the text encoder need not stay in memory during training. ``render(model, step)``
    returns the grid (1, H, W, 3), or (F, H, W, 3) for clips of F frames (``settings.frames``), and has released
    the sampling model and cached memory when it returns."""

    vae: object
    prompts: tuple[str, ...]
    positives: tuple
    negative: list
    settings: SampleSettings
    every_n: int
    fps: float = 16.0               # frame rate of animated previews (clips)

    def due(self, step: int) -> bool:
        return step > 0 and step % self.every_n == 0

    def with_conditioning(self, fn) -> "PreviewPlan":
        """The same plan with ``fn`` (CONDITIONING -> CONDITIONING) applied to every prompt and the negative (a
        text-encoder swap's projection: ``train.te_swap.projected_plan``)."""
        return replace(self, positives=tuple(fn(c) for c in self.positives), negative=fn(self.negative))

    def check(self, model) -> None:
        """Refuse, before any training step, what rendering would refuse at the first due step (frames > 1 for an
        image model, a VAE of another family, a size below one latent pixel): the steps before it would be lost."""
        render.latent_shape(model, self.vae, self.settings)

    def render(self, model, step: int) -> torch.Tensor:
        try:
            g, cells, _ = _row(model, self.vae, self.positives, self.negative, self.settings, step, self.prompts)
            del cells
        finally:
            render.release(model)
        return g


def make_plan(clip, vae, prompts: list[str], negative: str, s: SampleSettings, every_n: int,
              fps: float = 16.0, control=None) -> PreviewPlan:
    """The plan; ``control`` (an IMAGE batch, or None) is encoded now, with the prompts, into reference latents."""
    if every_n < 1:
        raise ValueError("every_n must be >= 1")
    pos, neg = _conditionings(clip, vae, prompts, negative, s, control)
    return PreviewPlan(vae, tuple(prompts), tuple(pos), neg, s, int(every_n), float(fps))
