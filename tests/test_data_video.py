"""Video datasets (aligned_trainer/data/video.py): clips of every supported format, written with PyAV at test
time, decode to the frame count the VAE accepts at the target fps, resampled by timestamps; images mix in as
one-frame samples; bad clips raise one clear error naming the file."""
from __future__ import annotations

import math

import pytest

from support.factories import clips

FORMATS = {".mp4": 30, ".webm": 30, ".mkv": 30, ".gif": 20, "": 30}  # "" = a folder of PNG frames; source fps


@pytest.fixture(scope="module")
def V(comfy):
    class NS:
        video = comfy.engine("data.video")
        caps = comfy.engine("data.captions")
        bk = comfy.engine("data.buckets")
        images = comfy.engine("data.images")
    return NS


def _dataset(V, folder, **video):
    cfg = V.video.VideoConfig(**video)
    return V.video.from_video_folder(folder, V.caps.CaptionConfig(), V.bk.BucketConfig(
        resolution=32, min_side=32, max_side=32, step=32), cfg)


@pytest.mark.parametrize("ext", FORMATS, ids=lambda e: e or "frames")
def test_each_format_gives_vae_frame_count_at_target_fps(V, tmp_path, ext):
    """30 frames at 30 fps (GIF: 20 fps, as GIF delays are whole centiseconds) sampled at 16 fps: frames=12 is
    rounded down to 9 (4k+1), and frame i is the source frame shown at i/16 s."""
    src = FORMATS[ext]
    clips.write_clip(tmp_path / "data" / f"clip{ext}", 30, src)
    ds = _dataset(V, tmp_path / "data", frames=12, fps=16.0, frame_folder_fps=float(src))
    assert len(ds.items) == 1 and ds.video.frame_count == 9
    item = ds.items[0]
    frames = ds.frames(item)
    expected = [math.floor(i * src / 16 + 1e-9) for i in range(9)]
    assert [clips.frame_index(f) for f in frames] == expected
    pixels = ds.vae_input(item)
    assert tuple(pixels.shape) == (9, 32, 32, 3) and 0.0 <= float(pixels.min()) <= float(pixels.max()) <= 1.0
    assert ds.items[0].captions == ("a clip",)
    assert ds.report()["per_frame_count"] == {"9": 1}
    # a faster target rate needs a longer clip; the sampling (and so the cache key) changes with the fps
    half = _dataset(V, tmp_path / "data", frames=5, fps=8.0, frame_folder_fps=float(src))
    assert [clips.frame_index(f) for f in half.frames(half.items[0])] == [math.floor(i * src / 8 + 1e-9) for i in range(5)]
    assert half.sampling_key(half.items[0]) != ds.sampling_key(item)


def test_images_mix_in_as_one_frame_samples(V, tmp_path):
    from PIL import Image

    clips.write_clip(tmp_path / "data" / "walk.mp4", 12, 16)
    Image.fromarray(clips.frame(3)).save(tmp_path / "data" / "still.png")
    (tmp_path / "data" / "still.txt").write_text("a still", encoding="utf-8")
    ds = _dataset(V, tmp_path / "data", frames=5)
    shapes = {i.source.rsplit("/", 1)[-1]: tuple(ds.vae_input(i).shape) for i in ds.items}
    assert shapes == {"walk.mp4": (5, 32, 32, 3), "still.png": (1, 32, 32, 3)}
    assert ds.report()["per_frame_count"] == {"1": 1, "5": 1} and ds.report()["clips"] == 1
    off = _dataset(V, tmp_path / "data", frames=5, images=False)
    assert [i.source.rsplit("/", 1)[-1] for i in off.items] == ["walk.mp4"]
    assert any("still.png" in n for n in off.notes)


@pytest.mark.parametrize("case", ["unreadable", "too_short", "no_frames"])
def test_bad_clip_raises_one_clear_error(V, tmp_path, case):
    data = tmp_path / "data"
    if case == "unreadable":
        data.mkdir()
        bad = data / "broken.mp4"
        bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
        fix = "Re-encode it"
    elif case == "too_short":
        bad = clips.write_clip(data / "short.webm", 5, 30)  # 0.17 s; 9 frames at 16 fps need 0.56 s
        fix = "Lower the frame count or the fps"
    else:
        data.mkdir()
        bad = data / "empty.gif"
        bad.write_bytes(b"GIF89a")
        fix = "Re-encode it"
    clips.write_clip(data / "fine.mp4", 30, 30)
    with pytest.raises(V.images.DataError) as e:
        _dataset(V, data, frames=9)
    msg = str(e.value)
    assert str(bad) in msg and fix in msg and "fine.mp4" not in msg


@pytest.mark.parametrize("bad", [dict(fps=0.0), dict(fps=float("nan")), dict(frames=0), dict(frame_folder_fps=-1.0)])
def test_video_settings_are_checked(V, tmp_path, bad):
    clips.write_clip(tmp_path / "data" / "c.mp4", 30, 30)
    with pytest.raises(V.images.DataError, match=next(iter(bad))):
        _dataset(V, tmp_path / "data", **bad)
