"""data/dataset.py pinned to hand-built folders (issue #26): the dataset report (counts, buckets, caption
statistics, tag frequencies, per-folder repeats as kohya's metadata lists them), the notes (upscaled on one side,
the 75-word limit, shuffle with one variant), the 1 MiB caption limit, the pixels the VAE gets, graph images
(channels, clamping) and what the dataset hash and the folder fingerprint see. Every expected value is counted
by hand from the files written here."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image


def _img(path, size, color=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _cap(path, text):
    path.with_suffix(".txt").write_text(text, encoding="utf-8")


BC = dict(resolution=128, min_side=64, max_side=192, step=64)  # buckets 64x192, 128x128, 192x64


def test_report_counts_by_hand(D, tmp_path):
    train, reg = tmp_path / "train", tmp_path / "reg"
    _cap(_img(train / "2_alpha" / "a.png", (128, 128)), "x, y, z")     # -> 128x128
    _cap(_img(train / "2_alpha" / "b.png", (192, 64)), "x, w")         # -> 192x64
    _img(train / "top.png", (60, 200))                                  # no caption; -> 64x192, upscaled (width)
    _cap(_img(reg / "1_cls" / "r.png", (160, 150)), "cls, y")          # -> 128x128
    _cap(_img(train / "2_alpha" / "deeper" / "n.png", (128, 128)), "x")  # below an N_name folder: not read
    cc = D.captions.CaptionConfig(trigger_word="T")
    ds = D.dataset.from_folder(train, cc, D.buckets.BucketConfig(**BC), flip=True, reg_folder=reg)
    rep = ds.report()
    assert (rep["images"], rep["items"], rep["regularization"]) == (4, 8, 1)
    assert rep["per_bucket"] == {"128x128": 4, "192x64": 2, "64x192": 2}
    assert list(rep["per_bucket"]) == sorted(rep["per_bucket"])
    # first variants with the trigger word: "T, x, y, z" (4 words, 4 tags), "T, x, w" (3), "T" (1), "T, cls, y" (3),
    # each twice (flip): mean 22 / 8
    assert rep["caption_words"] == {"min": 1, "max": 4, "mean": 2.75}
    assert rep["caption_tags"] == {"min": 1, "max": 4, "mean": 2.75}
    assert rep["caption_variants"] == {"distinct": 4, "per_image_max": 1}
    # tags as read (no trigger), once per image (not per mirrored copy)
    assert dict(rep["tag_frequency"]) == {"x": 2, "y": 2, "z": 1, "w": 1, "cls": 1}
    counts = [c for _, c in rep["tag_frequency"]]
    assert counts == sorted(counts, reverse=True)
    assert rep["dataset_dirs"] == {"2_alpha": {"n_repeats": 2, "img_count": 2}, "train": {"n_repeats": 1, "img_count": 1},
                                   "1_cls": {"n_repeats": 1, "img_count": 1}}
    assert rep["tag_frequency_by_dir"] == {"2_alpha": {"x": 2, "y": 1, "z": 1, "w": 1}, "train": {},
                                           "1_cls": {"cls": 1, "y": 1}}
    assert rep["resolution"] == 128 and rep["hash"] == ds.hash and len(ds.hash) == 16
    notes = "\n".join(rep["notes"])
    assert "upscaled: " in notes and "top.png is 60x200, smaller than its bucket 64x192" in notes
    assert not any(n in notes for n in ("a.png", "b.png", "r.png"))  # the rest cover their buckets
    assert "no caption: " in notes and "top.png (no caption file" in notes
    assert "skipped" not in notes  # caption files are not unsupported images
    assert not any("n.png" in i.source for i in ds.items)
    # the 25 most frequent tags only, and graph images counted under "graph"
    many = ", ".join(f"t{i}" for i in range(30))
    g = D.dataset.from_images(torch.rand(2, 64, 64, 3), [many, "t0"], cc, D.buckets.BucketConfig(**BC))
    grep = g.report()
    assert len(grep["tag_frequency"]) == 25 and grep["tag_frequency"][0] == ("t0", 2)
    assert grep["dataset_dirs"] == {"graph": {"n_repeats": 1, "img_count": 2}}
    assert grep["caption_variants"]["distinct"] == 2 and grep["regularization"] == 0


def test_notes_at_the_limits(D, tmp_path):
    folder = tmp_path / "d"
    _cap(_img(folder / "w75.png", (128, 128)), " ".join(["w"] * 75))
    _cap(_img(folder / "w76.png", (128, 128)), " ".join(["w"] * 76))
    _cap(_img(folder / "blank.png", (128, 128)), "   ")
    _cap(_img(folder / "tall.png", (64, 200)), "t")     # bucket 64x192: covered on both sides
    _cap(_img(folder / "narrow.png", (60, 200)), "t")   # bucket 64x192: 4 px short in width only
    _cap(_img(folder / "low.png", (200, 60)), "t")      # bucket 192x64: 4 px short in height only
    (folder / "x.svg").write_text("<svg/>")
    bc = D.buckets.BucketConfig(**BC)
    ds = D.dataset.from_folder(folder, D.captions.CaptionConfig(), bc)
    notes = "\n".join(ds.notes)
    assert "long caption: " in notes and "w76.png has 76 words" in notes and "w75.png" not in notes
    assert "blank.png (empty caption" in notes
    ups = [n for n in ds.notes if n.startswith("upscaled: ")]
    assert len(ups) == 2 and "narrow.png is 60x200" in ups[0] + ups[1] and "low.png is 200x60" in ups[0] + ups[1]
    assert any(n.startswith("skipped: ") and "x.svg: SVG (vector) images are not supported" in n for n in ds.notes)
    assert sorted(p.name for p, _ in D.dataset.scan_folder(folder)) == \
        ["blank.png", "low.png", "narrow.png", "tall.png", "w75.png", "w76.png"]  # no notes list: nothing noted
    assert not any("caption_variants=1" in n for n in ds.notes)
    for cc in (D.captions.CaptionConfig(shuffle_tags=True), D.captions.CaptionConfig(tag_dropout=0.5)):
        assert any("caption_variants=1" in n for n in D.dataset.from_folder(folder, cc, bc).notes)
    cc = D.captions.CaptionConfig(shuffle_tags=True, variants=2)
    assert not any("caption_variants=1" in n for n in D.dataset.from_folder(folder, cc, bc).notes)


def test_caption_size_limit_and_caption_extension(D, tmp_path):
    folder = tmp_path / "d"
    img = _img(folder / "a.png", (128, 128))
    cap = folder / "a.caption"
    cap.write_bytes(b"x" * (1 << 20))  # exactly 1 MiB: read
    assert D.dataset.read_caption(img) == "x" * (1 << 20)
    cap.write_bytes(b"x" * ((1 << 20) + 1))
    with pytest.raises(D.images.DataError, match=r"a\.caption is 1048577 bytes"):
        D.dataset.read_caption(img)
    cap.unlink()
    assert D.dataset.read_caption(img) is None


def test_vae_input_is_the_bucket_pixels_over_255(D, tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (64, 192, 3), dtype=np.uint8)  # exactly bucket 192x64: no resize, no crop
    path = tmp_path / "d" / "a.png"
    path.parent.mkdir()
    Image.fromarray(arr).save(path)
    ds = D.dataset.from_folder(tmp_path / "d", D.captions.CaptionConfig(), D.buckets.BucketConfig(**BC), flip=True)
    plain, mirrored = ds.vae_input(ds.items[0]), ds.vae_input(ds.items[1])
    assert plain.shape == (1, 64, 192, 3) and plain.dtype == torch.float32
    assert torch.equal(plain[0], torch.from_numpy(arr.astype(np.float32) / 255.0))
    assert torch.equal(mirrored[0], torch.from_numpy(arr[:, ::-1].astype(np.float32) / 255.0))


def test_graph_images_clamped_and_channels(D):
    cc, bc = D.captions.CaptionConfig(), D.buckets.BucketConfig(**BC)
    x = torch.linspace(-0.5, 1.5, 128 * 128 * 3).reshape(1, 128, 128, 3)
    ds = D.dataset.from_images(x, ["a"], cc, bc)
    expect = (x[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(np.asarray(ds.pixels(ds.items[0])), expect)
    grey = torch.rand(1, 128, 128, 1)
    rgba = torch.rand(1, 128, 128, 4)
    g1 = D.dataset.from_images(grey, ["a"], cc, bc)
    g4 = D.dataset.from_images(rgba, ["a"], cc, bc)
    assert torch.equal(g1.graph_images[0], grey[0].expand(-1, -1, 3))
    assert torch.equal(g4.graph_images[0], rgba[0, ..., :3])
    assert g1.items[0].size == (128, 128) and g1.items[0].source == "graph:0"
    assert g1.reg_weight == 1.0 and not g1.items[0].is_reg and g1.items[0].repeats == 1
    wide = D.dataset.from_images(torch.rand(1, 64, 192, 3), ["a"], cc, bc)
    assert wide.items[0].size == (192, 64) and wide.items[0].bucket == (192, 64)
    assert D.dataset.from_images(torch.rand(1, 64, 64, 3), ["a"], cc, bc).hash != ds.hash
    for bad in (torch.rand(1, 64, 64, 2), torch.rand(64, 64, 3)):
        with pytest.raises(D.images.DataError, match="IMAGE batch"):
            D.dataset.from_images(bad, ["a"] * bad.shape[0], cc, bc)


def test_hash_sees_every_item_field_and_setting(D, tmp_path):
    folder = tmp_path / "d"
    _cap(_img(folder / "1_a" / "a.png", (128, 128)), "x, y")
    cc, bc = D.captions.CaptionConfig(), D.buckets.BucketConfig(**BC)
    base = D.dataset.from_folder(folder, cc, bc).hash
    assert base == D.dataset.from_folder(folder, cc, bc).hash
    others = {"flip": D.dataset.from_folder(folder, cc, bc, flip=True).hash,
              "trigger": D.dataset.from_folder(folder, D.captions.CaptionConfig(trigger_word="T"), bc).hash,
              "buckets": D.dataset.from_folder(folder, cc, D.buckets.BucketConfig(**{**BC, "resolution": 64})).hash,
              "reg_weight": D.dataset.from_folder(folder, cc, bc, reg_weight=0.5).hash}
    (folder / "1_a").rename(folder / "3_a")
    others["repeats"] = D.dataset.from_folder(folder, cc, bc).hash
    _cap(folder / "3_a" / "a.png", "x, z")
    others["caption"] = D.dataset.from_folder(folder, cc, bc).hash
    _img(folder / "3_a" / "a.png", (128, 128), (11, 20, 30))
    others["pixels"] = D.dataset.from_folder(folder, cc, bc).hash
    assert len({base, *others.values()}) == 1 + len(others), others
    # the same image as a regularization image is another dataset
    _cap(_img(tmp_path / "r" / "r.png", (128, 128)), "x, y")
    with_reg = D.dataset.from_folder(folder, cc, bc, reg_folder=tmp_path / "r")
    assert sum(i.is_reg for i in with_reg.items) == 1
    assert D.dataset.from_folder(folder, cc, bc, reg_folder=tmp_path / "r", reg_weight=0.0).reg_weight == 0.0
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(D.images.DataError, match="reg_weight"):
            D.dataset.from_folder(folder, cc, bc, reg_weight=bad)


def test_folder_fingerprint_sees_names_sizes_and_times(D, tmp_path):
    folder = tmp_path / "d"
    img = _img(folder / "2_a" / "a.png", (64, 64))
    fp = D.dataset.folder_fingerprint
    first = fp(folder)
    assert fp(str(folder)) == first  # a folder given as text
    assert first == fp(folder) and first != fp(folder, None)  # a missing reg folder counts too
    assert fp(None) != fp(tmp_path / "nowhere") and fp(tmp_path / "nowhere") != fp(tmp_path / "elsewhere")
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = fp(folder)
    assert touched != first
    img.write_bytes(img.read_bytes() + b"\0")
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fp(folder) != touched  # same time, other size
    img.rename(folder / "2_a" / "b.png")
    os.utime(folder / "2_a" / "b.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fp(folder) not in (first, touched)


def test_report_without_flip_empty_batch_and_variants(D, tmp_path):
    bc = D.buckets.BucketConfig(**BC)
    _cap(_img(tmp_path / "t" / "a.png", (128, 128)), "p")
    _cap(_img(tmp_path / "t" / "b.png", (128, 128)), "p, q")
    _cap(_img(tmp_path / "r" / "r.png", (128, 128)), "s")
    rep = D.dataset.from_folder(tmp_path / "t", D.captions.CaptionConfig(), bc, reg_folder=tmp_path / "r").report()
    assert (rep["images"], rep["items"], rep["regularization"]) == (3, 3, 1)
    assert rep["caption_words"] == rep["caption_tags"] == {"min": 1, "max": 2, "mean": 1.33}  # 4 / 3
    # an empty graph batch reports zeros (no error)
    empty = D.dataset.from_images(torch.zeros(0, 64, 64, 3), [], D.captions.CaptionConfig(), bc).report()
    assert (empty["images"], empty["items"]) == (0, 0)
    assert empty["caption_words"] == empty["caption_tags"] == {"min": 0, "max": 0, "mean": 0}
    assert empty["caption_variants"] == {"distinct": 0, "per_image_max": 0}
    # statistics of the first variant of each caption; per_image_max is the largest number of variants
    cc = D.captions.CaptionConfig(tag_dropout=0.5, variants=4)
    ds = D.dataset.from_images(torch.rand(2, 64, 64, 3), ["a, b, c, d, e, f, g, h", "z"], cc, bc)
    first = ds.items[0].captions
    assert len(first) >= 2 and len({len(c.split()) for c in first}) > 1  # the variants differ in length
    assert ds.items[1].captions == ("z",)
    rep = ds.report()
    n = len(first[0].split(", "))
    assert rep["caption_tags"] == rep["caption_words"] == {"min": 1, "max": n, "mean": round((n + 1) / 2, 2)}
    assert rep["caption_variants"] == {"distinct": len(first) + 1, "per_image_max": len(first)}


def test_folder_reading_edges(D, tmp_path, comfy_dirs):
    cc, bc = D.captions.CaptionConfig(), D.buckets.BucketConfig(**BC)
    folder = tmp_path / "d"
    frames = [Image.new("RGB", (128, 128), c) for c in ((255, 0, 0), (0, 0, 255))]
    folder.mkdir()
    frames[0].save(folder / "a_anim.gif", save_all=True, append_images=frames[1:], duration=100)
    _cap(_img(folder / "b.png", (128, 128)), "b")
    _cap(_img(folder / "2_a" / "c.png", (128, 128)), "c")
    (folder / "3_b").symlink_to(folder / "2_a")  # the same folder reached twice: read once, noted
    ds = D.dataset.from_folder(folder, cc, bc)
    assert sorted(i.source.rsplit("/", 1)[1] for i in ds.items) == ["b.png", "c.png"]  # after the skipped GIF
    assert any("a_anim.gif is an animated GIF" in n for n in ds.notes)
    assert any("is a folder already read" in n for n in ds.notes)
    # invalid caption settings are refused by both builders
    for bad in (D.captions.CaptionConfig(tag_dropout=1.5), D.captions.CaptionConfig(variants=0)):
        with pytest.raises(ValueError):
            D.dataset.from_folder(folder, bad, bc)
        with pytest.raises(ValueError):
            D.dataset.from_images(torch.rand(1, 64, 64, 3), ["a"], bad, bc)
    # a folder of unusable files only: the error names the first five skipped
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(7):
        (junk / f"j{i}.svg").write_text("<svg/>")
    with pytest.raises(D.images.DataError, match="no images to train on") as e:
        D.dataset.from_folder(junk, cc, bc)
    assert [f"j{i}.svg" in str(e.value) for i in range(7)] == [True] * 5 + [False] * 2
    # folder_fingerprint: a missing first folder does not end the listing of the next
    fp = D.dataset.folder_fingerprint
    assert fp(None, folder) != fp(None, junk)
    # the Dataset node's fingerprint does not read through a link out of the allowed folders
    ds_dir = comfy_dirs["input"] / "pin_guarded"
    _cap(_img(ds_dir / "a.png", (64, 64)), "a")
    outside = tmp_path / "outside.png"
    _img(outside, (64, 64))
    (ds_dir / "linked.png").symlink_to(outside)
    before = D.dataset.guarded_fingerprint(str(ds_dir))
    _img(outside, (96, 64), (200, 0, 0))  # another size: only a fingerprint that read it would change
    assert D.dataset.guarded_fingerprint(str(ds_dir)) == before and not before.startswith("error")
