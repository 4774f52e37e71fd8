"""A tiny captioned image dataset: seeded shapes on coloured backgrounds, with kohya-style layout
(``<repeats>_<name>/`` folders of ``.png`` + ``.txt``)."""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
          "purple": (140, 50, 170), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")


def draw(shape: str, fg: tuple, bg: tuple, size: tuple[int, int], rng: random.Random) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)
    r = min(w, h) * rng.uniform(0.25, 0.4)
    cx, cy = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.4, 0.6)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    return img


def make_dataset(root: Path, n: int = 8, seed: int = 0, trigger: str = "ohwx", repeats: int = 1,
                 sizes: tuple[tuple[int, int], ...] = ((64, 64), (96, 64), (64, 96))) -> Path:
    """Write ``n`` images with captions into ``root/<repeats>_<trigger>/``; return that folder."""
    rng = random.Random(seed)
    folder = Path(root) / f"{repeats}_{trigger}"
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        fg_name, bg_name = rng.sample(names, 2)
        size = sizes[i % len(sizes)]
        img = draw(shape, COLORS[fg_name], COLORS[bg_name], size, rng)
        stem = f"img_{i:03d}"
        img.save(folder / f"{stem}.png")
        caption = f"{trigger}, a {fg_name} {shape}, {bg_name} background, simple, flat colors"
        (folder / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return folder
