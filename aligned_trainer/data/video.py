"""Video datasets: a folder of clips (mp4, webm, mov, mkv, animated gif, or a sub-folder of numbered frames)
with captions, optionally mixed with still images (one-frame samples, as the reference video trainers allow).

Each clip gives one sample of ``VideoConfig.frames`` frames (or, with ``frame_buckets``, of the longest bucket
count the clip covers) taken at ``VideoConfig.fps`` from its start: the
frame shown at time ``i / fps`` (the last frame whose timestamp is at or before it), so a 30 fps clip is
resampled to 16 fps by timestamps and a variable-frame-rate clip is read by its real timestamps. The frame
count is rounded down to what the VAE accepts (Wan: ``4k + 1``). A frame folder is read at
``VideoConfig.frame_folder_fps``; its caption is the ``.txt`` file named like the folder.

Bad clips raise one ``DataError`` naming the file and the fix: unreadable or empty files, and clips shorter than
the sample needs. Clips are decoded with PyAV (``av``, one of ComfyUI's requirements).
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import paths
from .buckets import BucketConfig, crop_box, make_buckets
from .captions import CaptionConfig
from .dataset import REPEAT_DIR, Dataset, Item, _Builder, _finish, _listing, read_caption
from .images import IMAGE_EXTS, DataError, Unsupported, file_sha, load_image, to_rgb, unsupported

VIDEO_EXTS = {".mp4", ".webm", ".mov", ".mkv", ".gif"}
FRAME_EXTS = IMAGE_EXTS - {".gif"}
TIME_EPS = 1e-6


@dataclass(frozen=True)
class VideoConfig:
    frames: int = 17               # frames per clip sample; rounded down to frame_multiple * k + 1
    fps: float = 16.0              # frames are taken at this rate (Wan 2.1 / 2.2 T2V: 16 fps)
    frame_multiple: int = 4        # the VAE's temporal compression: it takes frame_multiple * k + 1 frames
    frame_folder_fps: float = 16.0  # the rate a folder of frames was captured at
    images: bool = True            # still images in the folder become one-frame samples
    frame_buckets: tuple[int, ...] = ()  # frame counts to bucket clips by (each: the longest it covers); () = frames

    def validate(self) -> None:
        for name in ("fps", "frame_folder_fps"):
            v = getattr(self, name)
            if not math.isfinite(v) or v <= 0:
                raise DataError(f"video {name} must be a finite number > 0 (got {v}); Wan trains at 16 fps.")
        if self.frame_multiple < 1:
            raise DataError(f"frame_multiple must be >= 1 (got {self.frame_multiple}); Wan's VAE uses 4.")
        if self.frames < 1:
            raise DataError(f"video frames must be >= 1 (got {self.frames}); Wan takes 4k+1 frames (17, 33, 81).")
        bad = [b for b in self.frame_buckets if not isinstance(b, int) or isinstance(b, bool) or b < 1]
        if bad:
            raise DataError(f"frame_buckets must be frame counts >= 1 (got {bad[0]!r}); e.g. 17, 33, 49 for Wan.")

    def rounded(self, frames: int) -> int:
        """``frames`` rounded down to what the VAE accepts (``frame_multiple * k + 1``)."""
        return (frames - 1) // self.frame_multiple * self.frame_multiple + 1

    @property
    def frame_count(self) -> int:
        """``frames`` rounded down to what the VAE accepts (``frame_multiple * k + 1``)."""
        return self.rounded(self.frames)

    @property
    def frame_counts(self) -> tuple[int, ...]:
        """The frame counts a clip may be sampled at, longest first: the buckets (rounded, without repeats), or
        ``frame_count`` alone."""
        return tuple(sorted({self.rounded(b) for b in self.frame_buckets} or {self.frame_count}, reverse=True))


def parse_frame_buckets(text: str) -> tuple[int, ...]:
    """``"17, 33 49"`` -> (17, 33, 49); an entry that is not a whole number raises a DataError naming it."""
    out = []
    for part in text.replace(",", " ").split():
        try:
            out.append(int(part))
        except ValueError:
            raise DataError(f"frame_buckets: {part!r} is not a whole number; give frame counts separated by commas, "
                            "e.g. 17, 33, 49 (or leave it empty to use frames).") from None
    return tuple(out)


@dataclass(frozen=True)
class Clip:
    """A clip as decoded: its frames' timestamps (seconds from the first frame), size, and kind."""
    source: str
    kind: str                      # "video" (a file PyAV reads) or "frames" (a folder of images)
    times: tuple[float, ...]
    size: tuple[int, int]
    files: tuple[str, ...] = ()    # the frame files of a frame folder, in order

    @property
    def duration(self) -> float:
        """Seconds covered: the last timestamp plus one typical frame interval."""
        if len(self.times) < 2:
            return 0.0
        step = float(np.median(np.diff(self.times)))
        return self.times[-1] + step


def sample_indices(times: tuple[float, ...], fps: float, count: int) -> tuple[int, ...] | None:
    """Source frame index shown at ``i / fps`` for ``i < count`` (the last frame at or before that time), or None
    when the clip ends before the last of them."""
    if not times or (count > 1 and len(times) < 2):
        return None
    last_needed = (count - 1) / fps
    step = float(np.median(np.diff(times))) if len(times) > 1 else math.inf
    if count > 1 and last_needed > times[-1] + step - TIME_EPS:
        return None
    arr = np.asarray(times)
    return tuple(int(np.searchsorted(arr, i / fps + TIME_EPS, side="right") - 1) for i in range(count))


def _decode_error(path: Path, e: Exception) -> DataError:
    return DataError(f"cannot read video {path}: {e}. Re-encode it (e.g. ffmpeg -i in -c:v libx264 -pix_fmt yuv420p "
                     "out.mp4) or remove it from the dataset folder.")


def _open_video(path: Path):
    import av

    box = av.open(str(path))
    if not box.streams.video:
        box.close()
        raise DataError(f"video {path} has no video stream; remove it from the dataset folder.")
    return box, box.streams.video[0]


def _video_times(path: Path) -> tuple[float, ...]:
    """Presentation times of every frame (seconds from the first), from the packets (nothing decoded)."""
    try:
        box, stream = _open_video(path)
        with box:
            times = sorted(float(p.pts * p.time_base) for p in box.demux(stream) if p.pts is not None and p.size)
    except DataError:
        raise
    except Exception as e:  # av.error.* (invalid data, unknown format), OSError
        raise _decode_error(path, e) from None
    if not times:
        raise DataError(f"video {path} has no frames; re-export it or remove it from the dataset folder.")
    return tuple(t - times[0] for t in times)


def _video_frames(path: Path, keep: set[int]) -> dict[int, Image.Image]:
    """The decoded frames at the indices in ``keep`` (presentation order), as RGB images."""
    frames = {}
    try:
        box, stream = _open_video(path)
        with box:
            for i, frame in enumerate(box.decode(stream)):
                if i in keep:
                    frames[i] = to_rgb(frame.to_image())
                if i >= max(keep):
                    break
    except DataError:
        raise
    except Exception as e:
        raise _decode_error(path, e) from None
    return frames


def probe(path: Path, folder_fps: float, frame_files: list[Path] | None = None) -> Clip:
    """Read a clip's timestamps and size (a video file, or a folder of frames read at ``folder_fps``).
    ``frame_files``: a frame folder's frames as the guarded listing found them (links leading outside the
    allowed folders already left out); None lists the folder here (engine callers with a trusted folder)."""
    path = Path(path)
    if path.is_dir():
        listed = path.iterdir() if frame_files is None else frame_files
        files = sorted(p for p in listed if p.is_file() and p.suffix.lower() in FRAME_EXTS)
        if not files:
            raise DataError(f"frame folder {path} has no frames ({', '.join(sorted(FRAME_EXTS))}); put the clip's "
                            "frames in it as numbered images, or remove the folder.")
        size = load_image(files[0]).size
        return Clip(str(path), "frames", tuple(i / folder_fps for i in range(len(files))), size,
                    tuple(str(f) for f in files))
    times = _video_times(path)
    first = _video_frames(path, keep={0})
    if 0 not in first:
        raise DataError(f"video {path} has no frame that decodes; re-export it or remove it from the dataset folder.")
    return Clip(str(path), "video", times, first[0].size)


def clip_frames(clip: Clip, indices: tuple[int, ...]) -> list[Image.Image]:
    """The frames at ``indices`` (RGB, original size)."""
    if clip.kind == "frames":
        cache: dict[int, Image.Image] = {}
        return [cache.setdefault(i, load_image(Path(clip.files[i]))) for i in indices]
    frames = _video_frames(Path(clip.source), keep=set(indices))
    missing = sorted(set(indices) - set(frames))
    if missing:
        raise DataError(f"video {clip.source} ended before frame {missing[0]} while it was read again; it changed "
                        "after the Dataset node read it: run the graph again.")
    return [frames[i] for i in indices]


def clip_sha(clip: Clip) -> str:
    if clip.kind == "video":
        return file_sha(Path(clip.source))
    h = hashlib.sha256()
    for f in clip.files:
        h.update(Path(f).name.encode() + b"\0" + bytes.fromhex(file_sha(Path(f))))
    return h.hexdigest()


@dataclass(frozen=True)
class VideoDataset(Dataset):
    """A Dataset whose items are clips (and one-frame images); ``plans`` maps an item's source to its clip and
    the source frame indices it trains on."""
    video: VideoConfig = VideoConfig()
    plans: tuple[tuple[str, Clip | None, tuple[int, ...]], ...] = ()

    def plan(self, item: Item) -> tuple[Clip | None, tuple[int, ...]]:
        for source, clip, idx in self.plans:
            if source == item.source:
                return clip, idx
        return None, (0,)

    def frames(self, item: Item) -> list[Image.Image]:
        """The item's frames, resized and cropped to its bucket (mirrored when ``flip``)."""
        clip, idx = self.plan(item)
        if clip is None:
            return [self.pixels(item)]
        if clip_sha(clip) != item.sha:
            raise DataError(f"clip {clip.source} changed after the Dataset node read it; run the graph again so the "
                            "dataset (and its cache keys) are rebuilt.")
        (rw, rh), box = crop_box(clip.size, item.bucket)
        out = []
        for img in clip_frames(clip, idx):
            img = img.resize((rw, rh), Image.Resampling.LANCZOS).crop(box)
            out.append(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if item.flip else img)
        return out

    def vae_input(self, item: Item) -> torch.Tensor:
        return torch.from_numpy(np.stack([np.asarray(f, dtype=np.float32) / 255.0 for f in self.frames(item)]))

    def check_vae(self, vae) -> None:
        """Refuse a VAE that cannot encode these clips: an image VAE, or other temporal compression."""
        longest = max((len(idx) for _, _, idx in self.plans), default=1)
        formula = getattr(vae, "downscale_index_formula", None)
        temporal = formula[0] if getattr(vae, "latent_dim", 2) == 3 and formula else None
        if longest > 1 and temporal is None:
            raise DataError(f"this VAE ({type(vae.first_stage_model).__name__}) encodes still images, but the video "
                            f"dataset has {longest}-frame clips; connect the video model's VAE (e.g. the Wan 2.1 VAE).")
        if temporal and temporal != self.video.frame_multiple:
            raise DataError(f"this VAE compresses {temporal} frames into one, but the dataset was sampled for "
                            f"{self.video.frame_multiple}; its clips need {temporal}k+1 frames.")

    def sampling_key(self, item: Item) -> str:
        clip, idx = self.plan(item)
        if clip is None:
            return ""
        return f"{clip.kind}|frames={','.join(map(str, idx))}|fps={self.video.fps}"

    def report(self) -> dict:
        rep = super().report()
        frames = Counter(len(idx) for _, _, idx in self.plans)
        rep["clips"] = sum(1 for _, c, _ in self.plans if c is not None)
        rep["per_frame_count"] = {str(k): v for k, v in sorted(frames.items())}
        rep["video"] = {"frames": self.video.frame_count, "fps": self.video.fps}
        if self.video.frame_buckets:
            rep["video"]["frame_buckets"] = list(self.video.frame_counts[::-1])
        return rep


def scan_video_folder(folder: Path, roots: paths.Roots | None, notes: list,
                      frame_files: dict[Path, list[Path]] | None = None) -> list[tuple[Path, int]]:
    """(clip or image, repeats): video files and images in the folder and its ``N_name`` sub-folders, and other
    sub-folders of the folder as frame folders. ``frame_files`` receives each frame folder's frames as listed
    (links that lead outside ``roots`` skipped, and noted in ``notes``)."""
    out, frame_dirs = [], {} if frame_files is None else frame_files
    listing = _listing(folder, roots)
    notes.extend(listing.notes)
    for p, depth in listing.files:
        ext = p.suffix.lower()
        parent_repeat = REPEAT_DIR.match(p.parent.name) if depth else None
        if depth and not parent_repeat:
            if ext in FRAME_EXTS:
                frame_dirs.setdefault(p.parent, []).append(p)
            continue
        if ext in VIDEO_EXTS or ext in IMAGE_EXTS:
            out.append((p, int(parent_repeat.group(1)) if parent_repeat else 1))
        elif (why := unsupported(p)):
            notes.append(f"skipped: {p}: {why}")
    out.extend((d, 1) for d in frame_dirs)
    return sorted(out)


def from_video_folder(folder: Path, caption_cfg: CaptionConfig, bucket_cfg: BucketConfig, video: VideoConfig,
                      flip: bool = False, seed: int = 0, roots: paths.Roots | None = None,
                      reg_folder: str | None = None) -> VideoDataset:
    """A video dataset from ``folder``: every clip sampled to ``video.frame_count`` frames at ``video.fps``;
    still images as one-frame samples when ``video.images``."""
    if reg_folder:
        raise DataError(f"regularization folders are not supported for video datasets yet (got {reg_folder!r}); "
                        "clear reg_folder or set kind to images.")
    caption_cfg.validate()
    video.validate()
    counts = video.frame_counts
    buckets = make_buckets(bucket_cfg)
    b = _Builder(caption_cfg, bucket_cfg, flip, seed)
    plans, frame_files = [], {}
    for path, repeats in scan_video_folder(Path(folder), roots, b.notes, frame_files):
        ext = path.suffix.lower()
        if path.is_dir() or ext in VIDEO_EXTS:
            clip = probe(path, video.frame_folder_fps, frame_files.get(path))
            if len(clip.times) == 1 and ext == ".gif":  # a still GIF: an image
                clip = None
        else:
            clip = None
        if clip is None:
            if not video.images:
                b.notes.append(f"skipped: {path}: still image (images are off for this video dataset)")
                continue
            try:
                size = load_image(path).size
            except Unsupported as e:
                b.notes.append(f"skipped: {e}")
                continue
            b.add(str(path), file_sha(path), size, read_caption(path), repeats, False, buckets)
            plans.append((str(path), None, (0,)))
            continue
        # the longest frame bucket the clip covers (clips of one count and bucket batch together)
        idx = next((i for i in (sample_indices(clip.times, video.fps, c) for c in counts) if i is not None), None)
        if idx is None:
            count = counts[-1]
            need = (count - 1) / video.fps
            raise DataError(
                f"clip {path} is too short: {len(clip.times)} frames over {clip.duration:.2f} s, but {count} frames "
                f"at {video.fps:g} fps need {need + 1 / video.fps:.2f} s. Lower the frame count or the fps, or remove "
                "the clip from the dataset folder.")
        b.add(clip.source, clip_sha(clip), clip.size, read_caption(path), repeats, False, buckets)
        plans.append((clip.source, clip, idx))
    if not b.items:
        raise DataError(f"dataset folder {folder} has no clips to train on ({', '.join(sorted(VIDEO_EXTS))}, or "
                        "sub-folders of frames); put clips (with .txt captions) in it.")
    ds = _finish(b, 1.0)
    h = hashlib.sha256(ds.hash.encode())
    h.update(repr((video, [(s, idx) for s, _, idx in plans])).encode())
    return VideoDataset(ds.items, ds.caption_cfg, ds.bucket_cfg, ds.reg_weight, ds.notes, ds.graph_images,
                        h.hexdigest()[:16], video=video, plans=tuple(plans))
