"""Anti-AI-filter cleaning of a dataset (the kohya LoRA guide's "filtering pass", seed 002): each image is
re-filtered into a cleaned copy in the cache (the user's files are never written), and two detector scores
flag suspect images in the report.

What it can and cannot do (also in docs/dataset_tools.md):
- It removes or weakens high-frequency perturbations: added noise, dithering, fine repeating motifs and the
  pixel-level part of adversarial perturbations. Edge-preserving filters (bilateral, median) keep edges;
  a JPEG-style re-encode removes what survives in the finest frequencies.
- It cannot undo low-frequency changes (a global blur, colour shifts, large motifs), and it also softens real
  fine detail (film grain, hair, text): use the mildest setting that works, and compare before/after.
- The detector scores are hints. ``noise_sigma`` (Immerkaer's estimate of Gaussian noise, in 0-255 units)
  flags noisy images, including naturally grainy photos; ``periodic`` (the strongest isolated peak of the
  spectrum against its neighbourhood) flags repeating motifs, including natural ones (fabric, tiles). Neither
  detects a well-crafted, low-amplitude adversarial perturbation (Glaze/Nightshade-style): the guide says
  detection is "near impossible", so clean the whole dataset when in doubt.

Filters come from kornia (a ComfyUI dependency); the re-encode is Pillow's JPEG encoder.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .images import DataError, file_sha, load_image

METHODS = ("bilateral+jpeg", "bilateral", "median", "median+jpeg", "gaussian", "jpeg")
NOISE_FLAG = 4.0       # noise_sigma above this (0-255 units) is listed as suspect
PERIODIC_FLAG = 12.0   # a spectral peak this many times its neighbourhood's median is listed as suspect


@dataclass(frozen=True)
class CleanConfig:
    method: str = "bilateral+jpeg"
    kernel: int = 5                 # filter window (odd)
    sigma_color: float = 0.2        # bilateral: intensity difference (0-1 scale) still smoothed
    sigma_space: float = 1.5        # bilateral / gaussian: spatial sigma in pixels
    jpeg_quality: int = 90

    def validate(self) -> None:
        if self.method not in METHODS:
            raise DataError(f"cleaning method {self.method!r} is unknown; use one of {', '.join(METHODS)}.")
        if self.kernel < 3 or self.kernel % 2 == 0 or self.kernel > 15:
            raise DataError(f"cleaning kernel must be odd, 3-15 (got {self.kernel}); 3 or 5 is usual.")
        for name in ("sigma_color", "sigma_space"):
            v = getattr(self, name)
            if not math.isfinite(v) or v <= 0:
                raise DataError(f"cleaning {name} must be a finite number > 0 (got {v}).")
        if not 10 <= self.jpeg_quality <= 100:
            raise DataError(f"jpeg_quality must be 10-100 (got {self.jpeg_quality}); 85-95 is usual.")

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def _to_image(t: torch.Tensor) -> Image.Image:
    arr = (t[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, subsampling=0)
    buf.seek(0)
    with Image.open(buf) as im:
        return im.convert("RGB")


def clean_image(img: Image.Image, cfg: CleanConfig) -> Image.Image:
    """The cleaned copy of an RGB image (same size)."""
    from kornia.filters import bilateral_blur, gaussian_blur2d, median_blur

    steps = cfg.method.split("+")
    x = _to_tensor(img)
    k = cfg.kernel
    # kornia's default 'reflect' border needs more pixels than half the window on each side: a smaller image
    # (a 1x1 or 2 px wide file in a dataset) takes its edge pixels repeated instead
    border = "reflect" if min(x.shape[-2:]) > k // 2 else "replicate"
    if "bilateral" in steps:
        x = bilateral_blur(x, k, cfg.sigma_color, (cfg.sigma_space, cfg.sigma_space), border_type=border)
    if "median" in steps:
        x = median_blur(x, k, border_type=border)
    if "gaussian" in steps:
        x = gaussian_blur2d(x, k, (cfg.sigma_space, cfg.sigma_space), border_type=border)
    out = _to_image(x)
    return _jpeg(out, cfg.jpeg_quality) if "jpeg" in steps else out


def noise_sigma(img: Image.Image) -> float:
    """Immerkaer (1996) fast noise variance estimate on the grey image, in 0-255 units: the mean absolute
    response to the 3x3 Laplacian-difference mask, scaled to a Gaussian sigma."""
    g = np.asarray(img.convert("L"), dtype=np.float64)
    h, w = g.shape
    if h < 3 or w < 3:
        return 0.0
    r = (g[:-2, :-2] - 2 * g[:-2, 1:-1] + g[:-2, 2:]
         - 2 * g[1:-1, :-2] + 4 * g[1:-1, 1:-1] - 2 * g[1:-1, 2:]
         + g[2:, :-2] - 2 * g[2:, 1:-1] + g[2:, 2:])
    return float(math.sqrt(math.pi / 2) * np.abs(r).sum() / (6.0 * (w - 2) * (h - 2)))


def periodic_score(img: Image.Image) -> float:
    """The strongest isolated peak of the grey image's magnitude spectrum (Hann-windowed, outside the lowest
    frequencies), divided by the median magnitude of its 9x9 neighbourhood: large for a repeating motif."""
    g = np.asarray(img.convert("L"), dtype=np.float64)
    g = (g - g.mean()) * np.outer(np.hanning(g.shape[0]), np.hanning(g.shape[1]))  # no leakage from the borders
    mag = np.abs(np.fft.fftshift(np.fft.fft2(g)))
    h, w = mag.shape
    cy, cx = h // 2, w // 2
    yy, xx = np.ogrid[:h, :w]
    far = ((yy - cy) ** 2 + (xx - cx) ** 2) > (min(h, w) / 16) ** 2  # skip the image's own low frequencies
    if not far.any():
        return 0.0
    cand = np.where(far, mag, 0.0)
    y, x = np.unravel_index(np.argmax(cand), cand.shape)
    hood = mag[max(0, y - 4):y + 5, max(0, x - 4):x + 5]
    base = float(np.median(hood))
    return float(mag[y, x] / base) if base > 0 else 0.0


def scores(img: Image.Image) -> dict:
    return {"noise_sigma": round(noise_sigma(img), 3), "periodic": round(periodic_score(img), 2)}


def suspect(s: dict) -> list[str]:
    why = []
    if s["noise_sigma"] > NOISE_FLAG:
        why.append(f"noise sigma {s['noise_sigma']:.1f} > {NOISE_FLAG}")
    if s["periodic"] > PERIODIC_FLAG:
        why.append(f"repeating pattern (spectral peak {s['periodic']:.0f}x its neighbourhood > {PERIODIC_FLAG:.0f}x)")
    return why


def _write_png(img: Image.Image, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, "PNG")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cached_copy(dest: Path) -> bool:
    """A cleaned copy written earlier and still decodable (a damaged one is written again)."""
    if not dest.is_file():
        return False
    try:
        with Image.open(dest) as im:
            im.load()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def clean_dataset(ds, cfg: CleanConfig, root: Path, progress=None):
    """``(cleaned dataset, report)``: every file item points at its cleaned copy ``root/<image sha>-<config>.png``
    (written once, atomically, and reused by later runs with the same settings); graph images are cleaned in
    memory. Captions, buckets, crops, flips and repeats are kept; the dataset hash changes with the pixels.
    The report lists per image the detector scores of the original and of the cleaned copy."""
    from .dataset import _finish_hash  # the dataset's own hash rule

    cfg.validate()
    root = Path(root)
    done: dict[str, tuple[str, str]] = {}  # original sha -> (cleaned source, cleaned sha)
    graph = list(ds.graph_images)
    rows, written, reused = [], 0, 0
    originals = {i.sha: i for i in ds.items}
    for n, (sha, item) in enumerate(originals.items()):
        if item.source.startswith("graph:"):
            k = int(item.source.split(":")[1])
            before = Image.fromarray((graph[k].clamp(0, 1).numpy() * 255).round().astype(np.uint8))
            after = clean_image(before, cfg)
            graph[k] = torch.from_numpy(np.asarray(after, dtype=np.float32) / 255.0)
            done[sha] = (item.source, hashlib.sha256(graph[k].numpy().tobytes()).hexdigest())
        else:
            path = Path(item.source)
            if file_sha(path) != sha:
                raise DataError(f"image {path} changed after the Dataset node read it; run the graph again.")
            before = load_image(path)
            dest = root / f"{sha[:24]}-{cfg.digest()}.png"
            if _cached_copy(dest):
                reused += 1
                with Image.open(dest) as im:
                    after = im.convert("RGB")
            else:
                after = clean_image(before, cfg)
                _write_png(after, dest)
                written += 1
            done[sha] = (str(dest), file_sha(dest))
        sb, sa = scores(before), scores(after)
        rows.append({"source": _name(item.source),
                     "before": sb, "after": sa, "suspect": suspect(sb)})
        if progress:
            progress(n + 1, len(originals))
    items = tuple(replace(i, source=done[i.sha][0], sha=done[i.sha][1]) for i in ds.items)
    notes = [f"cleaned: {len(originals)} images with {cfg.method} ({written} written, {reused} reused from "
             f"{root.name})"]
    notes += [f"suspect: {r['source']}: {'; '.join(r['suspect'])}" for r in rows if r["suspect"]]
    out = replace(ds, items=items, graph_images=tuple(graph), notes=tuple(ds.notes) + tuple(notes))
    out = replace(out, hash=_finish_hash(out.items, out.caption_cfg, out.bucket_cfg, out.reg_weight))
    rows.sort(key=lambda r: (-len(r["suspect"]), -r["before"]["noise_sigma"]))
    return out, {"method": cfg.method, "config": asdict(cfg), "written": written, "reused": reused,
                 "folder": str(root), "images": rows}


def _name(source: str) -> str:
    return source if source.startswith("graph:") else Path(source).name


def preview_rows(before, after, report: dict, limit: int) -> list[tuple[str, list, list[str]]]:
    """Grid rows (label, [original, cleaned, difference x4], captions) for the first ``limit`` images of the
    report (most suspect first); ``before``/``after`` are the dataset before and after ``clean_dataset``."""
    from .vae_roundtrip import difference

    pairs = {}
    for old, new in zip(before.items, after.items):
        if not old.flip:
            pairs.setdefault(_name(old.source), (old, new))
    rows = []
    for r in report["images"][:limit]:
        old, new = pairs[r["source"]]
        a, b = before.pixels(old), after.pixels(new)
        rows.append((r["source"] + (" (suspect)" if r["suspect"] else ""), [a, b, difference(a, b)],
                     [f"noise {r['before']['noise_sigma']:.1f}", f"noise {r['after']['noise_sigma']:.1f}", "x4"]))
    return rows
