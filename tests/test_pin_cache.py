"""Caches pinned (issue #26): the disk cache's layout, verification and counters; temporaries swept by age; the
cheap weight sample takes the evenly spaced elements (first and last included); fingerprints see every value they
promise to; CONDITIONING survives the round trip through cache tensors; progress and errors of the cache builders."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from fractions import Fraction
from math import floor

import pytest
import torch

from support.factories.dataset import make_dataset


@pytest.fixture(scope="module")
def K(comfy):
    return comfy.engine("data.cache")


def _fp(K, obj) -> str:
    h = hashlib.sha256()
    K._fingerprint(obj, h)
    return h.hexdigest()


def test_tensor_sample_takes_evenly_spaced_elements(K):
    for n in (1, 2, 5, K.SAMPLES_PER_TENSOR, K.SAMPLES_PER_TENSOR + 1, 1000):
        t = torch.arange(n, dtype=torch.float64).reshape(-1, 1) * 1.5
        k = min(n, K.SAMPLES_PER_TENSOR)
        idx = [floor(Fraction(i * (n - 1), k - 1)) if k > 1 else 0 for i in range(k)]  # first .. last, even steps
        assert idx[0] == 0 and idx[-1] == n - 1
        expect = torch.tensor([float(t.reshape(-1)[i]) for i in idx], dtype=torch.float32).numpy().tobytes()
        assert K._tensor_sample(t) == expect, n
    assert K._tensor_sample(torch.zeros(0)) == b""


def test_fingerprints_see_what_they_promise(K):
    base = {"b": [1, 2.0, "x", None, True], "a": torch.ones(3, 2)}
    assert _fp(K, base) == _fp(K, {"a": torch.ones(3, 2), "b": [1, 2.0, "x", None, True]})  # key order
    changed = [{**base, "c": 0}, {**base, "b": [1, 2.0, "x", None, False]}, {**base, "b": [1, 2.0, "x", None]},
               {**base, "b": [1, 2, "x", None, True]}, {**base, "a": torch.ones(2, 3)},
               {**base, "a": torch.ones(3, 2, dtype=torch.float16)}, {**base, "a": torch.ones(3, 2) * 2},
               {"b": base["b"], "A": base["a"]}, {**base, "b": ([1, 2.0], "x", None, True)}]
    prints = {_fp(K, c) for c in changed}
    assert len(prints) == len(changed) and _fp(K, base) not in prints
    # values nested six containers deep still count; deeper only their type does (bounded work)
    deep = lambda v, d: v if d == 0 else [deep(v, d - 1)]  # noqa: E731
    assert _fp(K, deep(1, 6)) != _fp(K, deep(2, 6))
    assert _fp(K, deep(1, 7)) == _fp(K, deep(2, 7))

    class Adapter:  # ComfyUI's weight adapters carry their tensors in .weights
        def __init__(self, w):
            self.weights = w

    assert _fp(K, Adapter((torch.ones(2),))) != _fp(K, Adapter((torch.ones(2) * 3,)))
    assert _fp(K, Adapter((torch.ones(2),))) == _fp(K, Adapter((torch.ones(2),)))
    assert _fp(K, object()) == _fp(K, object())  # anything else: its type name only

    class Other:
        def __init__(self, w):
            self.weights = w

    assert _fp(K, Other((torch.ones(2),))) != _fp(K, Adapter((torch.ones(2),)))  # the adapter's type counts
    assert _fp(K, object()) != _fp(K, Fraction(1))
    assert _fp(K, deep(1, 7)) != _fp(K, deep("1", 7))  # past the depth limit the type still counts
    # the depth counts dict levels and adapter levels the same way as list levels
    ddeep = lambda v, d: v if d == 0 else {"k": ddeep(v, d - 1)}  # noqa: E731
    assert _fp(K, ddeep(1, 6)) != _fp(K, ddeep(2, 6)) and _fp(K, ddeep(1, 7)) == _fp(K, ddeep(2, 7))
    assert _fp(K, Adapter(deep(1, 5))) != _fp(K, Adapter(deep(2, 5)))
    assert _fp(K, Adapter(deep(1, 6))) == _fp(K, Adapter(deep(2, 6)))
    # keys of mixed types (ComfyUI option dicts can mix them) are ordered by their text
    assert _fp(K, {1: "a", "b": 2}) == _fp(K, {"b": 2, 1: "a"}) != _fp(K, {2: "a", "b": 2})
    # module identity: class, names, extras
    lin = torch.nn.Linear(2, 2)
    ident = K.module_identity(lin, "x")
    assert len(ident) == 24 and ident == K.module_identity(lin, "x") and ident != K.module_identity(lin, "y")
    other = torch.nn.Linear(2, 2)
    other.load_state_dict(lin.state_dict())
    assert K.module_identity(other, "x") == ident
    renamed = torch.nn.Sequential(lin)
    assert K.module_identity(renamed, "x") != ident
    from collections import OrderedDict

    a, b = torch.nn.Sequential(OrderedDict(a=lin)), torch.nn.Sequential(OrderedDict(b=lin))
    assert K.module_identity(a) != K.module_identity(b)  # the same tensors under other names


def test_conditioning_round_trip(K):
    g = torch.Generator().manual_seed(0)
    c0, c1 = torch.randn(1, 4, 8, generator=g, dtype=torch.float64), torch.randn(1, 3, 8, generator=g)
    pooled = torch.randn(1, 8, generator=g).half()
    cond = [[c0, {"pooled_output": pooled, "guidance": 3.5, "name": "x", "flag": True, "none": None,
                  "n": 2, "dropped": object()}], [c1, {}]]
    t = K._cond_to_tensors(cond)
    assert set(t) == {"0.cond", "0.x.pooled_output", "0.json", "1.cond"}
    assert t["0.cond"].dtype == torch.float32 and t["0.x.pooled_output"].dtype == torch.float16
    back = K._tensors_to_cond(t)
    assert len(back) == 2
    assert torch.equal(back[0][0], c0.float()) and torch.equal(back[1][0], c1) and back[1][1] == {}
    assert back[0][1].keys() == {"pooled_output", "guidance", "name", "flag", "none", "n"}
    assert torch.equal(back[0][1]["pooled_output"], pooled)
    assert [back[0][1][k] for k in ("guidance", "name", "flag", "none", "n")] == [3.5, "x", True, None, 2]
    assert json.loads(bytes(t["0.json"].numpy()).decode())["n"] == 2


def test_disk_cache_layout_verification_and_counters(K, tmp_path, monkeypatch):
    dc = K.DiskCache(tmp_path)
    key, other = "ab" + "0" * 30, "cd" + "1" * 30
    assert dc.path(key) == tmp_path / "ab" / f"{key}.safetensors"
    assert dc.get(key) is None and (dc.hits, dc.misses, dc.repaired) == (0, 0, 0)
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.arange(4.0, requires_grad=True) * 2}

    got = dc.get_or_compute(key, compute, {"source": "img.png", "n": 3})
    assert torch.equal(got["x"], torch.arange(4.0) * 2) and not got["x"].requires_grad
    again = dc.get_or_compute(key, compute, {})
    assert torch.equal(again["x"], got["x"]) and calls == [1] and (dc.hits, dc.misses) == (1, 1)
    from safetensors import safe_open

    with safe_open(str(dc.path(key)), framework="pt") as f:
        md = f.metadata()
    assert md["key"] == key and md["source"] == "img.png" and md["n"] == "3"
    assert md["digest"] == K.tensors_digest({"x": torch.arange(4.0) * 2})
    # the digest covers names, dtypes and shapes, not only the bytes
    z = torch.zeros(4)
    same_bytes = [{"y": z}, {"x": z.reshape(2, 2)}, {"x": torch.zeros(4, dtype=torch.int32)}, {"x": z}]
    assert len({K.tensors_digest(t) for t in same_bytes}) == 4
    # an entry is written next to its final name as a '*.tmp' (what the sweep removes after a crash), then renamed;
    # non-contiguous tensors are stored as their values
    renames = []
    real_replace = os.replace

    def spy(src, dst):
        renames.append((str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    nc = torch.arange(6.0).reshape(2, 3).t()
    third = "ef" + "2" * 30
    fds = len(os.listdir("/proc/self/fd"))
    dc.put(third, {"t": nc})
    assert len(os.listdir("/proc/self/fd")) == fds  # no file descriptor left open
    monkeypatch.undo()
    ((src, dst),) = renames
    assert dst == str(dc.path(third)) and src.endswith(".tmp") and os.path.dirname(src) == str(dc.path(third).parent)
    assert torch.equal(dc.get(third)["t"], nc)
    # a valid entry copied under another key is not that key's entry: refused, deleted, counted
    dc.path(other).parent.mkdir(parents=True)
    shutil.copy(dc.path(key), dc.path(other))
    assert dc.get(other) is None and dc.repaired == 1 and not dc.path(other).exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_sweep_removes_only_old_temporaries(K, tmp_path):
    dc = K.DiskCache(tmp_path / "c")
    assert dc.sweep_temporaries() == 0  # no folder yet
    (tmp_path / "c" / "ab").mkdir(parents=True)
    now = time.time()
    files = {"old.tmp": now - 120, "older.tmp": now - 600, "new.tmp": now - 30, "old.safetensors": now - 7200}
    for name, t in files.items():
        p = tmp_path / "c" / "ab" / name
        p.write_bytes(b"x")
        os.utime(p, (t, t))
    top = tmp_path / "c" / "top.tmp"  # only <root>/<xx>/*.tmp are the cache's temporaries
    top.write_bytes(b"x")
    os.utime(top, (now - 7200, now - 7200))
    assert dc.sweep_temporaries(max_age_s=60) == 2
    assert sorted(p.name for p in (tmp_path / "c" / "ab").iterdir()) == ["new.tmp", "old.safetensors"]
    assert top.exists()
    assert dc.sweep_temporaries() == 0  # the default age is an hour
    os.utime(tmp_path / "c" / "ab" / "new.tmp", (now - K.TMP_MAX_AGE_S - 60,) * 2)
    assert dc.sweep_temporaries() == 1


def test_latent_progress_and_non_finite_vae(comfy, K, sd15, tmp_path):
    D = comfy.engine("data.dataset")
    caps, bk = comfy.engine("data.captions"), comfy.engine("data.buckets")
    folder = make_dataset(tmp_path / "d", n=2, sizes=((64, 64),)).parent
    ds = D.from_folder(folder, caps.CaptionConfig(), bk.BucketConfig(resolution=64, min_side=64, max_side=64, step=64))
    vae = sd15[2]
    seen = []
    lc = K.cache_latents(ds, vae, tmp_path / "cache", progress=lambda n, msg: seen.append((n, msg)))
    assert seen == [(1, "latents 1/2 (hits 0, encoded 1)"), (2, "latents 2/2 (hits 0, encoded 2)")]
    assert lc.stats == (0, 2, 0) and lc.root == str(tmp_path / "cache" / "latents") and lc.vae_id == K.vae_identity(vae)
    seen.clear()
    K.cache_latents(ds, vae, tmp_path / "cache", progress=lambda n, msg: seen.append((n, msg)))
    assert seen[-1] == (2, "latents 2/2 (hits 2, encoded 0)")
    w = dict(vae.first_stage_model.named_parameters())["encoder.conv_in.weight"]
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.fill_(float("nan"))  # a broken VAE: a new identity, so the items are encoded again
        with pytest.raises(ValueError, match=r"VAE gave a \(4, 8, 8\) latent with non-finite values for .*check the VAE"):
            K.cache_latents(ds, vae, tmp_path / "cache")
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_cancel_and_a_video_dataset_with_an_image_vae(comfy, K, sd15, tmp_path):
    """Cancel (ComfyUI's interrupt flag) stops Cache Latents before the next item; a video dataset is
    refused by an image VAE before anything is encoded (the dataset's own check)."""
    import comfy.model_management as mm

    from support.factories import clips

    D, V = comfy.engine("data.dataset"), comfy.engine("data.video")
    caps, bk = comfy.engine("data.captions"), comfy.engine("data.buckets")
    folder = make_dataset(tmp_path / "d", n=1, sizes=((64, 64),)).parent
    ds = D.from_folder(folder, caps.CaptionConfig(), bk.BucketConfig(resolution=64, min_side=64, max_side=64, step=64))
    assert K.cache_latents(ds, sd15[2], tmp_path / "cache").stats == (0, 1, 0)
    mm.interrupt_current_processing(True)  # also when every item is a cache hit (no VAE op runs to notice it)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            K.cache_latents(ds, sd15[2], tmp_path / "cache")
    finally:
        mm.interrupt_current_processing(False)
    clips.write_clip(tmp_path / "v" / "clip.mp4", 12, 16)
    vds = V.from_video_folder(tmp_path / "v", caps.CaptionConfig(), bk.BucketConfig(
        resolution=32, min_side=32, max_side=32, step=32), V.VideoConfig(frames=5, fps=16.0))
    with pytest.raises(D.DataError, match="encodes still images, but the video dataset has 5-frame clips"):
        K.cache_latents(vds, sd15[2], tmp_path / "vcache")
    assert not list((tmp_path / "vcache").rglob("*.safetensors"))


def test_unload_patcher_unloads_exactly_the_models_sharing_the_weights(comfy, K, sd15):
    """A loaded clone of the VAE with a weight patch (what a LoRA'd model is) is unloaded through the base patcher,
    its weights restored to the original values; the text encoder, another model, stays loaded."""
    import comfy.model_management as mm

    _, clip, vae = sd15
    K.unload_patcher(vae.patcher), K.unload_patcher(clip.patcher)  # start from neither loaded
    key = "encoder.conv_in.weight"
    w = vae.patcher.model.state_dict()[key]
    saved = w.detach().clone()
    clone = vae.patcher.clone()
    clone.add_patches({key: (torch.full_like(w, 0.5),)}, 1.0)
    try:
        mm.load_models_gpu([clip.patcher])
        mm.load_models_gpu([clone])
        assert torch.allclose(vae.patcher.model.state_dict()[key], saved + 0.5)  # patched in place while loaded
        assert K.is_loaded(vae) and K.is_loaded(clip)
        assert K.unload_patcher(vae.patcher) == 1
        assert torch.equal(vae.patcher.model.state_dict()[key], saved)  # unpatched on the way out
        assert not K.is_loaded(vae) and K.is_loaded(clip)
        assert K.unload_patcher(vae.patcher) == 0
    finally:
        K.unload_patcher(vae.patcher)
        K.unload_text_encoder(clip)
        with torch.no_grad():
            vae.patcher.model.state_dict()[key].copy_(saved)
    assert not K.is_loaded(clip)


def test_text_cache_literal_captions_progress_repeats_and_sweep(comfy, K, sd15, tmp_path):
    """An aligned CLIP set to ComfyUI's prompt syntax still encodes training captions literally (its training
    CLIP); progress counts the distinct texts; each sample keeps its folder's repeats; stale temporaries of both
    caches are swept when they are built."""
    D, caps, bk = comfy.engine("data.dataset"), comfy.engine("data.captions"), comfy.engine("data.buckets")
    align, sx = comfy.engine("te.align"), comfy.engine("te.syntax")
    folder = make_dataset(tmp_path / "d", n=1, repeats=3, sizes=((64, 64),))
    (folder / "img_000.txt").write_text("(ohwx:1.5) photo", encoding="utf-8")
    ds = D.from_folder(folder.parent, caps.CaptionConfig(), bk.BucketConfig(resolution=64, min_side=64, max_side=64,
                                                                             step=64))
    root = tmp_path / "cache"
    stale = [root / "latents" / "ab" / "x.tmp", root / "text" / "ab" / "x.tmp"]
    for p in stale:
        p.parent.mkdir(parents=True)
        p.write_bytes(b"half")
        os.utime(p, (time.time() - 2 * K.TMP_MAX_AGE_S,) * 2)
    lc = K.cache_latents(ds, sd15[2], root)
    assert not stale[0].exists() and stale[1].exists()
    clip = align.align_clip(sd15[1], "sd15").with_syntax(sx.COMFYUI)
    seen = []
    ts, _ = K.cache_text(lc, clip, root, progress=lambda n, msg: seen.append((n, msg)))
    assert not stale[1].exists()
    assert seen == [(1, "captions 1/2 (hits 0, encoded 1)"), (2, "captions 2/2 (hits 0, encoded 2)")]
    assert ts.meta["prompt_syntax"] == sx.LITERAL and ts.samples[0].repeats == 3
    literal = clip.with_syntax(sx.LITERAL)
    direct = literal.encode_from_tokens_scheduled(literal.tokenize("(ohwx:1.5) photo"))
    assert torch.allclose(ts.samples[0].captions[0].conditioning[0][0], direct[0][0].float(), atol=1e-6)
    parsed = clip.encode_from_tokens_scheduled(clip.tokenize("(ohwx:1.5) photo"))
    assert not torch.allclose(parsed[0][0].float(), direct[0][0].float(), atol=1e-4)  # the syntax does matter
    import comfy.model_management as mm

    mm.interrupt_current_processing(True)  # Cancel stops it before the next caption, also on cache hits
    try:
        with pytest.raises(mm.InterruptProcessingException):
            K.cache_text(lc, clip, root)
    finally:
        mm.interrupt_current_processing(False)
    K.unload_text_encoder(clip)
