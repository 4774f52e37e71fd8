"""data/summary.py pinned (issue #26): the dataset picker's counts (images, captions, unreadable files, images
per bucket) and its preview strip, against files written here whose contents the test knows. Bucket names are
those of the bucket engine (pinned in test_pin_data.py); what is checked here is how the summary counts them."""
from __future__ import annotations

from pathlib import Path

from PIL import Image


def _img(path: Path, size: tuple[int, int]) -> None:
    Image.new("RGB", size, (30, 60, 90)).save(path)


def _folder(tmp_path: Path) -> Path:
    """Six image files, sorted by name: an unreadable one first (with a caption), then readable ones, a second
    unreadable one among them, and a ``3_extra`` subfolder (repeats 3)."""
    folder = tmp_path / "set"
    sub = folder / "3_extra"
    sub.mkdir(parents=True)
    (folder / "a_bad.png").write_bytes(b"not an image at all")
    (folder / "a_bad.txt").write_text("caption of a broken file", encoding="utf-8")
    _img(folder / "b.png", (64, 64))
    (folder / "b.txt").write_text("  ohwx, a square \n", encoding="utf-8")
    _img(folder / "c.png", (64, 64))  # no caption
    _img(folder / "d.png", (192, 64))
    (folder / "d.txt").write_text("wide", encoding="utf-8")
    (folder / "e_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated header")
    _img(sub / "f.png", (64, 192))
    (sub / "f.txt").write_text("tall", encoding="utf-8")
    return folder


def _bucket(D, cfg, size) -> str:
    w, h = D.buckets.assign_bucket(size, D.buckets.make_buckets(cfg))
    return f"{w}x{h}"


def test_counts_every_image_caption_unreadable_file_and_bucket(D, comfy, tmp_path):
    summary = comfy.engine("data.summary")
    folder = _folder(tmp_path)
    cfg = D.buckets.BucketConfig(128, 64, 256, 64)
    square, wide, tall = (_bucket(D, cfg, s) for s in ((64, 64), (192, 64), (64, 192)))
    assert len({square, wide, tall}) == 3
    out = summary.folder_summary(str(folder), cfg)
    # every image file found counts, readable or not; a caption counts even when its image is unreadable
    assert out["images"] == 6
    assert out["captions"] == 4
    assert out["unreadable"] == 2
    # the files after an unreadable one are still read: two squares, one wide, one tall
    assert out["buckets"] == {square: 2, wide: 1, tall: 1}
    assert list(out["buckets"]) == sorted(out["buckets"])


def test_preview_strip_lists_readable_images_up_to_the_limit(D, comfy, tmp_path):
    summary = comfy.engine("data.summary")
    folder = _folder(tmp_path)
    cfg = D.buckets.BucketConfig(128, 64, 256, 64)
    full = summary.folder_summary(folder, cfg)
    files = sorted(s["file"] for s in full["shown"])
    assert files == ["3_extra/f.png", "b.png", "c.png", "d.png"]  # the unreadable ones are not shown
    by_file = {s["file"]: s for s in full["shown"]}
    assert by_file["b.png"] == {"file": "b.png", "caption": "ohwx, a square", "size": [64, 64],
                                "bucket": _bucket(D, cfg, (64, 64)), "repeats": 1}
    assert by_file["c.png"]["caption"] == ""
    assert by_file["d.png"]["caption"] == "wide" and by_file["d.png"]["size"] == [192, 64]
    assert by_file["3_extra/f.png"]["repeats"] == 3 and by_file["3_extra/f.png"]["caption"] == "tall"
    # the limit cuts the strip, not the counts
    for limit in (0, 1, 3):
        out = summary.folder_summary(folder, cfg, limit=limit)
        assert out["shown"] == full["shown"][:limit]
        assert out["images"] == 6 and sum(out["buckets"].values()) == 4
