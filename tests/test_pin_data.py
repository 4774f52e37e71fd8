"""Dataset options pinned to hand-computed results (issue #26): bucket tables for given limits, aspect and tie
rules, the centre crop box, keep_tokens with and without a trigger word, tag dropout replayed from the seed,
caption_variants counts, kohya repeat folders, flip and the regularization weight."""
from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from support.factories.dataset import make_dataset


def test_bucket_tables_by_hand(D):
    B = D.buckets
    # resolution 128, sides 64..192 step 64: area <= 128^2 -> 64x192, 192x64, and the 128 square
    assert B.make_buckets(B.BucketConfig(resolution=128, min_side=64, max_side=192, step=64)) == \
        [(64, 192), (128, 128), (192, 64)]
    # max_pixels 8192 = 64 x 128: no 128 square fits, the largest square is 64
    assert B.make_buckets(B.BucketConfig(resolution=128, min_side=64, max_side=192, step=64, max_area=8192)) == \
        [(64, 64), (64, 128), (128, 64)]
    # min_side 40 rounds up to the step (48); max_side 100 rounds down (96)
    assert B.make_buckets(B.BucketConfig(resolution=96, min_side=40, max_side=100, step=48)) == \
        [(48, 96), (96, 48), (96, 96)]
    # a smaller resolution caps the square even when the area would allow more
    assert (64, 64) in B.make_buckets(B.BucketConfig(resolution=64, min_side=64, max_side=128, step=64,
                                                     max_area=128 * 128))
    assert (128, 128) not in B.make_buckets(B.BucketConfig(resolution=64, min_side=64, max_side=128, step=64,
                                                           max_area=128 * 64))
    with pytest.raises(ValueError, match="min_side"):
        B.make_buckets(B.BucketConfig(resolution=64, min_side=128, max_side=256))


def test_assign_closest_aspect_ties_to_larger(D):
    B = D.buckets
    buckets = [(64, 64), (128, 128), (128, 64), (64, 128), (192, 64)]
    assert B.assign_bucket((500, 500), buckets) == (128, 128)  # tie between squares: the larger
    assert B.assign_bucket((300, 160), buckets) == (128, 64)   # 1.875 -> 2.0 (not 3.0, not 1.0)
    assert B.assign_bucket((100, 190), buckets) == (64, 128)
    assert B.assign_bucket((290, 100), buckets) == (192, 64)   # 2.9 -> 3.0


def test_centre_crop_box_by_hand(D):
    B = D.buckets
    # 300x200 into 128x128: scale max(128/300, 128/200) = 0.64 -> 192x128, crop x 32..160
    assert B.crop_box((300, 200), (128, 128)) == ((192, 128), (32, 0, 160, 128))
    # 100x300 into 64x128: scale max(0.64, 0.4267) = 0.64 -> 64x192, crop y 32..160
    assert B.crop_box((100, 300), (64, 128)) == ((64, 192), (0, 32, 64, 160))
    # smaller than the bucket: upscaled to cover it
    assert B.crop_box((50, 50), (64, 64)) == ((64, 64), (0, 0, 64, 64))
    img = Image.new("RGB", (300, 200))
    img.paste((255, 0, 0), (0, 0, 150, 200))
    out, box = B.fit_to_bucket(img, (128, 128))
    assert out.size == (128, 128) and box == (32, 0, 160, 128)
    px = np.asarray(out)
    assert px[64, 10, 0] > 200 and px[64, 118, 0] < 50  # the centre line of the image stays in the centre


CAP = "a, b, c, d, e, f"


def test_keep_tokens_and_trigger_word(D):
    C = D.captions
    for seed in range(20):
        v = C.variant(CAP, C.CaptionConfig(trigger_word="T", shuffle_tags=True, keep_tokens=2), random.Random(seed))
        tags = C.split_tags(v)
        assert tags[:2] == ["T", "a"] and sorted(tags[2:]) == ["b", "c", "d", "e", "f"]
        v0 = C.variant(CAP, C.CaptionConfig(trigger_word="T", shuffle_tags=True, keep_tokens=0), random.Random(seed))
        assert C.split_tags(v0)[0] == "T"
    # keep_tokens 0 with a trigger word: only the trigger stays, every other tag (the last one too) may move
    seconds = {C.split_tags(C.variant(CAP, C.CaptionConfig(trigger_word="T", shuffle_tags=True, keep_tokens=0),
                                      random.Random(s)))[1] for s in range(20)}
    lasts = {C.split_tags(C.variant(CAP, C.CaptionConfig(trigger_word="T", shuffle_tags=True, keep_tokens=0),
                                    random.Random(s)))[-1] for s in range(20)}
    assert len(seconds) > 1 and len(lasts) > 1
    firsts = {C.split_tags(C.variant(CAP, C.CaptionConfig(shuffle_tags=True, keep_tokens=0), random.Random(s)))[0]
              for s in range(20)}
    assert len(firsts) > 1  # without trigger word and keep_tokens 0 every tag may move
    keep3 = {tuple(C.split_tags(C.variant(CAP, C.CaptionConfig(shuffle_tags=True, keep_tokens=3),
                                          random.Random(s)))[:3]) for s in range(20)}
    assert keep3 == {("a", "b", "c")}
    shuffled = {C.variant(CAP, C.CaptionConfig(shuffle_tags=True, keep_tokens=2), random.Random(s)) for s in range(20)}
    assert len(shuffled) > 5
    assert C.variant(CAP, C.CaptionConfig(keep_tokens=2), random.Random(0)) == CAP  # no shuffle: unchanged
    assert C.with_trigger("x, T, y", "T") == "T, x, y" and C.with_trigger("x; y", "T", ";") == "T; x; y"


@pytest.mark.parametrize("p", [0.0, 0.3, 0.7])
def test_tag_dropout_replayed_from_the_seed(D, p):
    """Each tag after the kept ones is dropped when the seeded draw is below p (one draw per tag, in order)."""
    C = D.captions
    for seed in range(10):
        rng = random.Random(seed)
        tail = ["b", "c", "d", "e", "f"]
        kept = [t for t in tail if rng.random() >= p]
        got = C.variant(CAP, C.CaptionConfig(tag_dropout=p, keep_tokens=1), random.Random(seed))
        assert got == ", ".join(["a", *kept])


def test_caption_variants_count(D):
    C = D.captions
    for n in (1, 2, 5):
        vs = C.variants(CAP, C.CaptionConfig(shuffle_tags=True, keep_tokens=1, variants=n), seed=3)
        assert len(vs) == n and len(set(vs)) == n  # 120 orders: n distinct ones
        assert vs == C.variants(CAP, C.CaptionConfig(shuffle_tags=True, keep_tokens=1, variants=n), seed=3)
    assert C.variants(CAP, C.CaptionConfig(variants=5), seed=3) == (CAP,)
    two = C.variants("a, b", C.CaptionConfig(shuffle_tags=True, keep_tokens=1, variants=4), seed=0)
    assert two == ("a, b",)  # at most the distinct ones
    dropped = C.variants(CAP, C.CaptionConfig(tag_dropout=0.5, variants=4), seed=1)
    assert 1 < len(dropped) <= 4


def test_repeat_folders_flip_and_reg_weight(D, tmp_path):
    make_dataset(tmp_path / "train", n=2, repeats=3)
    (tmp_path / "train" / "plain").mkdir()  # a subfolder without N_: repeats 1
    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "train" / "plain" / "x.png")
    Image.new("RGB", (64, 64), (30, 20, 10)).save(tmp_path / "train" / "top.png")
    cc = D.captions.CaptionConfig(trigger_word="ohwx")
    bc = D.buckets.BucketConfig(resolution=64, min_side=64, max_side=128, step=64)
    ds = D.dataset.from_folder(tmp_path / "train", cc, bc)
    reps = {i.source.split("/")[-1]: i.repeats for i in ds.items}
    assert reps["top.png"] == 1 and reps["x.png"] == 1
    assert sorted(r for k, r in reps.items() if k not in ("top.png", "x.png")) == [3, 3]
    assert not any(i.flip or i.is_reg for i in ds.items)
    flipped = D.dataset.from_folder(tmp_path / "train", cc, bc, flip=True)
    assert len(flipped.items) == 2 * len(ds.items)
    assert [i.flip for i in flipped.items] == [False, True] * len(ds.items)
    a, b = flipped.pixels(flipped.items[0]), flipped.pixels(flipped.items[1])
    assert np.array_equal(np.asarray(a)[:, ::-1], np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(b))
    reg = make_dataset(tmp_path / "reg", n=1, trigger="class")
    with_reg = D.dataset.from_folder(tmp_path / "train", cc, bc, reg_folder=reg.parent, reg_weight=0.25)
    assert with_reg.reg_weight == 0.25 and [i.is_reg for i in with_reg.items].count(True) == 1
    assert with_reg.hash != D.dataset.from_folder(tmp_path / "train", cc, bc, reg_folder=reg.parent,
                                                  reg_weight=0.5).hash


def test_caption_config_bounds(D):
    C = D.captions
    for ok in (dict(tag_dropout=1.0), dict(caption_dropout=1.0), dict(tag_dropout=0.0), dict(keep_tokens=0),
               dict(variants=1)):
        C.CaptionConfig(**ok).validate()
    for bad in (dict(tag_dropout=1.01), dict(caption_dropout=-0.01), dict(keep_tokens=-1), dict(variants=0)):
        with pytest.raises(ValueError):
            C.CaptionConfig(**bad).validate()


def test_bucket_limits_refused_and_edge_buckets_kept(D):
    """Side limits are checked before any table is built (each bad value named), and the buckets at the
    limits are kept: the widest width (max_side itself) and a height equal to min_side."""
    B = D.buckets
    for bad, word in ((dict(step=0), "step"), (dict(step=-64), "step"), (dict(step=60), "step"),
                      (dict(min_side=0), "min_side"), (dict(min_side=600), "min_side"),
                      (dict(max_side=500), "max_side"), (dict(max_area=255 * 255), "max pixel area")):
        with pytest.raises(ValueError, match=word):
            B.BucketConfig(**bad).validate()
    B.BucketConfig(resolution=64, min_side=1, max_side=64, step=8).validate()  # 1 is a valid smallest side
    B.BucketConfig(max_area=256 * 256).validate()  # exactly min_side^2 fits
    # area 128^2, sides 64..256: width 192 fits only height 64 (= min_side); width 256 (= max_side) too
    assert B.make_buckets(B.BucketConfig(resolution=128, min_side=64, max_side=256, step=64)) == \
        [(64, 192), (64, 256), (128, 128), (192, 64), (256, 64)]
    # resolution 64 with room for 128^2: the 128 square comes only from the width at max_side
    assert B.make_buckets(B.BucketConfig(resolution=64, min_side=64, max_side=128, step=64, max_area=128 * 128)) == \
        [(64, 64), (64, 128), (128, 64), (128, 128)]


def test_aspect_tie_goes_to_the_larger_area_not_the_taller_bucket(D):
    # a 3:2 image is 0.5 from both 1:1 and 2:1; 144x72 has more pixels (10368) than 96x96 (9216) but is lower
    assert D.buckets.assign_bucket((300, 200), [(96, 96), (144, 72)]) == (144, 72)
    assert D.buckets.assign_bucket((300, 200), [(144, 72), (96, 96)]) == (144, 72)
