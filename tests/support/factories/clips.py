"""Short test clips written with PyAV at test time (mp4, webm, gif) or as folders of PNG frames.

Frame ``i`` is one flat grey ``i * STEP`` (plus a small gradient, so encoders have something to code), so the
frame a dataset picked can be read back from its mean value even after lossy coding: ``frame_index``.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

STEP = 8          # grey levels between consecutive frames (at most 30 frames: 0..232)
CODECS = {".mp4": ("mpeg4", "yuv420p"), ".webm": ("libvpx", "yuv420p"), ".gif": ("gif", "rgb8"),
          ".mkv": ("libx264", "yuv420p")}


def frame(i: int, size: tuple[int, int] = (48, 32)) -> np.ndarray:
    w, h = size
    base = np.full((h, w, 3), i * STEP, dtype=np.int16)
    base[..., 2] += (np.arange(w) % 4)[None, :].astype(np.int16)  # a faint texture
    return base.clip(0, 255).astype(np.uint8)


def encoded_clips(vae, n: int = 4, frames: int = 5, size: tuple[int, int] = (32, 32)) -> list:
    """Latents of ``n`` generated clips of ``frames`` frames (clip i: frames i*frames ...) through ``vae`` (a
    ComfyUI VAE), as the video validation-figure scripts use them."""
    import torch

    out = []
    for i in range(n):
        pixels = torch.stack([torch.from_numpy(frame(i * frames + k, size)).float() / 255 for k in range(frames)])
        with torch.no_grad():
            out.append(vae.encode(pixels)[0])
    return out


def write_clip(path: Path, n: int, fps: int, size: tuple[int, int] = (48, 32), caption: str | None = "a clip") -> Path:
    """A clip of ``n`` frames at ``fps`` (constant rate), or a folder of PNG frames when ``path`` has no suffix."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    if not path.suffix:
        path.mkdir()
        for i in range(n):
            Image.fromarray(frame(i, size)).save(path / f"{i:04d}.png")
        return path
    codec, pix = CODECS[path.suffix]
    with av.open(str(path), "w") as box:
        s = box.add_stream(codec, rate=Fraction(fps))
        s.width, s.height, s.pix_fmt = size[0], size[1], pix
        if codec == "mpeg4":
            s.options = {"qscale": "2"}
        elif codec == "libvpx":
            s.options = {"crf": "4", "b": "2M"}
        elif codec == "libx264":
            s.options = {"crf": "1"}
        for i in range(n):
            vf = av.VideoFrame.from_ndarray(frame(i, size), format="rgb24")
            for packet in s.encode(vf):
                box.mux(packet)
        for packet in s.encode():
            box.mux(packet)
    return path


def frame_index(img) -> int:
    """The source frame index a (possibly lossy, resized) frame was made from."""
    return int(round(float(np.asarray(img, dtype=np.float32)[..., :2].mean()) / STEP))
