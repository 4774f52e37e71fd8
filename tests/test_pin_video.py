"""Video dataset options pinned (issue #26) against an independent computation on clips written at test time:
``frame_buckets`` (each clip trains at the longest bucket, rounded down to 4k+1, whose last frame, shown at
(count - 1) / fps seconds, lies inside the clip; a clip exactly that long is too short for it), ``fps`` (frame i
is the source frame shown at i / fps: index floor(i * source fps / fps)), ``frame_folder_fps`` (a folder of
frames is timed at that rate) and the frame count per clip in the dataset's report."""
from __future__ import annotations

import dataclasses
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from support.factories import clips

FPS = 16


@pytest.fixture(scope="module")
def V(comfy):
    class NS:
        video = comfy.engine("data.video")
        caps = comfy.engine("data.captions")
        bk = comfy.engine("data.buckets")
    return NS


def _expected(n: int, src: int, buckets: tuple[int, ...]) -> list[int] | None:
    """Source indices of a clip of n frames at src fps sampled at FPS, at the longest bucket it covers."""
    for c in sorted({b - (b - 1) % 4 for b in buckets}, reverse=True):
        if Fraction(c - 1, FPS) < Fraction(n, src):
            return [i * src // FPS for i in range(c)]
    return None


def test_frame_buckets_pick_the_longest_count_each_clip_covers_at_the_target_fps(V, tmp_path):
    data = tmp_path / "data"
    # (name, frames, source fps); "" = a folder of PNG frames, timed at frame_folder_fps
    made = [("a.mp4", 7, 24), ("edge.mp4", 12, 24), ("b.mp4", 13, 24), ("c.mp4", 25, 24), ("d", 30, 32)]
    for name, n, src in made:
        clips.write_clip(data / name, n, src, size=(32, 32))
    (data / "d" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # only images are frames (this one sorts first)
    clips.write_clip(data / "2_more" / "e.mp4", 9, 16, size=(32, 32))  # kohya's N_name folder: 2 repeats
    made.append(("e.mp4", 9, 16))
    buckets = V.video.parse_frame_buckets("5, 9, 12 17")
    cfg = V.video.VideoConfig(frames=5, fps=float(FPS), frame_folder_fps=32.0, frame_buckets=buckets)
    ds = V.video.from_video_folder(data, V.caps.CaptionConfig(), V.bk.BucketConfig(
        resolution=32, min_side=32, max_side=32, step=32), cfg)
    got = {i.source.rsplit("/", 1)[-1]: list(ds.plan(i)[1]) for i in ds.items}
    want = {name: _expected(n, src, buckets) for name, n, src in made}
    assert got == want, got
    # the edge clip (12 frames at 24 fps: 0.5 s) is exactly as long as 9 frames at 16 fps need: it gets 5
    assert len(got["edge.mp4"]) == 5 and len(got["b.mp4"]) == 9 and len(got["c.mp4"]) == 17
    assert ds.report()["per_frame_count"] == {str(k): v for k, v in sorted(Counter(map(len, want.values())).items())}
    assert ds.report()["video"]["frame_buckets"] == [5, 9, 17]
    assert {i.source.rsplit("/", 1)[-1]: i.repeats for i in ds.items} == {n: 2 if n == "e.mp4" else 1 for n in got}
    assert not any(i.is_reg for i in ds.items) and ds.reg_weight == 1.0
    # the dataset's hash (its cache identity) sees the sampling: another fps, another hash
    other = V.video.from_video_folder(data, V.caps.CaptionConfig(), V.bk.BucketConfig(
        resolution=32, min_side=32, max_side=32, step=32), dataclasses.replace(cfg, fps=20.0))
    assert other.hash != ds.hash
    # the frames read are those source frames (decoded, read back from their grey level)
    item = next(i for i in ds.items if i.source.endswith("c.mp4"))
    assert [clips.frame_index(f) for f in ds.frames(item)] == want["c.mp4"]
    folder = next(i for i in ds.items if i.source.endswith("/d"))
    frames = ds.frames(folder)
    assert [clips.frame_index(f) for f in frames] == want["d"]
    pixels = ds.vae_input(folder)  # (frames, H, W, 3) floats: the 8-bit values / 255
    assert pixels.dtype == torch.float32
    torch.testing.assert_close(pixels, torch.from_numpy(np.stack([np.asarray(f) for f in frames])).float() / 255)
    assert ds.report()["clips"] == len(made)
    # a frame folder's hash sees its frames' contents
    clip = ds.plan(folder)[0]
    before = V.video.clip_sha(clip)
    Image.fromarray(clips.frame(3, (32, 32))).save(data / "d" / "0000.png")
    assert V.video.clip_sha(clip) != before
    # a clip shorter than the smallest bucket: refused with its length and what the count needs
    clips.write_clip(tmp_path / "short" / "s.mp4", 3, 24, size=(32, 32))
    with pytest.raises(V.video.DataError) as e:
        V.video.from_video_folder(tmp_path / "short", V.caps.CaptionConfig(), V.bk.BucketConfig(
            resolution=32, min_side=32, max_side=32, step=32), cfg)
    assert "3 frames over 0.12 s, but 5 frames at 16 fps need 0.31 s" in str(e.value)  # 3/24 s; 5/16 s
    with pytest.raises(ValueError, match="variants must be >= 1"):  # the caption settings are checked as well
        V.video.from_video_folder(data, V.caps.CaptionConfig(variants=0), V.bk.BucketConfig(
            resolution=32, min_side=32, max_side=32, step=32), cfg)


def _last_at_or_before(times, t):
    return max(i for i, x in enumerate(times) if x <= t + 1e-9)


def test_sample_indices_and_clip_timing_by_hand(V):
    """``sample_indices`` on timestamps given by hand (a variable-frame-rate clip, one-frame and two-frame clips, a
    clip exactly as long as the count needs) against the last frame shown at or before i / fps; a clip's duration
    (its last timestamp plus the median frame interval) and fps."""
    si = V.video.sample_indices
    vfr = (0.0, 0.1, 0.15, 0.4, 0.5)
    assert si(vfr, 10.0, 5) == tuple(_last_at_or_before(vfr, i / 10) for i in range(5)) == (0, 1, 2, 2, 3)
    assert si((), 16.0, 1) is None and si((0.0,), 16.0, 1) == (0,) and si((0.0,), 16.0, 2) is None
    two = (0.0, 1 / 30)  # 2 frames at 30 fps cover 1/15 s: 5 frames at 16 fps need 0.25 s
    assert si(two, 16.0, 5) is None and si(two, 16.0, 2) == (0, 1)
    assert si((0.0, 0.01), 16.0, 2) is None  # 2 frames at 100 fps: the second one at 16 fps (1/16 s) is past it
    eight = tuple(i / 8 for i in range(8))  # 8 frames at 8 fps: 1 s
    assert si(eight, 16.0, 17) is None  # the 17th frame is shown at 1 s: the clip has ended
    assert si(eight, 16.0, 16) == tuple(i // 2 for i in range(16))
    clip = V.video.Clip("c.mp4", "video", (0.0, 0.25, 0.5), (8, 8))
    assert clip.duration == 0.75
    assert V.video.Clip("c.mp4", "video", (0.0,), (8, 8)).duration == 0.0
    assert V.video.Clip("c.mp4", "video", (0.0, 0.5), (8, 8)).duration == 1.0


def test_video_settings_at_their_edges(V):
    VC = V.video.VideoConfig
    for ok in (dict(frames=1), dict(frame_multiple=1, frames=8), dict(frame_buckets=(1, 5)), dict(fps=0.5),
               dict(frame_folder_fps=0.5)):
        VC(**ok).validate()
    for bad, word in ((dict(frames=0), "frames"), (dict(frame_multiple=0), "frame_multiple"),
                      (dict(frame_buckets=(5, 0)), "frame_buckets"), (dict(frame_buckets=(True,)), "frame_buckets"),
                      (dict(frame_buckets=(5.0,)), "frame_buckets"), (dict(fps=float("inf")), "fps"),
                      (dict(frame_folder_fps=0.0), "frame_folder_fps")):
        with pytest.raises(V.video.DataError, match=word):
            VC(**bad).validate()
    # frames rounded down to frame_multiple * k + 1, by hand
    assert [VC(frames=n).frame_count for n in (1, 4, 5, 8, 9, 12)] == [1, 1, 5, 5, 9, 9]
    assert VC(frames=8, frame_multiple=1).frame_count == 8
    assert VC(frames=5, frame_buckets=(12, 9, 1)).frame_counts == (9, 1)


def test_still_gif_is_an_image_and_the_vae_must_match_the_clips(V, sd15, tmp_path):
    """A one-frame GIF is a still image (one-frame sample, no clip). check_vae: the image VAE (SD1.5's) is
    refused for clips of more than one frame and accepted for one-frame samples; the Wan 2.1 VAE (4 frames in one)
    is accepted for clips sampled for frame_multiple 4 and refused, naming both, for another multiple."""
    from support.factories import wan

    bcfg = V.bk.BucketConfig(resolution=32, min_side=32, max_side=32, step=32)
    clips.write_clip(tmp_path / "still" / "one.gif", 1, 10, size=(32, 32))
    still = V.video.from_video_folder(tmp_path / "still", V.caps.CaptionConfig(), bcfg, V.video.VideoConfig(frames=5))
    assert [still.plan(i) for i in still.items] == [(None, (0,))] and still.report()["clips"] == 0
    assert not still.items[0].is_reg
    clips.write_clip(tmp_path / "clip" / "c.mp4", 9, 16, size=(32, 32))
    ds = V.video.from_video_folder(tmp_path / "clip", V.caps.CaptionConfig(), bcfg, V.video.VideoConfig(frames=5))
    image_vae = sd15[2]
    still.check_vae(image_vae)
    with pytest.raises(V.video.DataError, match=r"this VAE \(AutoencoderKL\) encodes still images, but the video "
                                                r"dataset has 5-frame clips"):
        ds.check_vae(image_vae)
    Image.fromarray(clips.frame(2, (32, 32))).save(tmp_path / "clip" / "still.png")  # a clip and an image
    mixed = V.video.from_video_folder(tmp_path / "clip", V.caps.CaptionConfig(), bcfg, V.video.VideoConfig(frames=5))
    with pytest.raises(V.video.DataError, match="dataset has 5-frame clips"):
        mixed.check_vae(image_vae)
    pairs = V.video.from_video_folder(tmp_path / "clip", V.caps.CaptionConfig(), bcfg,
                                      V.video.VideoConfig(frames=2, frame_multiple=1))
    with pytest.raises(V.video.DataError, match="dataset has 2-frame clips"):
        pairs.check_vae(image_vae)
    wan_vae = wan.build_vae()
    ds.check_vae(wan_vae)
    with pytest.raises(V.video.DataError, match="compresses 4 frames into one, but the dataset was sampled for 8"):
        dataclasses.replace(ds, video=V.video.VideoConfig(frames=9, frame_multiple=8)).check_vae(wan_vae)
