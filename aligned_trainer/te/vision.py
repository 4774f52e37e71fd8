"""Images in a text encoder's prompt (Qwen-Image-Edit: a Qwen2.5-VL prompt holding the input image's vision
tokens), read from the spec's ``image_*`` fields:

- ``image_placeholder``: the template token whose place the image takes (ComfyUI's tokenizer replaces it with the
  image; its encoder runs the vision tower and inserts the tokens there);
- ``image_resize``: the pipeline's resize of the input image before the processor (a target area, sides rounded to
  a multiple, a PIL filter);
- ``image_processor``: the processor's own resize (sides a multiple of ``factor`` within a pixel range, a filter
  with antialiasing, on 8-bit pixels), after which ComfyUI's preprocessing has nothing left to resize;
- ``image_token_order``: ``raster``: the tower's output tokens row by row, the order the language model's 3-D
  positions assume.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from .specs import EncoderSpec, SpecError, TESpec

PIL_FILTERS = {"lanczos": "LANCZOS", "bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST"}


def area_dims(width: int, height: int, area: int, multiple: int) -> tuple[int, int]:
    """(width, height) of the aspect ratio ``width / height`` covering about ``area`` pixels, each a multiple of
    ``multiple`` (rounded to the nearest)."""
    ratio = width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    return round(w / multiple) * multiple, round(h / multiple) * multiple


def bounded_dims(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) rounded to multiples of ``factor``, scaled into [min_pixels, max_pixels] keeping the aspect
    ratio (Qwen2-VL's smart resize)."""
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _interp(name: str):
    from torchvision.transforms import InterpolationMode

    return {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
            "lanczos": InterpolationMode.LANCZOS}[name]


def vision_image(image: torch.Tensor, enc: EncoderSpec) -> torch.Tensor:
    """The image (ComfyUI IMAGE, [B, H, W, C] in 0..1; the first image, RGB) as the spec's pipeline gives it to its
    vision tower: 8-bit pixels, ``image_resize`` with PIL, then ``image_processor``'s resize on the 8-bit tensor
    (torchvision, antialiased, as transformers' Qwen2VLImageProcessor); returned as [1, h, w, 3] in 0..1."""
    from PIL import Image

    rgb = image[:1, :, :, :3].detach().float().cpu().clamp(0, 1)
    pixels = (rgb[0] * 255).round().to(torch.uint8).numpy()
    pil = Image.fromarray(pixels)
    rule = enc["image_resize"]
    if rule:
        w, h = area_dims(pil.width, pil.height, rule["target_area"], rule["multiple"])
        pil = pil.resize((w, h), resample=getattr(Image.Resampling, PIL_FILTERS[rule["resample"]]))
    t = torch.from_numpy(np.array(pil)).permute(2, 0, 1).unsqueeze(0)
    proc = enc["image_processor"]
    if proc:
        from torchvision.transforms.v2 import functional as tvF

        size = bounded_dims(t.shape[-2], t.shape[-1], proc["factor"], proc["min_pixels"], proc["max_pixels"])
        t = tvF.resize(t, list(size), interpolation=_interp(proc["resample"]), antialias=True)
    return (t.float() / 255).permute(0, 2, 3, 1).contiguous()


def needs_images(spec: TESpec | None) -> bool:
    """True when ``spec`` encodes each prompt with input images (an encoder has an ``image_placeholder``)."""
    return spec is not None and any(e["image_placeholder"] for e in spec.encoders)


def images_per_prompt(spec: TESpec | None) -> int:
    """How many input images ``spec`` encodes with each prompt: its templates' ``image_placeholder`` count (the most
    over its encoders; 0 for a text-only spec)."""
    if spec is None:
        return 0
    return max((str(e["template"] or "").count(e["image_placeholder"]) for e in spec.encoders
                if e["image_placeholder"]), default=0)


def place_images(sub, enc: EncoderSpec, spec_key: str, seq: list, images: list) -> list:
    """``seq`` (one token sequence) with each ``image_placeholder`` token replaced by the next image, in the form
    ComfyUI's tokenizers give images to their encoder. The prompt needs exactly as many images as placeholders."""
    placeholder = enc["image_placeholder"]
    if not placeholder:
        return seq
    pid = sub.tokenizer.convert_tokens_to_ids(placeholder)
    at = [i for i, t in enumerate(seq) if isinstance(t[0], int) and t[0] == pid]
    if len(at) != len(images):
        raise SpecError(f"text-encoder spec '{spec_key}' encodes each prompt with {len(at)} input image(s) "
                        f"({placeholder} in its template), but {len(images)} were given. Encode with the image: "
                        "ComfyUI's TextEncodeQwenImageEdit node (image input), or a Dataset with a control folder "
                        "for training; for text-only prompts pick the family's text-to-image spec.")
    out = list(seq)
    for i, img in zip(at, images):
        data = {"type": "image", "data": vision_image(img, enc), "original_type": "image"}
        out[i] = (data,) + tuple(out[i][1:])
    return out


@contextlib.contextmanager
def token_order(cond_stage_model, spec: TESpec, encoder_model):
    """For one encode call, have the vision tower of each encoder whose spec says ``image_token_order`` ``raster``
    give its tokens row by row: ComfyUI 0.3.75's ``qwen_vl.Qwen2VLVisionTransformer`` returns them in the order of
    its attention windows (it permutes them by ``get_window_index`` and never permutes back), which transformers'
    Qwen2.5-VL tower undoes; the two agree for images of one window (112 px) only."""
    patched = []
    try:
        for enc in spec.encoders:
            if enc["image_token_order"] != "raster":
                continue
            m = encoder_model(cond_stage_model, enc)
            model = getattr(m, "transformer", None)
            tower = getattr(model, "visual", None)
            if tower is None or not hasattr(tower, "get_window_index"):
                continue
            original = model.preprocess_embed

            def preprocess_embed(embed, device, _orig=original, _tower=tower):
                out, grid = _orig(embed, device)
                if out is not None and grid is not None:
                    index, _ = _tower.get_window_index(grid)
                    out = out[torch.argsort(index.to(out.device))]
                return out, grid

            patched.append((model, model.__dict__.get("preprocess_embed")))
            model.preprocess_embed = preprocess_embed
        yield
    finally:
        for model, saved in reversed(patched):
            if saved is None:
                del model.preprocess_embed
            else:
                model.preprocess_embed = saved
