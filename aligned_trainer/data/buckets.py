"""Aspect-ratio buckets. Each image goes to the bucket whose aspect ratio is closest to its own (ties:
the larger bucket); it is resized with Lanczos so the bucket is covered (aspect kept), then centre-cropped
to the bucket, so at most a thin strip on one axis is lost. Images smaller than their bucket are upscaled
(and listed in the report)."""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class BucketConfig:
    resolution: int = 512        # side of the square bucket; max pixel area = resolution^2 unless set
    min_side: int = 256
    max_side: int = 1024
    step: int = 64
    max_area: int | None = None

    def validate(self) -> None:
        if self.step <= 0 or self.step % 8:
            raise ValueError(f"bucket step {self.step} must be a positive multiple of 8 (the VAE downscale)")
        if not (0 < self.min_side <= self.resolution <= self.max_side):
            raise ValueError(f"buckets need 0 < min_side ({self.min_side}) <= resolution ({self.resolution}) "
                             f"<= max_side ({self.max_side})")
        if self.area < self.min_side * self.min_side:
            raise ValueError(f"max pixel area {self.area} is smaller than min_side^2 ({self.min_side}^2): no bucket "
                             "fits; raise max_pixels or lower min_side")

    @property
    def area(self) -> int:
        return self.max_area or self.resolution * self.resolution


def make_buckets(cfg: BucketConfig) -> list[tuple[int, int]]:
    """All (width, height) multiples of ``step`` within the side limits whose area fits (for each width the
    tallest height that fits), plus the largest square that fits."""
    cfg.validate()
    step = cfg.step
    lo = -(-cfg.min_side // step) * step          # smallest side: min_side rounded up to the step
    hi = cfg.max_side // step * step
    out = set()
    for w in range(lo, hi + 1, step):
        h = min(hi, (cfg.area // w) // step * step)
        if h >= lo:
            out.add((w, h))
            out.add((h, w))
    side = min(int(cfg.area ** 0.5) // step * step, cfg.resolution // step * step, hi)
    if side >= lo:
        out.add((side, side))
    if not out:
        raise ValueError(f"no bucket fits: sides {cfg.min_side}..{cfg.max_side} in steps of {step} with at most "
                         f"{cfg.area} pixels; widen the side limits or raise max_pixels")
    return sorted(out)


def assign_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    w, h = size
    ar = w / h
    return min(buckets, key=lambda b: (abs(b[0] / b[1] - ar), -b[0] * b[1]))


def crop_box(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Resize target (covering the bucket, aspect kept) and the centred crop box in resized pixels."""
    w, h = size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return (rw, rh), (left, top, left + bw, top + bh)


def fit_to_bucket(img: Image.Image, bucket: tuple[int, int]) -> tuple[Image.Image, tuple[int, int, int, int]]:
    (rw, rh), box = crop_box(img.size, bucket)
    return img.resize((rw, rh), Image.Resampling.LANCZOS).crop(box), box
