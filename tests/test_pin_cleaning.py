"""data/cleaning.py pinned (issue #26): Clean Dataset's filters, detector scores, settings and the cleaned dataset,
each against an independent computation on small images written here:

- the filters against numpy/scipy references of their textbook definitions on the image interior (bilateral: Gaussian
  space weight times Gaussian colour weight of the summed channel difference, as kornia's ``l1`` colour distance;
  Gaussian: separable sampled Gaussian; median: ``scipy.ndimage.median_filter``), the JPEG step against Pillow's own
  encoder at the chosen quality with no chroma subsampling;
- ``noise_sigma`` against Immerkaer's formula through ``scipy.signal.convolve2d``; ``periodic_score`` on a pure cosine
  whose spectral peak and neighbourhood are known, against scipy's FFT and ``median_filter``;
- the settings' documented ranges at their edges;
- a graph-image dataset cleaned equals the dataset built from the cleaned pixels (items, hash), with progress, notes and
  the before/after preview rows checked against the datasets' own pixels.
Run time: about 1 s in all."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def C(comfy):
    return comfy.engine("data.cleaning")


def _test_image(seed: int = 0, size: int = 20) -> Image.Image:
    """A smooth gradient with speckle and two hard edges (so the filters have something to smooth and to keep)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] / (size - 1)
    base = np.stack([40 + 150 * x, 60 + 120 * y, 200 - 150 * x * y], -1)
    base[:, size // 2:, 0] += 50
    base[size // 3:, :, 2] -= 60
    arr = np.clip(base + rng.normal(0, 14, base.shape), 0, 255).round().astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _f(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64) / 255.0


def _gauss1d(k: int, sigma: float) -> np.ndarray:
    n = np.arange(k) - k // 2
    g = np.exp(-n ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def _bilateral_ref(a: np.ndarray, k: int, sigma_color: float, sigma_space: float) -> np.ndarray:
    """Interior pixels of the bilateral filter: weight = exp(-(dy^2+dx^2)/2 s_s^2) * exp(-(sum_c |a_q - a_p|)^2 / 2 s_c^2)."""
    r = k // 2
    h, w, _ = a.shape
    out = np.zeros((h - 2 * r, w - 2 * r, 3))
    for i in range(r, h - r):
        for j in range(r, w - r):
            win = a[i - r:i + r + 1, j - r:j + r + 1]
            dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
            space = np.exp(-(dy ** 2 + dx ** 2) / (2 * sigma_space ** 2))
            colour = np.exp(-np.abs(win - a[i, j]).sum(-1) ** 2 / (2 * sigma_color ** 2))
            wgt = space * colour
            out[i - r, j - r] = (win * wgt[..., None]).sum((0, 1)) / wgt.sum()
    return out


def _gaussian_ref(a: np.ndarray, k: int, sigma: float) -> np.ndarray:
    from scipy.signal import convolve2d

    g = _gauss1d(k, sigma)
    ker = np.outer(g, g)
    return np.stack([convolve2d(a[..., c], ker, mode="valid") for c in range(3)], -1)


def _median_ref(a: np.ndarray, k: int) -> np.ndarray:
    from scipy.ndimage import median_filter

    r = k // 2
    return np.stack([median_filter(a[..., c], size=k) for c in range(3)], -1)[r:-r, r:-r]


def _jpeg_ref(img: Image.Image, quality: int) -> np.ndarray:
    import io

    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, subsampling=0)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _close_8bit(got: Image.Image, ref: np.ndarray, r: int) -> None:
    """``got``'s interior equals the float reference rounded to 8 bits (a rounding tie may land one level off)."""
    g = np.asarray(got, dtype=np.int64)
    g = g[r:-r, r:-r] if r else g
    want = np.round(np.clip(ref, 0, 1) * 255).astype(np.int64)
    diff = np.abs(g - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.02, (diff.max(), (diff > 0).mean())


@pytest.mark.parametrize("kernel,sigma_color,sigma_space", [(5, 0.2, 1.5), (3, 0.05, 0.8)])
def test_each_filter_is_its_textbook_definition(C, kernel, sigma_color, sigma_space):
    img = _test_image()
    a = _f(img)
    r = kernel // 2
    cfg = dict(kernel=kernel, sigma_color=sigma_color, sigma_space=sigma_space)
    bil = C.clean_image(img, C.CleanConfig(method="bilateral", **cfg))
    _close_8bit(bil, _bilateral_ref(a, kernel, sigma_color, sigma_space), r)
    med = C.clean_image(img, C.CleanConfig(method="median", **cfg))
    _close_8bit(med, _median_ref(a, kernel), r)
    gau = C.clean_image(img, C.CleanConfig(method="gaussian", **cfg))
    _close_8bit(gau, _gaussian_ref(a, kernel, sigma_space), r)
    for out in (bil, med, gau):
        assert out.size == img.size and out.mode == "RGB"
    # the filters differ from each other and from the input (none is skipped or swapped for another)
    assert len({np.asarray(o).tobytes() for o in (img, bil, med, gau)}) == 4


@pytest.mark.parametrize("quality", [90, 35])
def test_jpeg_step_is_pillows_encoder_at_the_quality_without_chroma_subsampling(C, quality):
    img = _test_image(1)
    only = C.clean_image(img, C.CleanConfig(method="jpeg", jpeg_quality=quality))
    assert np.array_equal(np.asarray(only), _jpeg_ref(img, quality))
    # the +jpeg methods are the filter, then that re-encode of the filtered 8-bit image
    for method in ("bilateral", "median"):
        cfg = C.CleanConfig(method=method + "+jpeg", jpeg_quality=quality, kernel=3)
        filtered = C.clean_image(img, C.CleanConfig(method=method, kernel=3))
        assert np.array_equal(np.asarray(C.clean_image(img, cfg)), _jpeg_ref(filtered, quality))


def _immerkaer(img: Image.Image) -> float:
    from scipy.signal import convolve2d

    g = np.asarray(img.convert("L"), dtype=np.float64)
    mask = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)
    h, w = g.shape
    return float(np.sqrt(np.pi / 2) / (6 * (w - 2) * (h - 2)) * np.abs(convolve2d(g, mask, mode="valid")).sum())


def test_noise_sigma_is_immerkaers_estimate(C):
    rng = np.random.default_rng(3)
    for h, w in ((9, 13), (3, 3), (3, 7), (7, 3)):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        assert C.noise_sigma(img) == pytest.approx(_immerkaer(img), rel=1e-12), (h, w)
        assert C.noise_sigma(img) > 0
    for h, w in ((2, 9), (9, 2)):  # no 3x3 window: no estimate
        assert C.noise_sigma(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")) == 0.0


def _periodic_ref(img: Image.Image) -> float:
    """The documented score, spelled with scipy: Hann-windowed (mean removed) grey image, centred magnitude spectrum;
    the largest magnitude whose squared distance from the centre exceeds (min(h, w) / 16)^2, over the median of the
    9x9 block around it (cut at the array's edges)."""
    from scipy import fft
    from scipy.signal.windows import hann

    g = np.asarray(img.convert("L"), dtype=np.float64)
    h, w = g.shape
    mag = np.abs(fft.fftshift(fft.fft2((g - g.mean()) * np.outer(hann(h, sym=True), hann(w, sym=True)))))
    best, where = -1.0, None
    for y in range(h):
        for x in range(w):
            if (y - h // 2) ** 2 + (x - w // 2) ** 2 > (min(h, w) / 16) ** 2 and mag[y, x] > best:
                best, where = mag[y, x], (y, x)
    y, x = where
    return float(best / np.median(mag[max(y - 4, 0):y + 5, max(x - 4, 0):x + 5]))


def test_periodic_score_is_the_peak_over_its_neighbourhood_median(C):
    rng = np.random.default_rng(5)
    # soft bars, not square: their spectra fall with frequency, so the peak found is on the edge of the skipped disc,
    # above its centre for the flat bar, beside it for the upright one (the disc's size and shape decide both)
    yy, xx = np.mgrid[:48, :64]
    def bar(sy, sx):
        return Image.fromarray((40 + 180 * np.exp(-(yy - 23.5) ** 2 / (2 * sy ** 2) - (xx - 31.5) ** 2 / (2 * sx ** 2)))
                               .round().astype(np.uint8)).convert("RGB")

    blob, blob_x = bar(1.5, 6.0), bar(6.0, 1.5)
    # a checkerboard of 1-pixel squares: the peak in the spectrum's corner (its neighbourhood cut by both edges)
    y1, x1 = np.mgrid[:40, :40]
    checker = Image.fromarray(np.clip(128 + 50 * ((x1 + y1) % 2) + rng.normal(0, 4, (40, 40)), 0, 255)
                              .round().astype(np.uint8)).convert("RGB")
    # one pixel one level brighter: every magnitude outside the disc is below 1
    bump = np.full((32, 32), 100, np.uint8)
    bump[16, 16] = 101
    bump = Image.fromarray(bump).convert("RGB")
    # a cosine of 9 cycles across 64 px: a motif, flagged
    y2, x2 = np.mgrid[:64, :64]
    motif = Image.fromarray(np.clip(128 + 60 * np.cos(2 * np.pi * 9 * x2 / 64) + rng.normal(0, 3, (64, 64)), 0, 255)
                            .round().astype(np.uint8)).convert("RGB")
    for img in (blob, blob_x, checker, bump, motif):
        assert C.periodic_score(img) == pytest.approx(_periodic_ref(img), rel=1e-9)
    assert C.periodic_score(motif) > C.PERIODIC_FLAG > C.periodic_score(blob)
    # no spectrum (flat) or nothing outside the skipped disc (one pixel): no score
    assert C.periodic_score(Image.new("RGB", (16, 16), (90, 90, 90))) == 0.0
    assert C.periodic_score(Image.new("RGB", (1, 1), (90, 10, 90))) == 0.0


def test_suspect_flags_only_scores_strictly_above_the_thresholds(C):
    assert C.suspect({"noise_sigma": C.NOISE_FLAG, "periodic": C.PERIODIC_FLAG}) == []
    noisy = C.suspect({"noise_sigma": C.NOISE_FLAG + 0.01, "periodic": C.PERIODIC_FLAG})
    motif = C.suspect({"noise_sigma": 0.0, "periodic": C.PERIODIC_FLAG + 0.01})
    assert len(noisy) == 1 and "noise" in noisy[0]
    assert len(motif) == 1 and "repeating pattern" in motif[0]
    assert len(C.suspect({"noise_sigma": 9.0, "periodic": 30.0})) == 2
    img = _test_image()
    s = C.scores(img)
    assert s == {"noise_sigma": pytest.approx(C.noise_sigma(img), abs=5e-4),
                 "periodic": pytest.approx(C.periodic_score(img), abs=5e-3)}


def test_settings_ranges_at_their_edges(C):
    ok = [dict(kernel=3), dict(kernel=15), dict(jpeg_quality=10), dict(jpeg_quality=100),
          dict(sigma_color=1e-3, sigma_space=1e-3)]
    for kw in ok:
        C.CleanConfig(**kw).validate()
    bad = [(dict(kernel=1), "kernel"), (dict(kernel=17), "kernel"), (dict(kernel=6), "kernel"),
           (dict(jpeg_quality=9), "jpeg_quality"), (dict(jpeg_quality=101), "jpeg_quality"),
           (dict(sigma_color=0.0), "sigma_color"), (dict(sigma_space=0.0), "sigma_space"),
           (dict(sigma_space=float("inf")), "sigma_space"), (dict(sigma_color=-1.0), "sigma_color")]
    for kw, word in bad:
        with pytest.raises(C.DataError, match=word):
            C.CleanConfig(**kw).validate()
    # every setting is part of the cache name: two configs differing in any one of them differ in digest
    base = C.CleanConfig()
    variants = [C.CleanConfig(method="median"), C.CleanConfig(kernel=3), C.CleanConfig(sigma_color=0.3),
                C.CleanConfig(sigma_space=2.0), C.CleanConfig(jpeg_quality=80)]
    assert len({base.digest(), *(v.digest() for v in variants)}) == 6
    assert base.digest() == C.CleanConfig().digest()


def test_graph_images_cleaned_equal_the_dataset_of_the_cleaned_pixels(C, D, tmp_path):
    imgs = [_test_image(7, 32), _test_image(8, 32)]
    white = np.asarray(imgs[0]).copy()
    white[:6, :6] = 255
    imgs[0] = Image.fromarray(white)
    batch = torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in imgs]))
    batch[0, :6, :6] = 1.7  # an IMAGE from the graph may go past 1: read as white, as the dataset reads it
    ccfg, bcfg = D.captions.CaptionConfig(), D.buckets.BucketConfig(resolution=32, min_side=32, max_side=32, step=32)
    ds = D.dataset.from_images(batch, ["a red thing", "a blue thing"], ccfg, bcfg, flip=True)
    calls = []
    cfg = C.CleanConfig(method="median", kernel=3)
    out, rep = C.clean_dataset(ds, cfg, tmp_path / "cleaned", progress=lambda n, t: calls.append((n, t)))
    assert calls == [(1, 2), (2, 2)]
    assert not (tmp_path / "cleaned").exists() or not any((tmp_path / "cleaned").iterdir())  # graph: in memory

    cleaned = [C.clean_image(i, cfg) for i in imgs]
    ref = D.dataset.from_images(torch.from_numpy(np.stack([np.asarray(c, dtype=np.float32) / 255.0 for c in cleaned])),
                                ["a red thing", "a blue thing"], ccfg, bcfg, flip=True)
    assert [(i.source, i.sha, i.captions, i.bucket, i.flip) for i in out.items] == \
           [(i.source, i.sha, i.captions, i.bucket, i.flip) for i in ref.items]
    assert out.hash == ref.hash != ds.hash
    for k in range(2):
        assert torch.equal(out.graph_images[k], ref.graph_images[k])
    assert out.notes[-1 - sum(n.startswith("suspect") for n in out.notes)] == \
        f"cleaned: 2 images with median (0 written, 0 reused from cleaned)"
    assert out.notes[:len(ds.notes)] == ds.notes
    assert rep["written"] == rep["reused"] == 0 and rep["config"]["kernel"] == 3
    assert {r["source"] for r in rep["images"]} == {"graph:0", "graph:1"}
    for r in rep["images"]:
        k = int(r["source"].split(":")[1])
        assert r["before"] == C.scores(imgs[k]) and r["after"] == C.scores(cleaned[k])
        assert r["suspect"] == C.suspect(r["before"])

    # preview rows: original | cleaned | |difference| x4 of the unflipped items, in the report's order
    rows = C.preview_rows(ds, out, rep, 1)
    assert len(rows) == 1 and len(C.preview_rows(ds, out, rep, 5)) == 2
    label, (a, b, d), captions = rows[0]
    first = rep["images"][0]
    assert label == first["source"] + (" (suspect)" if first["suspect"] else "")
    old = next(i for i in ds.items if i.source == first["source"] and not i.flip)
    new = next(i for i in out.items if i.source == first["source"] and not i.flip)
    assert np.array_equal(np.asarray(a), np.asarray(ds.pixels(old)))
    assert np.array_equal(np.asarray(b), np.asarray(out.pixels(new)))
    want = np.clip(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) * 4, 0, 255)
    assert np.array_equal(np.asarray(d), want.astype(np.uint8))
    assert captions == [f"noise {first['before']['noise_sigma']:.1f}", f"noise {first['after']['noise_sigma']:.1f}",
                        "x4"]


def test_file_images_cleaned_equal_a_folder_of_the_cleaned_copies(C, D, tmp_path):
    """Files: the cleaned dataset reads the copies and has the hash of a dataset read from a folder holding them;
    the report lists the most suspect first; a file edited after the Dataset node read it is refused."""
    src = tmp_path / "src" / "1_x"
    src.mkdir(parents=True)
    rng = np.random.default_rng(11)
    flat = np.full((32, 32, 3), 128.0)
    yy, xx = np.mgrid[:32, :32]
    pics = {"calm": flat + rng.normal(0, 1, flat.shape),                                   # neither flag
            "grainy": flat + rng.normal(0, 9, flat.shape),                                 # noise only
            "grainier": flat + rng.normal(0, 14, flat.shape),                              # noise only, more
            "both": flat + rng.normal(0, 9, flat.shape) + 50 * np.cos(2 * np.pi * 8 * xx / 32)[..., None]}
    for name, arr in pics.items():
        Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8)).save(src / f"{name}.png")
        (src / f"{name}.txt").write_text(name, encoding="utf-8")
    ccfg, bcfg = D.captions.CaptionConfig(), D.buckets.BucketConfig(resolution=32, min_side=32, max_side=32, step=32)
    ds = D.dataset.from_folder(src.parent, ccfg, bcfg)
    cfg = C.CleanConfig(method="gaussian", kernel=3)
    out, rep = C.clean_dataset(ds, cfg, tmp_path / "cleaned")
    assert rep["written"] == 4 and rep["folder"] == str(tmp_path / "cleaned")
    copy = tmp_path / "copies" / "1_x"
    copy.mkdir(parents=True)
    for old, new in zip(ds.items, out.items):
        name = old.source.rsplit("/", 1)[-1][:-4]
        assert new.source.startswith(str(tmp_path / "cleaned")) and new.sha == hashlib.sha256(
            open(new.source, "rb").read()).hexdigest()
        assert np.array_equal(np.asarray(Image.open(new.source).convert("RGB")),
                              np.asarray(C.clean_image(Image.open(old.source).convert("RGB"), cfg)))
        Image.open(new.source).save(copy / f"{name}.png")
        (copy / f"{name}.txt").write_text(name, encoding="utf-8")
    assert out.hash == D.dataset.from_folder(copy.parent, ccfg, bcfg).hash
    order = [r["source"] for r in rep["images"]]
    assert order == ["both.png", "grainier.png", "grainy.png", "calm.png"], rep["images"]
    assert [len(r["suspect"]) for r in rep["images"]] == [2, 1, 1, 0]
    assert [n for n in out.notes if n.startswith("suspect")] == [
        f"suspect: {r['source']}: {'; '.join(r['suspect'])}" for r in rep["images"][:3]]

    # a copy cut short (its header intact) is written again; settings are checked first; the root may be a str
    victim = next(p for p in (tmp_path / "cleaned").iterdir())
    victim.write_bytes(victim.read_bytes()[:len(victim.read_bytes()) // 2])
    out2, rep2 = C.clean_dataset(ds, cfg, str(tmp_path / "cleaned"))
    assert rep2["written"] == 1 and rep2["reused"] == 3 and out2.hash == out.hash
    with pytest.raises(C.DataError, match="kernel"):
        C.clean_dataset(ds, C.CleanConfig(kernel=4), tmp_path / "other")
    assert not (tmp_path / "other").exists()

    # a copy that cannot be written (a folder in its place): the error comes through, no temporary file is left
    blocked = Path(out.items[0].source)
    blocked.unlink()
    (blocked / "x").mkdir(parents=True)
    with pytest.raises(OSError):
        C.clean_dataset(ds, cfg, tmp_path / "cleaned")
    assert sorted(p.name for p in (tmp_path / "cleaned").iterdir()) == sorted(Path(i.source).name for i in out.items)
    (blocked / "x").rmdir()
    blocked.rmdir()

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(src / "calm.png")
    with pytest.raises(C.DataError, match="calm.png changed"):
        C.clean_dataset(ds, cfg, tmp_path / "cleaned")
