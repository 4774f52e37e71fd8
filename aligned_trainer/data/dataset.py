"""Datasets: a folder of images with captions (kohya ``N_name`` repeat folders, optional regularization
folder) or images + captions from the graph, bucketed and with processed caption variants.

Handling of bad input (also in docs/data.md):
- unreadable / truncated image, non-UTF-8 caption, empty folder, image/caption count mismatch -> DataError
  naming the file (or the inputs) and the fix;
- missing or empty caption file -> the trigger word alone is the caption; listed in the report;
- graph images with 1 or 4 channels -> grey repeated to RGB / alpha channel dropped;
- image smaller than its bucket -> upscaled; listed in the report;
- CMYK, palette, alpha (composited on white), 16-bit, EXIF-rotated -> converted to upright 8-bit RGB.
"""
from __future__ import annotations

import hashlib
import json
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .buckets import BucketConfig, assign_bucket, crop_box, make_buckets
from .captions import CaptionConfig, split_tags, variants
from .images import IMAGE_EXTS, DataError, file_sha, load_image

REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class Item:
    source: str                    # file path, or "graph:<index>"
    sha: str                       # hash of the image bytes / pixels
    caption: str                   # caption as read
    captions: tuple[str, ...]      # processed variants
    size: tuple[int, int]          # original (w, h) after EXIF rotation
    bucket: tuple[int, int]
    crop: tuple[int, int, int, int]
    flip: bool = False
    repeats: int = 1
    is_reg: bool = False


@dataclass(frozen=True)
class Dataset:
    items: tuple[Item, ...]
    caption_cfg: CaptionConfig
    bucket_cfg: BucketConfig
    reg_weight: float = 1.0
    notes: tuple[str, ...] = ()
    graph_images: tuple = ()       # pixel tensors for graph items, indexed by "graph:<i>"
    hash: str = ""

    def pixels(self, item: Item) -> Image.Image:
        """The item's image, resized and cropped to its bucket (and mirrored when ``flip``)."""
        if item.source.startswith("graph:"):
            arr = self.graph_images[int(item.source.split(":")[1])]
            img = Image.fromarray((arr.clamp(0, 1).numpy() * 255).round().astype(np.uint8))
        else:
            path = Path(item.source)
            if file_sha(path) != item.sha:
                raise DataError(f"image {path} changed after the Dataset node read it; run the graph again so the "
                                "dataset (and its cache keys) are rebuilt.")
            img = load_image(path)
        (rw, rh), box = crop_box(img.size, item.bucket)
        img = img.resize((rw, rh), Image.Resampling.LANCZOS).crop(box)
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if item.flip else img

    def report(self) -> dict:
        per_bucket = Counter(f"{w}x{h}" for w, h in (i.bucket for i in self.items))
        lengths = [len(c.split()) for i in self.items for c in i.captions[:1]]
        ntags = [len(split_tags(c, self.caption_cfg.separator)) for i in self.items for c in i.captions[:1]]
        tags = Counter(t for i in self.items if not i.flip for t in split_tags(i.caption, self.caption_cfg.separator))
        return {"images": sum(1 for i in self.items if not i.flip), "items": len(self.items),
                "regularization": sum(1 for i in self.items if i.is_reg and not i.flip),
                "per_bucket": dict(sorted(per_bucket.items())),
                "caption_words": {"min": min(lengths, default=0), "max": max(lengths, default=0),
                                  "mean": round(statistics.fmean(lengths), 2) if lengths else 0},
                "caption_tags": {"min": min(ntags, default=0), "max": max(ntags, default=0),
                                 "mean": round(statistics.fmean(ntags), 2) if ntags else 0},
                "caption_variants": {"distinct": len({c for i in self.items for c in i.captions}),
                                     "per_image_max": max((len(i.captions) for i in self.items), default=0)},
                "tag_frequency": tags.most_common(25), "notes": list(self.notes), "hash": self.hash,
                **self._folders()}

    def _folders(self) -> dict:
        """Per source folder (its name only, never a path; "graph" for images from the graph): repeats, image
        count and caption tag counts, as kohya's ss_dataset_dirs / ss_tag_frequency list them."""
        dirs: dict = {}
        tags: dict = {}
        for i in self.items:
            if i.flip:
                continue
            d = "graph" if i.source.startswith("graph:") else Path(i.source).parent.name
            dirs.setdefault(d, {"n_repeats": i.repeats, "img_count": 0})["img_count"] += 1
            freq = tags.setdefault(d, {})
            for t in split_tags(i.caption, self.caption_cfg.separator):
                freq[t] = freq.get(t, 0) + 1
        return {"dataset_dirs": dirs, "tag_frequency_by_dir": tags, "resolution": self.bucket_cfg.resolution}


@dataclass
class _Builder:
    caption_cfg: CaptionConfig
    bucket_cfg: BucketConfig
    flip: bool
    seed: int
    items: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def add(self, source: str, sha: str, size: tuple[int, int], caption: str, repeats: int, is_reg: bool, buckets):
        bucket = assign_bucket(size, buckets)
        if size[0] < bucket[0] or size[1] < bucket[1]:
            self.notes.append(f"upscaled: {source} is {size[0]}x{size[1]}, smaller than its bucket {bucket[0]}x{bucket[1]}")
        if caption is None:
            self.notes.append(f"no caption: {source} (no caption file; trained with the trigger word only)")
        elif not caption.strip():
            self.notes.append(f"no caption: {source} (empty caption; trained with the trigger word only)")
        caption = caption or ""
        seed = self.seed ^ int(sha[:8], 16)
        caps = variants(caption, self.caption_cfg, seed)
        _, box = crop_box(size, bucket)
        for flip in ((False, True) if self.flip else (False,)):
            self.items.append(Item(source, sha, caption, caps, size, bucket, box, flip, repeats, is_reg))


def read_caption(img_path: Path) -> str | None:
    for ext in (".txt", ".caption"):
        p = img_path.with_suffix(ext)
        if p.exists():
            try:
                return p.read_text(encoding="utf-8-sig").strip()
            except UnicodeDecodeError:
                raise DataError(f"caption {p} is not UTF-8 text. Re-save it as UTF-8.") from None
    return None


def scan_folder(folder: Path) -> list[tuple[Path, int]]:
    """(image, repeats) for a folder: images directly in it (repeats 1) and in ``N_name`` subfolders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"dataset folder {folder} does not exist or is not a folder.")
    out = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            out.append((p, 1))
        elif p.is_dir():
            m = REPEAT_DIR.match(p.name)
            repeats = int(m.group(1)) if m else 1
            out += [(q, repeats) for q in sorted(p.iterdir()) if q.is_file() and q.suffix.lower() in IMAGE_EXTS]
    return out


def _finish(b: _Builder, reg_weight: float, graph_images=()) -> Dataset:
    cc = b.caption_cfg
    if (cc.shuffle_tags or cc.tag_dropout > 0) and cc.variants == 1:
        b.notes.append("shuffle/tag dropout with caption_variants=1: each image keeps one fixed processed caption; "
                       "raise caption_variants to vary captions between steps")
    h = hashlib.sha256(json.dumps([[i.sha, i.captions, i.bucket, i.flip, i.repeats, i.is_reg] for i in b.items]).encode())
    h.update(repr((b.caption_cfg, b.bucket_cfg, reg_weight)).encode())
    return Dataset(tuple(b.items), b.caption_cfg, b.bucket_cfg, reg_weight, tuple(b.notes), tuple(graph_images),
                   h.hexdigest()[:16])


def folder_fingerprint(*folders: Path | None) -> str:
    """Names, sizes and modification times of every file the dataset would read (for ComfyUI's
    re-execution check: the Dataset node runs again when a file is added, removed or edited)."""
    h = hashlib.sha256()
    for folder in folders:
        if folder is None or not Path(folder).is_dir():
            h.update(f"missing:{folder}".encode())
            continue
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def from_folder(folder: Path, caption_cfg: CaptionConfig, bucket_cfg: BucketConfig, flip: bool = False,
                seed: int = 0, reg_folder: Path | None = None, reg_weight: float = 1.0) -> Dataset:
    caption_cfg.validate()
    buckets = make_buckets(bucket_cfg)
    b = _Builder(caption_cfg, bucket_cfg, flip, seed)
    for root, is_reg in ((folder, False), (reg_folder, True)):
        if root is None:
            continue
        found = scan_folder(root)
        if not found:
            raise DataError(f"dataset folder {root} has no images ({', '.join(sorted(IMAGE_EXTS))}); "
                            "put images (with .txt captions) in it or in N_name subfolders.")
        for path, repeats in found:
            img = load_image(path)
            caption = read_caption(path)
            b.add(str(path), file_sha(path), img.size, caption, repeats, is_reg, buckets)
    return _finish(b, reg_weight)


def from_images(images: torch.Tensor, captions: list[str], caption_cfg: CaptionConfig, bucket_cfg: BucketConfig,
                flip: bool = False, seed: int = 0) -> Dataset:
    """Images (B, H, W, 3) from the graph with one caption per image."""
    caption_cfg.validate()
    if images.shape[0] != len(captions):
        raise DataError(f"{images.shape[0]} images but {len(captions)} captions came from the graph; give one "
                        "caption line per image.")
    buckets = make_buckets(bucket_cfg)
    b = _Builder(caption_cfg, bucket_cfg, flip, seed)
    frames = []
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise DataError(f"images from the graph must be an IMAGE batch (B, H, W, 3); got shape {tuple(images.shape)}")
    for i, (img, cap) in enumerate(zip(images, captions)):
        img = img.detach().float().cpu().clone()
        img = img.expand(-1, -1, 3).contiguous() if img.shape[-1] == 1 else img[..., :3].contiguous()
        frames.append(img)
        sha = hashlib.sha256(img.numpy().tobytes()).hexdigest()
        b.add(f"graph:{i}", sha, (int(img.shape[1]), int(img.shape[0])), cap, 1, False, buckets)
    return _finish(b, 1.0, frames)
