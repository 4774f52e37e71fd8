"""Dataset inputs: caption transforms under a seed, bucket geometry, every bad-input case, graph images,
and the Dataset node's re-execution fingerprint."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from support.factories.dataset import make_dataset

P = "AlignedTrainer_"


def _bc(D, **kw):
    return D.buckets.BucketConfig(**{"resolution": 64, "min_side": 64, "max_side": 128, "step": 64, **kw})


# --- captions -------------------------------------------------------------------------------------------------
def test_trigger_moves_to_front_once(D):
    cfg = D.captions.CaptionConfig(trigger_word="ohwx")
    assert D.captions.variants("a dog, ohwx, grass", cfg, 0) == ("ohwx, a dog, grass",)


def test_no_shuffle_no_dropout_means_one_variant(D):
    cfg = D.captions.CaptionConfig(variants=6)
    assert D.captions.variants("a, b, c, d", cfg, 1) == ("a, b, c, d",)


def test_variants_are_deterministic_per_image_under_the_seed(D, tmp_path):
    folder = make_dataset(tmp_path / "d", n=4).parent
    for i, p in enumerate(sorted(folder.rglob("*.txt"))):
        p.write_text(f"ohwx, t{i}a, t{i}b, t{i}c, t{i}d, t{i}e", encoding="utf-8")
    cc = D.captions.CaptionConfig(shuffle_tags=True, tag_dropout=0.2, keep_tokens=1, variants=4)
    a = D.dataset.from_folder(folder, cc, _bc(D), seed=5)
    b = D.dataset.from_folder(folder, cc, _bc(D), seed=5)
    c = D.dataset.from_folder(folder, cc, _bc(D), seed=6)
    assert [i.captions for i in a.items] == [i.captions for i in b.items]
    assert a.hash == b.hash and a.hash != c.hash
    assert [i.captions for i in a.items] != [i.captions for i in c.items]
    assert all(v.startswith("ohwx") for i in a.items for v in i.captions)
    # images with different captions do not share one random stream: their variant patterns differ
    assert len({tuple(len(v.split(",")) for v in i.captions) for i in a.items}) > 1


def test_caption_dropout_keeps_rate_and_adds_no_variant(D, tmp_path):
    folder = make_dataset(tmp_path / "d", n=2).parent
    ds = D.dataset.from_folder(folder, D.captions.CaptionConfig(caption_dropout=0.25), _bc(D))
    assert ds.caption_cfg.caption_dropout == 0.25
    assert all(len(i.captions) == 1 and i.captions[0] for i in ds.items)
    with pytest.raises(ValueError, match="caption_dropout"):
        D.captions.CaptionConfig(caption_dropout=-0.1).validate()


# --- buckets --------------------------------------------------------------------------------------------------
def test_max_area_and_step_rounding(D):
    cfg = D.buckets.BucketConfig(resolution=512, min_side=200, max_side=1024, step=64, max_area=256 * 512)
    bs = D.buckets.make_buckets(cfg)
    assert all(w * h <= 256 * 512 and w % 64 == 0 and h % 64 == 0 and min(w, h) >= 256 for w, h in bs)
    assert (256, 512) in bs and (512, 256) in bs and (320, 320) in bs
    assert (512, 512) not in bs
    with pytest.raises(ValueError, match="no bucket fits|max_pixels"):
        D.buckets.make_buckets(D.buckets.BucketConfig(resolution=512, min_side=256, max_side=512, max_area=100 * 100))


def test_resize_covers_bucket_and_crops_centre(D):
    (rw, rh), box = D.buckets.crop_box((300, 100), (192, 128))
    assert rh == 128 and rw == 384 and box == (96, 0, 288, 128)
    img = Image.new("RGB", (300, 100), "black")
    img.paste((255, 0, 0), (0, 0, 60, 100))   # a red strip on the left edge is cropped away
    out, _ = D.buckets.fit_to_bucket(img, (192, 128))
    assert out.size == (192, 128) and np.asarray(out)[..., 0].max() < 20


def test_smaller_than_smallest_bucket_is_upscaled_and_noted(D, tmp_path):
    f = tmp_path / "s"
    f.mkdir()
    Image.new("RGB", (20, 30), "red").save(f / "tiny.png")
    (f / "tiny.txt").write_text("tiny", encoding="utf-8")
    ds = D.dataset.from_folder(f, D.captions.CaptionConfig(), _bc(D))
    item = ds.items[0]
    assert ds.pixels(item).size == item.bucket
    assert any("upscaled" in n and "tiny.png" in n for n in ds.notes)


# --- bad input ------------------------------------------------------------------------------------------------
def test_missing_empty_and_bom_captions(D, tmp_path):
    f = tmp_path / "c"
    f.mkdir()
    for name in ("none", "empty", "bom"):
        Image.new("RGB", (64, 64), "blue").save(f / f"{name}.png")
    (f / "empty.txt").write_text("", encoding="utf-8")
    (f / "bom.txt").write_bytes("\ufeffcafé, tag".encode("utf-8"))
    ds = D.dataset.from_folder(f, D.captions.CaptionConfig(trigger_word="ohwx"), _bc(D))
    by = {i.source.rsplit("/", 1)[1]: i for i in ds.items}
    assert by["none.png"].captions == ("ohwx",) and by["empty.png"].captions == ("ohwx",)
    assert by["bom.png"].captions == ("ohwx, café, tag",)
    notes = "\n".join(ds.notes)
    assert "none.png (no caption file" in notes and "empty.png (empty caption" in notes


def test_not_an_image_is_named(D, tmp_path):
    f = tmp_path / "x"
    f.mkdir()
    (f / "fake.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(D.images.DataError, match=r"fake\.jpg"):
        D.dataset.from_folder(f, D.captions.CaptionConfig(), _bc(D))


def test_image_changed_after_reading_is_refused(D, tmp_path):
    folder = make_dataset(tmp_path / "d", n=1).parent
    ds = D.dataset.from_folder(folder, D.captions.CaptionConfig(), _bc(D))
    Image.new("RGB", (64, 64), "white").save(ds.items[0].source)
    with pytest.raises(D.images.DataError, match="changed after"):
        ds.pixels(ds.items[0])


def test_graph_images_channels_and_counts(D):
    cc = D.captions.CaptionConfig(trigger_word="t")
    grey = torch.rand(2, 64, 64, 1)
    ds = D.dataset.from_images(grey, ["a", "b"], cc, _bc(D))
    px = np.asarray(ds.pixels(ds.items[0]))
    assert px.shape == (64, 64, 3) and np.array_equal(px[..., 0], px[..., 2])
    ds4 = D.dataset.from_images(torch.rand(1, 64, 64, 4), [""], cc, _bc(D))
    assert ds4.items[0].captions == ("t",) and any("graph:0 (empty caption" in n for n in ds4.notes)
    assert np.asarray(ds4.pixels(ds4.items[0])).shape == (64, 64, 3)
    with pytest.raises(D.images.DataError, match="3 images but 2 captions"):
        D.dataset.from_images(torch.rand(3, 64, 64, 3), ["a", "b"], cc, _bc(D))


# --- the node ---------------------------------------------------------------------------------------------------
def _node_args(**kw):
    args = dict(folder="", resolution=64, min_side=64, max_side=128, bucket_step=64, trigger_word="ohwx",
                shuffle_tags=False, keep_tokens=1, tag_dropout=0.0, caption_dropout=0.0, caption_variants=1,
                flip=False, seed=0)
    args.update(kw)
    return args


def test_node_graph_images_and_report(comfy):
    imgs = torch.rand(3, 64, 96, 3)
    ds, rep, img = comfy.call(P + "Dataset", **_node_args(images=imgs, captions="a, x\nb, x\nc, y\n"))
    rep = json.loads(rep)
    assert rep["images"] == 3 and sum(rep["per_bucket"].values()) == 3
    assert dict(rep["tag_frequency"])["x"] == 2
    assert img.ndim == 4 and img.shape[-1] == 3 and img.shape[1] > 100
    imgs.mul_(0)  # the dataset holds its own copy
    assert np.asarray(ds.pixels(ds.items[0])).max() > 0
    with pytest.raises(Exception, match="3 images but 2 captions"):
        comfy.call(P + "Dataset", **_node_args(images=torch.rand(3, 64, 64, 3), captions="a\nb"))


def test_node_fingerprint_follows_folder_contents(comfy, comfy_dirs):
    node = comfy.node(P + "Dataset")
    folder = make_dataset(comfy_dirs["input"] / "fingerprint_d", n=2).parent
    a = node.fingerprint_inputs(folder=str(folder))
    assert a == node.fingerprint_inputs(folder=str(folder))
    (folder / "1_ohwx" / "img_000.txt").write_text("changed caption", encoding="utf-8")
    b = node.fingerprint_inputs(folder=str(folder))
    Image.new("RGB", (64, 64)).save(folder / "1_ohwx" / "new.png")
    c = node.fingerprint_inputs(folder=str(folder))
    assert len({a, b, c}) == 3
