"""Dataset, caption transforms, buckets, bad input, and the latent/text caches."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from support.factories.dataset import make_dataset

P = "AlignedTrainer_"


# --- caption transforms -------------------------------------------------------------------------------------
def test_trigger_word_first_and_not_duplicated(D):
    cfg = D.captions.CaptionConfig(trigger_word="ohwx")
    assert D.captions.variants("a dog, grass", cfg, 0) == ("ohwx, a dog, grass",)
    assert D.captions.variants("ohwx, a dog", cfg, 0) == ("ohwx, a dog",)


def test_shuffle_keeps_leading_tags_and_is_seeded(D):
    cfg = D.captions.CaptionConfig(trigger_word="ohwx", shuffle_tags=True, keep_tokens=2, variants=8)
    cap = "a dog, t1, t2, t3, t4, t5, t6"
    v1 = D.captions.variants(cap, cfg, 123)
    assert v1 == D.captions.variants(cap, cfg, 123)
    assert v1 != D.captions.variants(cap, cfg, 124)
    assert len(v1) > 1
    for v in v1:
        tags = [t.strip() for t in v.split(",")]
        assert tags[:2] == ["ohwx", "a dog"] and sorted(tags[2:]) == ["t1", "t2", "t3", "t4", "t5", "t6"]


def test_tag_dropout_drops_only_unkept_tags(D):
    cfg = D.captions.CaptionConfig(keep_tokens=1, tag_dropout=0.5, variants=20)
    cap = "keep me, " + ", ".join(f"t{i}" for i in range(10))
    vs = D.captions.variants(cap, cfg, 7)
    assert all(v.startswith("keep me") for v in vs)
    lengths = [len(v.split(",")) for v in vs]
    assert min(lengths) < 11 and max(lengths) <= 11
    rate = 1 - (np.mean(lengths) - 1) / 10
    assert 0.3 < rate < 0.7


def test_caption_config_validation(D):
    with pytest.raises(ValueError, match="tag_dropout"):
        D.captions.CaptionConfig(tag_dropout=1.5).validate()


# --- buckets ------------------------------------------------------------------------------------------------
def test_buckets_respect_limits_and_aspect(D):
    cfg = D.buckets.BucketConfig(resolution=512, min_side=256, max_side=1024, step=64)
    bs = D.buckets.make_buckets(cfg)
    assert (512, 512) in bs
    assert all(w % 64 == 0 and h % 64 == 0 and 256 <= w <= 1024 and 256 <= h <= 1024 and w * h <= 512 * 512
               for w, h in bs)
    assert D.buckets.assign_bucket((1920, 1080), bs)[0] > D.buckets.assign_bucket((1920, 1080), bs)[1]
    assert D.buckets.assign_bucket((600, 600), bs) == (512, 512)
    img = Image.new("RGB", (300, 200))
    out, box = D.buckets.fit_to_bucket(img, (384, 256))
    assert out.size == (384, 256)
    with pytest.raises(ValueError, match="multiple of 8"):
        D.buckets.make_buckets(D.buckets.BucketConfig(step=12))


# --- datasets and bad input -----------------------------------------------------------------------------------
def _cfgs(D, **kw):
    return D.captions.CaptionConfig(**kw), D.buckets.BucketConfig(resolution=64, min_side=64, max_side=128, step=64)


def test_folder_with_repeats_reg_and_flip(D, tmp_path):
    make_dataset(tmp_path / "train", n=3, repeats=4)
    reg = make_dataset(tmp_path / "reg", n=2, trigger="class")
    ds = D.dataset.from_folder(tmp_path / "train", *_cfgs(D, trigger_word="ohwx"), flip=True,
                               reg_folder=reg.parent, reg_weight=0.5)
    assert len(ds.items) == (3 + 2) * 2
    assert {i.repeats for i in ds.items if not i.is_reg} == {4}
    assert sum(i.is_reg for i in ds.items) == 4
    rep = ds.report()
    assert rep["images"] == 5 and rep["regularization"] == 2 and sum(rep["per_bucket"].values()) == 10
    assert dict(rep["tag_frequency"])["simple"] == 5
    a = ds.pixels(ds.items[0])
    b = ds.pixels(ds.items[1])
    assert np.array_equal(np.asarray(a)[:, ::-1], np.asarray(b))


def test_bad_inputs(D, tmp_path):
    cc, bc = _cfgs(D)
    with pytest.raises(D.images.DataError, match="no images"):
        (tmp_path / "empty").mkdir()
        D.dataset.from_folder(tmp_path / "empty", cc, bc)
    with pytest.raises(D.images.DataError, match="does not exist"):
        D.dataset.from_folder(tmp_path / "nope", cc, bc)
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.new("RGB", (64, 64), "red").save(bad / "a.png")
    (bad / "a.png").write_bytes((bad / "a.png").read_bytes()[:40])  # truncated
    with pytest.raises(D.images.DataError, match="a.png"):
        D.dataset.from_folder(bad, cc, bc)
    enc = tmp_path / "enc"
    enc.mkdir()
    Image.new("RGB", (64, 64), "red").save(enc / "a.png")
    (enc / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(D.images.DataError, match="a.txt.*UTF-8"):
        D.dataset.from_folder(enc, cc, bc)
    with pytest.raises(D.images.DataError, match="2 images but 1 captions"):
        D.dataset.from_images(torch.rand(2, 64, 64, 3), ["one"], cc, bc)


def test_odd_images_are_converted_and_noted(D, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    rgba.save(folder / "alpha.png")
    Image.fromarray(np.full((64, 64), 65535, dtype=np.uint16)).save(folder / "deep.png")
    tall = Image.new("RGB", (40, 80), "blue")
    exif = tall.getexif()
    exif[0x0112] = 6  # rotate 90 degrees: stored 40x80, shown 80x40
    tall.save(folder / "rot.jpg", exif=exif)
    Image.new("RGB", (32, 32), "green").save(folder / "small.png")
    (folder / "small.txt").write_text("   ")
    ds = D.dataset.from_folder(folder, *_cfgs(D, trigger_word="ohwx"))
    by = {i.source.rsplit("/", 1)[1]: i for i in ds.items}
    assert by["rot.jpg"].size == (80, 40)
    assert np.asarray(ds.pixels(by["alpha.png"])).min() > 250  # transparent -> white
    assert np.asarray(ds.pixels(by["deep.png"])).min() > 250   # 16-bit white stays white
    assert np.asarray(ds.pixels(by["cmyk.jpg"])).shape[-1] == 3
    notes = "\n".join(ds.notes)
    assert "upscaled: " in notes and "small.png" in notes and "no caption: " in notes
    assert by["small.png"].captions == ("ohwx",)


# --- caches -----------------------------------------------------------------------------------------------------
def _ds(D, tmp_path, n=3, **kw):
    make_dataset(tmp_path / "data", n=n)
    return D.dataset.from_folder(tmp_path / "data", *_cfgs(D, **kw))


def test_latent_cache_hit_miss_invalidation_and_corruption(D, sd15, tmp_path):
    _, _, vae = sd15
    ds = _ds(D, tmp_path)
    root = tmp_path / "cache"
    a = D.cache.cache_latents(ds, vae, root)
    assert a.stats == (0, 3, 0)
    b = D.cache.cache_latents(ds, vae, root)
    assert b.stats == (3, 0, 0)
    assert all(torch.equal(x, y) for x, y in zip(a.latents, b.latents))
    assert a.latents[0].shape[0] == 4 and a.latents[0].shape[1:] == (ds.items[0].bucket[1] // 8, ds.items[0].bucket[0] // 8)
    files = sorted((root / "latents").rglob("*.safetensors"))
    files[0].write_bytes(files[0].read_bytes()[:-7])  # truncate one entry
    c = D.cache.cache_latents(ds, vae, root)
    assert c.stats == (2, 1, 1)
    assert all(torch.equal(x, y) for x, y in zip(a.latents, c.latents))
    # a change in the image changes the key
    img_path = ds.items[0].source
    Image.new("RGB", (64, 64), "white").save(img_path)
    ds2 = D.dataset.from_folder(tmp_path / "data", *_cfgs(D))
    d = D.cache.cache_latents(ds2, vae, root)
    assert d.stats == (2, 1, 0)
    assert not list((root / "latents").rglob("*.tmp"))


def test_text_cache_and_text_encoder_unloaded(comfy, D, sd15, tmp_path):
    _, clip, vae = sd15
    align = comfy.engine("te.align")
    ds = _ds(D, tmp_path, n=2, trigger_word="ohwx", shuffle_tags=True, variants=2, caption_dropout=0.1)
    lc = D.cache.cache_latents(ds, vae, tmp_path / "c")
    aligned = align.align_clip(clip, "sd15")
    ts, stats = D.cache.cache_text(lc, aligned, tmp_path / "c")
    n_texts = len({c for i in ds.items for c in i.captions}) + 1
    assert stats == (0, n_texts, 0)
    assert not D.cache.is_loaded(aligned)
    assert ts.te_spec_id == "sd15" and ts.caption_dropout == 0.1 and len(ts) == 2
    s0 = ts.samples[0]
    direct = aligned.encode_from_tokens_scheduled(aligned.tokenize(s0.captions[0].text))
    assert torch.allclose(s0.captions[0].conditioning[0][0], direct[0][0].float(), atol=1e-6)
    _, stats2 = D.cache.cache_text(lc, aligned, tmp_path / "c")
    assert stats2 == (n_texts, 0, 0)
    # the unaligned CLIP is another encoder identity: no hits
    _, stats3 = D.cache.cache_text(lc, clip, tmp_path / "c")
    assert stats3[0] == 0


def test_dataset_and_cache_nodes(comfy, sd15, comfy_dirs):
    import folder_paths

    _, clip, vae = sd15
    make_dataset(comfy_dirs["input"] / "nodeds", n=2)
    ds, rep, img = comfy.call(P + "Dataset", folder="nodeds", resolution=64, min_side=64, max_side=128,
                              bucket_step=64, trigger_word="ohwx", shuffle_tags=False, keep_tokens=1, tag_dropout=0.0,
                              caption_dropout=0.0, caption_variants=1, flip=False, seed=0)
    assert json.loads(rep)["images"] == 2 and img.shape[-1] == 3
    lc, info = comfy.call(P + "CacheLatents", dataset=ds, vae=vae)
    assert folder_paths.get_output_directory() in lc.root
    ts, info2 = comfy.call(P + "CacheTextEmbeddings", latents=lc, clip=clip, unload_text_encoder=True)
    assert len(ts) == 2 and ts.empty_conditioning is not None
