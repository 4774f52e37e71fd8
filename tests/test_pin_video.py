"""Video dataset options pinned (issue #26) against an independent computation on clips written at test time:
``frame_buckets`` (each clip trains at the longest bucket, rounded down to 4k+1, whose last frame, shown at
(count - 1) / fps seconds, lies inside the clip; a clip exactly that long is too short for it), ``fps`` (frame i
is the source frame shown at i / fps: index floor(i * source fps / fps)), ``frame_folder_fps`` (a folder of
frames is timed at that rate) and the frame count per clip in the dataset's report."""
from __future__ import annotations

from collections import Counter
from fractions import Fraction

import pytest

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
    # the frames read are those source frames (decoded, read back from their grey level)
    item = next(i for i in ds.items if i.source.endswith("c.mp4"))
    assert [clips.frame_index(f) for f in ds.frames(item)] == want["c.mp4"]
    folder = next(i for i in ds.items if i.source.endswith("/d"))
    assert [clips.frame_index(f) for f in ds.frames(folder)] == want["d"]
