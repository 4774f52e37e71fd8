"""Datasets: a folder of images with captions (kohya ``N_name`` repeat folders, optional regularization
folder) or images + captions from the graph, bucketed and with processed caption variants.

Handling of bad input (also in docs/data.md):
- unreadable / truncated image, non-UTF-8 caption, empty folder, image/caption count mismatch -> DataError
  naming the file (or the inputs) and the fix;
- missing or empty caption file -> the trigger word alone is the caption; listed in the report;
- graph images with 1 or 4 channels -> grey repeated to RGB / alpha channel dropped;
- image smaller than its bucket -> upscaled; listed in the report;
- CMYK, palette, alpha (composited on white), 16-bit, EXIF-rotated -> converted to upright 8-bit RGB;
- decompression-bomb image -> DataError naming the file;
- animated GIF/PNG/WebP, SVG, HEIC, PSD and other unusable formats -> skipped and listed in the report;
- caption longer than an encoder reads (over 75 words) -> listed in the report; caption file over 1 MiB -> DataError;
- control folders (image-edit training, one or more): a training image without a control image of its stem in one
  of them, two control images of one stem, or an unreadable control image -> DataError naming the file and the
  folder; a folder given twice -> DataError;
- folders are listed by ``paths.walk``: the folder and its ``N_name`` sub-folders only, bounded in entries and
  time; links out of the allowed folders and folders reached twice (symlink loops) are skipped and listed.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import paths
from .buckets import BucketConfig, assign_bucket, crop_box, make_buckets
from .captions import CaptionConfig, split_tags, variants
from .images import IMAGE_EXTS, DataError, Unsupported, file_sha, load_image, unsupported

REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")
CAPTION_EXTS = (".txt", ".caption")
MAX_CAPTION_BYTES = 1 << 20
LONG_CAPTION_WORDS = 75        # CLIP reads 77 tokens (about 60 English words); beyond this even T5 setups cut


def _unchanged_image(path: Path, sha: str, what: str) -> Image.Image:
    """The image at ``path``, refused when its bytes are no longer the ones the Dataset node read (``sha``)."""
    if file_sha(path) != sha:
        raise DataError(f"{what} {path} changed after the Dataset node read it; run the graph again so the "
                        "dataset (and its cache keys) are rebuilt.")
    return load_image(path)


def _fitted(img: Image.Image, size: tuple[int, int], box, flip: bool) -> Image.Image:
    """``img`` resized to ``size`` (Lanczos), cropped to ``box`` and mirrored when ``flip``."""
    img = img.resize(size, Image.Resampling.LANCZOS).crop(box)
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img


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
    controls: tuple[str, ...] = ()     # image-edit training: the control (input) images paired with this target, one
                                       # per control folder in folder order; () without control folders
    control_shas: tuple[str, ...] = ()  # hash of each control image's bytes

    @property
    def control(self) -> str:
        """The first control image (the only one with one control folder), or ""."""
        return self.controls[0] if self.controls else ""

    @property
    def control_sha(self) -> str:
        return self.control_shas[0] if self.control_shas else ""


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
            img = _unchanged_image(Path(item.source), item.sha, "image")
        (rw, rh), box = crop_box(img.size, item.bucket)
        return _fitted(img, (rw, rh), box, item.flip)

    def control_pixels(self, item: Item, index: int = 0) -> Image.Image:
        """The item's control image on the target's geometry: resized to the size the target is resized to (both
        axes, so a control of another aspect ratio is stretched to the target's), cropped with the target's crop
        box, mirrored with the target; so a control of the target's own size lines up pixel for pixel. The rule
        ai-toolkit applies to its control_path images (resize to the item's scale size, the item's crop, the
        item's flips), with this pipeline's Lanczos resize. ``index``: which control folder's image."""
        img = _unchanged_image(Path(item.controls[index]), item.control_shas[index], "control image")
        (rw, rh), _ = crop_box(item.size, item.bucket)
        return _fitted(img, (rw, rh), item.crop, item.flip)

    def control_vae_input(self, item: Item, index: int = 0) -> torch.Tensor:
        """The control image (of control folder ``index``) as ``VAE.encode`` takes it: (1, H, W, 3) in 0..1, the
        target's bucket size."""
        return torch.from_numpy(np.asarray(self.control_pixels(item, index), dtype=np.float32) / 255.0)[None]

    def vae_input(self, item: Item) -> torch.Tensor:
        """The pixels ``VAE.encode`` takes for the item: (frames, H, W, 3) in 0..1 (one frame for an image)."""
        return torch.from_numpy(np.asarray(self.pixels(item), dtype=np.float32) / 255.0)[None]

    def check_vae(self, vae) -> None:
        """Raise DataError when ``vae`` cannot encode this dataset (video datasets check the frame axis)."""

    def sampling_key(self, item: Item) -> str:
        """What else besides the file, bucket, crop and flip decides the item's pixels (video: which frames)."""
        return ""

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
                **({"control_images": n} if (n := sum(1 for i in self.items if i.control and not i.flip)) else {}),
                **self._control_folders(),
                **self._folders()}

    def _control_folders(self) -> dict:
        """Image-edit training: per control folder, in the order the model gets its images, its name (never a path)
        and how many training images it gave a control image (every training image has one in each folder;
        regularization images have none)."""
        paired = [i for i in self.items if i.controls and not i.flip]
        if not paired:
            return {}
        return {"control_folders": [{"folder": Path(c).parent.name, "control_images": len(paired)}
                                    for c in paired[0].controls]}

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

    def add(self, source: str, sha: str, size: tuple[int, int], caption: str, repeats: int, is_reg: bool, buckets,
            control: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())):
        bucket = assign_bucket(size, buckets)
        if size[0] < bucket[0] or size[1] < bucket[1]:
            self.notes.append(f"upscaled: {source} is {size[0]}x{size[1]}, smaller than its bucket {bucket[0]}x{bucket[1]}")
        if caption is None:
            self.notes.append(f"no caption: {source} (no caption file; trained with the trigger word only)")
        elif not caption.strip():
            self.notes.append(f"no caption: {source} (empty caption; trained with the trigger word only)")
        elif len(caption.split()) > LONG_CAPTION_WORDS:
            self.notes.append(f"long caption: {source} has {len(caption.split())} words ({len(caption)} characters); "
                              "CLIP encoders read 77 tokens (about 60 words), T5 encoders 256-512 tokens: the rest is "
                              "cut when encoding. Shorten it or put the key words first")
        caption = caption or ""
        seed = self.seed ^ int(sha[:8], 16)
        caps = variants(caption, self.caption_cfg, seed)
        _, box = crop_box(size, bucket)
        for flip in ((False, True) if self.flip else (False,)):
            self.items.append(Item(source, sha, caption, caps, size, bucket, box, flip, repeats, is_reg, *control))


def read_caption(img_path: Path) -> str | None:
    for ext in CAPTION_EXTS:
        p = img_path.with_suffix(ext)
        if p.is_file():
            if p.stat().st_size > MAX_CAPTION_BYTES:
                raise DataError(f"caption {p} is {p.stat().st_size} bytes, more than {MAX_CAPTION_BYTES} (1 MiB); "
                                "a caption is a line or a paragraph: shorten it.")
            try:
                return p.read_text(encoding="utf-8-sig").strip()
            except UnicodeDecodeError:
                raise DataError(f"caption {p} is not UTF-8 text. Re-save it as UTF-8.") from None
    return None


def _listing(folder: Path, roots: paths.Roots | None) -> paths.Listing:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"dataset folder {folder} does not exist or is not a folder.")
    try:
        return paths.walk(folder, roots, max_depth=1)
    except paths.PathRefused as e:
        raise DataError(str(e)) from None


def scan_folder(folder: Path, roots: paths.Roots | None = None, notes: list | None = None) -> list[tuple[Path, int]]:
    """(image, repeats) for a folder: images directly in it (repeats 1) and in ``N_name`` subfolders.
    Skipped entries (unsupported formats, links out of ``roots``, folders met twice) go to ``notes``."""
    listing = _listing(folder, roots)
    out = []
    for p, depth in listing.files:
        if p.suffix.lower() in IMAGE_EXTS:
            m = REPEAT_DIR.match(p.parent.name) if depth else None
            out.append((p, int(m.group(1)) if m else 1))
        elif (why := unsupported(p)) and notes is not None:
            notes.append(f"skipped: {p}: {why}")
    if notes is not None:
        notes.extend(listing.notes)
    return out


def _finish(b: _Builder, reg_weight: float, graph_images=()) -> Dataset:
    cc = b.caption_cfg
    if (cc.shuffle_tags or cc.tag_dropout > 0) and cc.variants == 1:
        b.notes.append("shuffle/tag dropout with caption_variants=1: each image keeps one fixed processed caption; "
                       "raise caption_variants to vary captions between steps")
    return Dataset(tuple(b.items), b.caption_cfg, b.bucket_cfg, reg_weight, tuple(b.notes), tuple(graph_images),
                   _finish_hash(b.items, b.caption_cfg, b.bucket_cfg, reg_weight))


def _finish_hash(items, caption_cfg: CaptionConfig, bucket_cfg: BucketConfig, reg_weight: float) -> str:
    """The dataset's identity: every item's pixels (hash), captions, bucket, flip, repeats and role, and the
    settings that made them."""
    h = hashlib.sha256(json.dumps([[i.sha, i.captions, i.bucket, i.flip, i.repeats, i.is_reg, *i.control_shas]
                                   for i in items]).encode())
    h.update(repr((caption_cfg, bucket_cfg, reg_weight)).encode())
    return h.hexdigest()[:16]


def folder_fingerprint(*folders: Path | None, roots: paths.Roots | None = None) -> str:
    """Names, sizes and modification times of every file the dataset would read (for ComfyUI's
    re-execution check: the Dataset node runs again when a file is added, removed or edited)."""
    h = hashlib.sha256()
    for folder in folders:
        if folder is None or not Path(folder).is_dir():
            h.update(f"missing:{folder}".encode())
            continue
        for p, _ in _listing(folder, roots).files:
            st = p.stat()
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def guarded_fingerprint(folder: str, reg_folder: str = "", control_folder: str = "") -> str:
    """``folder_fingerprint`` of the Dataset node's folders (``control_folder``: one control folder a line) after
    the path guard; a refused or unlistable folder gives its error text (the node's run then reports the error)."""
    try:
        roots, f, r = paths.dataset_folders(folder, reg_folder)
        return folder_fingerprint(f, r, *paths.control_folders(control_folder), roots=roots)
    except (paths.PathRefused, DataError) as e:
        return f"error: {e}"


def control_images(control_folder: Path, roots: paths.Roots | None = None) -> dict[str, Path]:
    """Image stem -> control image, from the images directly in ``control_folder`` (listed by ``paths.walk``:
    links out of ``roots`` are skipped unread). Two images with one stem (a.png, a.jpg) are a DataError."""
    listing = _listing(control_folder, roots)
    out: dict[str, Path] = {}
    for p, depth in listing.files:
        if depth or p.suffix.lower() not in IMAGE_EXTS:
            continue
        if p.stem in out:
            raise DataError(f"control folder {control_folder} has two images named {p.stem!r} ({out[p.stem].name}, "
                            f"{p.name}); keep one control image per training image.")
        out[p.stem] = p
    return out


def _control_for(path: Path, controls: dict[str, Path], control_folder: Path) -> tuple[str, str]:
    c = controls.get(path.stem)
    if c is None:
        raise DataError(f"no control image for {path}: the control folder {control_folder} needs an image named "
                        f"{path.stem!r} ({', '.join(sorted(IMAGE_EXTS))}), the input image this target was edited "
                        "from.")
    try:
        load_image(c)
    except DataError as e:
        raise DataError(f"control image for {path}: {e}") from None
    return str(c), file_sha(c)


def _control_folder_list(control_folder) -> tuple[Path, ...]:
    """``control_folder`` (None, one folder or a sequence of folders) as a tuple; a folder named twice is refused."""
    if control_folder is None:
        return ()
    folders = (Path(control_folder),) if isinstance(control_folder, (str, Path)) else tuple(map(Path, control_folder))
    for k, f in enumerate(folders):
        if any(Path(f).resolve() == Path(g).resolve() for g in folders[:k]):
            raise DataError(f"control folder {f} is given twice; list each control folder once (one per line), in "
                            "the order the model gets its images.")
    return folders


def from_folder(folder: Path, caption_cfg: CaptionConfig, bucket_cfg: BucketConfig, flip: bool = False,
                seed: int = 0, reg_folder: Path | None = None, reg_weight: float = 1.0,
                roots: paths.Roots | None = None, control_folder=None) -> Dataset:
    """A dataset from ``folder`` (and ``reg_folder``); with ``roots``, links inside the folders that lead
    outside those roots are skipped unread (the node passes the roots its path guard allowed). With
    ``control_folder`` (image-edit training: a folder, or a sequence of folders) every image of ``folder`` is paired
    with the control image of the same file stem directly in each folder (``control_images``), in folder order;
    regularization images have none."""
    caption_cfg.validate()
    if not math.isfinite(reg_weight) or reg_weight < 0:
        raise DataError(f"reg_weight must be a finite number >= 0 (got {reg_weight}); 1.0 weighs regularization "
                        "images like training images.")
    buckets = make_buckets(bucket_cfg)
    b = _Builder(caption_cfg, bucket_cfg, flip, seed)
    cfolders = _control_folder_list(control_folder)
    listed = [control_images(f, roots) for f in cfolders]
    for root, is_reg in ((folder, False), (reg_folder, True)):
        if root is None:
            continue
        found = scan_folder(root, roots, b.notes)
        for path, repeats in found:
            try:
                img = load_image(path)
            except Unsupported as e:
                b.notes.append(f"skipped: {e}")
                continue
            caption = read_caption(path)
            pairs = [] if is_reg else [_control_for(path, c, f) for c, f in zip(listed, cfolders)]
            control = (tuple(p for p, _ in pairs), tuple(s for _, s in pairs))
            b.add(str(path), file_sha(path), img.size, caption, repeats, is_reg, buckets, control)
        if not any(i.is_reg == is_reg for i in b.items):
            skipped = [n for n in b.notes if n.startswith("skipped")]
            raise DataError(f"dataset folder {root} has no images to train on ({', '.join(sorted(IMAGE_EXTS))}); "
                            "put images (with .txt captions) in it or in N_name subfolders."
                            + (f" Skipped: {'; '.join(skipped[:5])}" if skipped else ""))
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
