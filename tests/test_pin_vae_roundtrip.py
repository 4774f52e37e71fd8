"""data/vae_roundtrip.py pinned (issue #26): PSNR and SSIM against a direct numpy/scipy computation on hand-built
tensors (clamping, an all-black/all-white pair, identical images), the amplified difference image, the report's
counts and rounding, and the round trip itself on the tiny SD1.5's VAE and on ComfyUI's Wan 2.1 VAE (a video VAE:
one frame axis more): flipped copies skipped, the decoded image equal to the stock VAE's own round trip of the
bucketed image, progress, interruption, worst first."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture
def V(comfy):
    return comfy.engine("data.vae_roundtrip")


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al.'s SSIM ((H, W, 3) in [0, 1]): 11x11 Gaussian window, sigma 1.5, valid region, channel mean."""
    from scipy.signal import convolve2d

    x = np.arange(11) - 5
    g = np.exp(-(x ** 2) / (2 * 1.5 ** 2))
    g /= g.sum()
    w = np.outer(g, g)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    out = []
    for ch in range(3):
        p, q = a[..., ch], b[..., ch]
        f = lambda z: convolve2d(z, w, mode="valid")  # noqa: E731
        mp, mq = f(p), f(q)
        spp, sqq, spq = f(p * p) - mp ** 2, f(q * q) - mq ** 2, f(p * q) - mp * mq
        out.append(np.mean(((2 * mp * mq + c1) * (2 * spq + c2)) / ((mp ** 2 + mq ** 2 + c1) * (spp + sqq + c2))))
    return float(np.mean(out))


def _nchw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1)[None]


def test_metrics_against_a_direct_computation(V):
    rng = np.random.default_rng(0)
    a = rng.uniform(0.1, 0.9, (20, 26, 3))
    b = a + rng.normal(0, 0.08, a.shape)
    b[:4] += 0.5  # a band above 1: the decoded image is clamped to [0, 1], the original is not touched
    p, s = V.metrics(_nchw(a), _nchw(b))
    bc = np.clip(b.astype(np.float32).astype(np.float64), 0, 1)
    a32 = a.astype(np.float32).astype(np.float64)
    assert p == pytest.approx(10 * np.log10(1 / np.mean((a32 - bc) ** 2)), abs=1e-3)
    assert s == pytest.approx(_ssim(a32, bc), abs=2e-4)
    # black against white: MSE 1, PSNR 0 dB, SSIM ~0
    black, white = np.zeros((16, 16, 3)), np.ones((16, 16, 3))
    p, s = V.metrics(_nchw(black), _nchw(white))
    assert p == pytest.approx(0.0, abs=1e-5) and s == pytest.approx(_ssim(black, white), abs=1e-4)
    # differences of both signs that cancel out on average: still a finite PSNR (the mean of the squares)
    c = np.full((16, 16, 3), 0.5)
    d = c + np.where(np.indices(c.shape).sum(0) % 2 == 0, 0.25, -0.25)
    p, _ = V.metrics(_nchw(c), _nchw(d))
    assert p == pytest.approx(10 * np.log10(1 / 0.0625), abs=1e-4)
    # identical: PSNR infinite, SSIM 1
    p, s = V.metrics(_nchw(a), _nchw(a))
    assert p == float("inf") and s == pytest.approx(1.0, abs=1e-6)


def test_difference_is_amplified_and_clipped(V):
    a = Image.fromarray(np.array([[[10, 200, 50], [0, 0, 0]]], dtype=np.uint8))
    b = Image.fromarray(np.array([[[30, 100, 50], [1, 0, 255]]], dtype=np.uint8))
    assert np.asarray(V.difference(a, b)).tolist() == [[[80, 255, 0], [4, 0, 255]]]
    assert np.asarray(V.difference(a, b, gain=0.5)).tolist() == [[[10, 50, 0], [0, 0, 127]]]


def test_report_counts_flagged_images_and_leaves_out_pixels(V):
    rows = [{"source": "a.png", "bucket": [64, 64], "psnr": 20.5, "ssim": 0.5, "flags": ["PSNR 20.5 dB < 25"],
             "original": None, "decoded": None},
            {"source": "b.png", "bucket": [64, 64], "psnr": 31.0, "ssim": 0.9, "flags": [], "original": None,
             "decoded": None}]
    rep = V.report(rows)
    assert rep["flagged"] == 1 and [r["source"] for r in rep["images"]] == ["a.png", "b.png"]
    assert set(rep["images"][0]) == {"source", "bucket", "psnr", "ssim", "flags"}
    assert rep["thresholds"] == {"psnr_db": V.PSNR_FLAG, "ssim": V.SSIM_FLAG}
    assert V.report([])["flagged"] == 0


def _dataset(comfy, tmp_path, n=2, write=True):
    from support.factories.dataset import make_dataset

    dataset, captions, buckets = (comfy.engine(f"data.{m}") for m in ("dataset", "captions", "buckets"))
    if write:
        make_dataset(tmp_path / "data", n=n, sizes=((64, 64), (80, 64)))
    return dataset.from_folder(tmp_path / "data", captions.CaptionConfig(trigger_word="ohwx"),
                               buckets.BucketConfig(resolution=64, min_side=64, max_side=64, step=64), flip=True)


def _direct(vae, img: Image.Image) -> np.ndarray:
    """The stock VAE's round trip of the image, 8-bit, as a sample is saved."""
    with torch.inference_mode():
        dec = vae.decode(vae.encode(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]))
    dec = dec.reshape(-1, *dec.shape[-3:])[0]
    return (dec.clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)


def test_round_trip_on_the_sd15_vae(V, comfy, sd15, tmp_path):
    vae = sd15[2]
    ds = _dataset(comfy, tmp_path)
    first, second = (next(i for i in ds.items if Path(i.source).name == f"img_00{k}.png") for k in (0, 1))
    direct = {np.asarray(ds.pixels(i)).tobytes(): _direct(vae, ds.pixels(i)) for i in (first, second)}
    psnr = [V.metrics(_nchw(np.asarray(ds.pixels(i)) / 255.0),
                      _nchw(direct[np.asarray(ds.pixels(i)).tobytes()] / 255.0))[0] for i in (first, second)]
    if psnr[0] < psnr[1]:  # make the folder's first image the better one: worst first is then a reordering
        folder = Path(first.source).parent
        for stem, new in (("img_000", "tmp"), ("img_001", "img_000"), ("tmp", "img_001")):
            for ext in (".png", ".txt"):
                (folder / (stem + ext)).rename(folder / (new + ext))
        ds = _dataset(comfy, tmp_path, write=False)
    assert len(ds.items) == 4  # each image and its mirrored copy
    calls = []
    rows = V.roundtrip(ds, vae, progress=lambda n, total: calls.append((n, total)), interrupted=lambda: None)
    assert calls == [(1, 2), (2, 2)]
    assert sorted(r["source"] for r in rows) == ["img_000.png", "img_001.png"]
    assert [(r["psnr"], r["ssim"]) for r in rows] == sorted((r["psnr"], r["ssim"]) for r in rows)  # worst first
    assert [r["source"] for r in rows] == ["img_001.png", "img_000.png"]  # not the folder's order
    for r in rows:
        item = next(i for i in ds.items if Path(i.source).name == r["source"] and not i.flip)
        assert r["bucket"] == list(item.bucket)
        assert np.array_equal(np.asarray(r["original"]), np.asarray(ds.pixels(item)))  # not the mirrored copy
        assert np.array_equal(np.asarray(r["decoded"]), direct[np.asarray(r["original"]).tobytes()])
        a = np.asarray(r["original"], dtype=np.float64) / 255.0
        d = np.asarray(r["decoded"], dtype=np.float64) / 255.0
        assert r["psnr"] == pytest.approx(10 * np.log10(1 / np.mean((a - d) ** 2)), abs=2e-3)
        assert r["ssim"] == pytest.approx(_ssim(a, d), abs=2e-4)
        assert r["psnr"] == round(r["psnr"], 3) and r["ssim"] == round(r["ssim"], 4)  # the report's precision
        expect = [f"PSNR {r['psnr']:.1f} dB < 25"] if r["psnr"] < 25 else []
        expect += [f"SSIM {r['ssim']:.3f} < 0.8"] if r["ssim"] < 0.8 else []
        assert r["flags"] == expect
    # the rounded values keep enough digits: no two rows are equal here, so the order is the PSNR's
    assert len({r["psnr"] for r in rows}) == 2

    class Stop(Exception):
        pass

    def interrupted():
        raise Stop

    with pytest.raises(Stop):
        V.roundtrip(ds, vae, interrupted=interrupted)


def test_round_trip_on_a_video_vae(V, comfy, tmp_path):
    from support.factories import wan

    vae = wan.build_vae()
    ds = _dataset(comfy, tmp_path, n=1)
    rows = V.roundtrip(ds, vae)
    assert len(rows) == 1
    decoded = np.asarray(rows[0]["decoded"])
    assert decoded.shape == (64, 64, 3) and np.array_equal(decoded, _direct(vae, rows[0]["original"]))
