"""sampling/animation.py pinned (issue #26): the animated WebP preview of a video sample, read back with PIL.
Every frame decodes to the input rounded to 8 bits (computed here with numpy), each frame lasts 1000 / fps ms,
the file loops forever, is numbered as ComfyUI's save nodes number files in ComfyUI's output folder, appears
only under its final name (written as a ``.part`` next to it), and bad input is refused before anything is
written. The UI entry has the shape of ComfyUI's SaveAnimatedWEBP output."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture
def A(comfy):
    return comfy.engine("sampling.animation")


def _frames(n: int, h: int = 6, w: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, h, w, 3, generator=g)


def _decoded(path: Path) -> tuple[list[np.ndarray], list[int], int]:
    with Image.open(path) as im:
        frames, durations = [], []
        for i in range(im.n_frames):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB")))
            durations.append(im.info.get("duration"))
        return frames, durations, im.info.get("loop")


def _expected(frames: torch.Tensor) -> list[np.ndarray]:
    arr = np.clip(frames.numpy().astype(np.float64), 0, 1) * 255.0
    return list(np.round(arr).astype(np.uint8))


def test_frames_are_lossless_timed_looping_and_numbered(A, comfy_dirs, monkeypatch):
    renames = []
    real = os.replace

    def replace(src, dst):
        renames.append((str(src), str(dst)))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    name = f"pin_{uuid.uuid4().hex[:8]}/clip"  # a folder no earlier save created (parents made on the way)
    frames = _frames(3)
    frames[0, 0, 0] = torch.tensor([1.7, -0.3, 0.5])  # out of range: clamped like a decoded image
    ref = A.save_webp(frames, name, 16)
    sub = f"aligned_trainer/previews/{name.split('/')[0]}"
    assert ref == {"filename": "clip_00001_.webp", "subfolder": sub, "type": "output"}
    path = comfy_dirs["output"] / sub / ref["filename"]
    got, durations, loop = _decoded(path)
    assert len(got) == 3 and all(np.array_equal(a, b) for a, b in zip(got, _expected(frames)))
    assert durations == [round(1000 / 16)] * 3 == [62] * 3 and loop == 0  # 62.5 ms rounds to even
    # written as a '.part' in the same folder, then renamed onto the final name
    (src, dst), = renames
    assert Path(src).parent == path.parent and src.endswith(".part") and Path(dst) == path
    # the next save of the same name takes the next counter; a slower clip gets longer frames
    second = A.save_webp(_frames(2, seed=1), name, 0.5)
    assert second["filename"] == "clip_00002_.webp" and second["subfolder"] == sub
    got2, durations2, _ = _decoded(path.parent / second["filename"])
    assert len(got2) == 2 and all(np.array_equal(a, b) for a, b in zip(got2, _expected(_frames(2, seed=1))))
    assert durations2 == [2000, 2000]
    assert sorted(p.name for p in path.parent.iterdir()) == ["clip_00001_.webp", "clip_00002_.webp"]


def test_one_frame_and_fps_of_one(A, comfy_dirs):
    frames = _frames(1, h=5, w=7, seed=2)  # a one-frame clip is still written (a still WebP)
    ref = A.save_webp(frames, f"pin_{uuid.uuid4().hex[:8]}", 16)
    got, _, _ = _decoded(comfy_dirs["output"] / ref["subfolder"] / ref["filename"])
    assert len(got) == 1 and got[0].shape == (5, 7, 3) and np.array_equal(got[0], _expected(frames)[0])
    ref = A.save_webp(_frames(2, seed=3), f"pin_{uuid.uuid4().hex[:8]}", 1)  # 1 fps is a valid rate
    assert _decoded(comfy_dirs["output"] / ref["subfolder"] / ref["filename"])[1] == [1000, 1000]


@pytest.mark.parametrize("fps", [0, -16, float("nan"), float("inf"), "16", None])
def test_bad_fps_refused(A, comfy_dirs, fps):
    with pytest.raises(ValueError, match="fps must be a finite number > 0"):
        A.save_webp(_frames(2), "never_written", fps)
    assert not list(comfy_dirs["output"].rglob("never_written*"))


@pytest.mark.parametrize("shape", [(0, 6, 10, 3), (6, 10, 3), (1, 2, 6, 10, 3)])
def test_bad_frame_shapes_refused(A, shape):
    with pytest.raises(ValueError, match=r"needs frames shaped \(F, H, W, 3\)"):
        A.save_webp(torch.zeros(shape), "never_written", 16)


def test_a_failed_encode_leaves_no_file(A, comfy_dirs):
    name = f"pin_{uuid.uuid4().hex[:8]}/too_wide"
    folder = comfy_dirs["output"] / "aligned_trainer" / "previews" / name.split("/")[0]
    folder.mkdir(parents=True)
    with pytest.raises(RuntimeError):  # WebP frames are at most 16383 pixels wide
        A.save_webp(torch.zeros(2, 1, 16384, 3), name, 16)
    assert list(folder.iterdir()) == []
    # the folder exists already: a save into it still works
    assert A.save_webp(_frames(2), name, 16)["filename"] == "too_wide_00001_.webp"


def test_ui_entry_is_shaped_like_save_animated_webp(A):
    refs = [{"filename": "a_00001_.webp", "subfolder": "s", "type": "output"}]
    out = A.ui(iter(refs))
    assert out == {"images": refs, "animated": (True,)}
