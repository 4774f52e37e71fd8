"""Dataset tools from the kohya LoRA guide (issue #23 items 3 and 4): anti-AI-filter cleaning and the VAE
round-trip view, on the pack's own data engine and the tiny SD1.5's real VAE (ComfyUI's loader).

- Cleaning: smooth images with synthetic adversarial-style perturbations (random +-12/255 noise and a 2-pixel
  checkerboard motif) lose most of that perturbation energy, measured against the clean originals; the user's
  files are byte-identical afterwards; a second run reuses the cached copies; the detector flags the perturbed
  images and not the clean ones; the noise estimate recovers a known sigma.
- VAE round-trip: PSNR and SSIM equal a direct computation (numpy; SSIM with Wang et al.'s window over the
  valid region via scipy), and the report lists the worst image first.
The shipped workflow (workflows/dataset_tools.json) runs through the real server in test_workflows.py."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from support.api_nodes import node


@pytest.fixture(scope="module")
def E(comfy):
    class NS:
        cleaning = comfy.engine("data.cleaning")
        vrt = comfy.engine("data.vae_roundtrip")
        dataset = comfy.engine("data.dataset")
        captions = comfy.engine("data.captions")
        buckets = comfy.engine("data.buckets")
    return NS


def _smooth(k: int, size: int = 64) -> np.ndarray:
    """A smooth test image: two gradients and a soft disc (no fine texture of its own)."""
    y, x = np.mgrid[:size, :size] / (size - 1)
    disc = np.exp(-(((x - 0.3 - 0.1 * k) ** 2 + (y - 0.5) ** 2) / 0.05))
    img = np.stack([0.2 + 0.6 * x, 0.3 + 0.4 * y, 0.2 + 0.6 * disc], -1)
    return (img * 255).round()


def _perturb(arr: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.choice([-12.0, 12.0], size=arr.shape)             # adversarial-style +-12/255 per pixel
    yy, xx = np.mgrid[:arr.shape[0], :arr.shape[1]]
    motif = np.where((yy // 2 + xx // 2) % 2 == 0, 6.0, -6.0)[..., None]  # repeating 2-pixel checkerboard
    return np.clip(arr + noise + motif, 0, 255)


def _write(folder, name, arr):
    Image.fromarray(arr.astype(np.uint8)).save(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text(f"ohwx, {name}", encoding="utf-8")


def _dataset(E, root):
    return E.dataset.from_folder(root, E.captions.CaptionConfig(trigger_word="ohwx"),
                                 E.buckets.BucketConfig(resolution=64, min_side=64, max_side=64, step=64))


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_cleaning_removes_perturbation_energy_keeps_originals_and_reuses_copies(E, tmp_path):
    folder = tmp_path / "data" / "1_ohwx"
    folder.mkdir(parents=True)
    clean_ref = {}
    for k in range(3):
        clean_ref[f"attacked_{k}"] = _smooth(k)
        _write(folder, f"attacked_{k}", _perturb(_smooth(k), k))
    _write(folder, "clean_0", _smooth(3))
    before = {p.name: _sha(p) for p in folder.iterdir()}
    ds = _dataset(E, folder.parent)
    cfg = E.cleaning.CleanConfig()  # bilateral + JPEG re-encode, the default
    out, rep = E.cleaning.clean_dataset(ds, cfg, tmp_path / "cache" / "cleaned")
    assert rep["written"] == 4 and rep["reused"] == 0
    assert {p.name: _sha(p) for p in folder.iterdir()} == before  # the user's files are never written

    # the perturbation's energy against the clean original, before and after cleaning
    ratios = []
    for old, item in zip(ds.items, out.items):
        name = Path(old.source).stem
        if name not in clean_ref:
            continue
        assert item.source.startswith(str(tmp_path / "cache" / "cleaned"))
        cleaned = np.asarray(Image.open(item.source).convert("RGB"), dtype=np.float64)
        attacked = np.asarray(Image.open(folder / f"{name}.png").convert("RGB"), dtype=np.float64)
        e_before = np.mean((attacked - clean_ref[name]) ** 2)
        e_after = np.mean((cleaned - clean_ref[name]) ** 2)
        ratios.append(e_after / e_before)
    assert len(ratios) == 3
    assert max(ratios) < 0.15, f"perturbation energy kept after cleaning: {ratios}"  # measured: 0.09-0.10 (default bilateral 5 px, sigma 0.2, + JPEG 90)

    # captions, buckets, repeats kept; the pixels (so the dataset hash and latent keys) changed
    assert [(i.captions, i.bucket, i.repeats) for i in out.items] == [(i.captions, i.bucket, i.repeats) for i in ds.items]
    assert out.hash != ds.hash and all(a.sha != b.sha for a, b in zip(ds.items, out.items))
    assert np.asarray(out.pixels(out.items[0])).shape == (64, 64, 3)

    # detector: the attacked images are suspect, the clean one is not; the report lists suspects first
    flagged = {r["source"] for r in rep["images"] if r["suspect"]}
    assert flagged == {f"attacked_{k}.png" for k in range(3)}, rep["images"]
    assert rep["images"][-1]["source"] == "clean_0.png"
    assert all(r["after"]["noise_sigma"] < r["before"]["noise_sigma"] for r in rep["images"] if r["suspect"])
    assert any(n.startswith("suspect: attacked_0.png") for n in out.notes)

    # a second run reuses every cached copy without writing it again
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "cleaned").iterdir()}
    out2, rep2 = E.cleaning.clean_dataset(_dataset(E, folder.parent), cfg, tmp_path / "cache" / "cleaned")
    assert rep2["written"] == 0 and rep2["reused"] == 4
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "cleaned").iterdir()} == stamps
    assert out2.hash == out.hash
    # other settings are other copies; a damaged copy is written again
    _, rep3 = E.cleaning.clean_dataset(ds, E.cleaning.CleanConfig(method="median", kernel=3), tmp_path / "cache" / "cleaned")
    assert rep3["written"] == 4
    victim = next(iter(stamps))
    victim.write_bytes(b"not a png")
    _, rep4 = E.cleaning.clean_dataset(ds, cfg, tmp_path / "cache" / "cleaned")
    assert rep4["written"] == 1 and rep4["reused"] == 3


def test_cleaning_settings_are_checked(E):
    for bad, word in ((dict(method="sharpen"), "method"), (dict(kernel=4), "kernel"),
                      (dict(sigma_color=float("nan")), "sigma_color"), (dict(jpeg_quality=5), "jpeg_quality")):
        with pytest.raises(E.cleaning.DataError, match=word):
            E.cleaning.CleanConfig(**bad).validate()


def test_noise_estimate_recovers_a_known_sigma_and_the_motif_score_sees_a_pattern(E):
    rng = np.random.default_rng(0)
    flat = np.full((128, 128), 128.0)
    for sigma in (3.0, 10.0):
        noisy = Image.fromarray(np.clip(flat + rng.normal(0, sigma, flat.shape), 0, 255).round().astype(np.uint8))
        assert E.cleaning.noise_sigma(noisy) == pytest.approx(sigma, rel=0.08)
    smooth = Image.fromarray(_smooth(0).astype(np.uint8))
    yy, xx = np.mgrid[:64, :64]
    tiled = Image.fromarray(np.clip(_smooth(0) + 20 * np.sin(xx / 64 * 2 * np.pi * 12)[..., None], 0, 255).astype(np.uint8))
    assert E.cleaning.noise_sigma(smooth) < 1.0
    assert E.cleaning.periodic_score(tiled) > E.cleaning.PERIODIC_FLAG > E.cleaning.periodic_score(smooth)


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. (2004): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1, valid region,
    mean over channels."""
    from scipy.signal import convolve2d

    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    out = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch], b[..., ch]
        f = lambda z: convolve2d(z, w, mode="valid")  # noqa: E731
        mx, my = f(x), f(y)
        sxx, syy, sxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
        out.append(np.mean(((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))))
    return float(np.mean(out))


def test_vae_round_trip_metrics_match_a_direct_computation_worst_first(E, sd15, tmp_path):
    from support.factories.dataset import make_dataset

    _, _, vae = sd15
    folder = make_dataset(tmp_path / "data", n=2, sizes=((64, 64),))
    ds = _dataset(E, folder.parent)
    rows = E.vrt.roundtrip(ds, vae)
    assert len(rows) == 2
    for r in rows:
        a = np.asarray(r["original"], dtype=np.float64) / 255.0
        d = np.asarray(r["decoded"], dtype=np.float64) / 255.0
        assert r["psnr"] == pytest.approx(10 * np.log10(1.0 / np.mean((a - d) ** 2)), abs=2e-3)
        assert r["ssim"] == pytest.approx(_ssim_reference(a, d), abs=2e-4)
        assert bool(r["flags"]) == (r["psnr"] < E.vrt.PSNR_FLAG or r["ssim"] < E.vrt.SSIM_FLAG)
    # the decoded image is the VAE's round trip of the image as training sees it (bucketed), 8-bit
    item = next(i for i in ds.items if Path(i.source).name == rows[0]["source"])
    assert np.array_equal(np.asarray(ds.pixels(item)), np.asarray(rows[0]["original"]))
    with torch.inference_mode():
        dec = vae.decode(vae.encode(torch.from_numpy(np.asarray(rows[0]["original"], dtype=np.float32)[None] / 255.0)))
    assert np.abs((dec[0].clamp(0, 1).numpy() * 255.0).round() - np.asarray(rows[0]["decoded"])).max() <= 1
    assert [r["psnr"] for r in rows] == sorted(r["psnr"] for r in rows)  # worst first
    rep = E.vrt.report(rows)
    assert [r["source"] for r in rep["images"]] == [r["source"] for r in rows] and "original" not in rep["images"][0]
    # an identical pair is a perfect score (PSNR infinite, SSIM 1)
    t = torch.from_numpy(np.asarray(rows[0]["original"], dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    p, s = E.vrt.metrics(t, t.clone())
    assert p == float("inf") and s == pytest.approx(1.0, abs=1e-6)


@pytest.mark.server
@pytest.mark.parametrize("method", ["bilateral", "gaussian", "median"])
def test_cleaning_images_smaller_than_the_filter_window_through_the_server(server, method):
    """A 1x1 and a 2 px tall image in the dataset (kernel 5: a window of 2 px each side): each method cleans them
    (before: bilateral and gaussian failed the whole node with kornia's 'Padding size should be less than the
    corresponding input dimension'). A one-colour image stays that colour under any blur of its own pixels."""
    folder = server.input_dir / "tiny_images"
    if not folder.exists():
        folder.mkdir()
        for name, size, colour in (("dot", (1, 1), (200, 40, 90)), ("strip", (40, 2), (30, 160, 220))):
            Image.new("RGB", size, colour).save(folder / f"{name}.png")
            (folder / f"{name}.txt").write_text(name, encoding="utf-8")
    prompt = {"1": node(server, "AlignedTrainer_Dataset", folder="tiny_images", resolution=64, min_side=64,
                        max_side=64),
              "2": node(server, "AlignedTrainer_CleanDataset", dataset=["1", 0], method=method, kernel=5),
              "3": node(server, "PreviewAny", source=["2", 1])}
    entry = server.run(prompt)
    report = json.loads(entry["outputs"]["3"]["text"][0])
    assert sorted(r["source"] for r in report["images"]) == ["dot.png", "strip.png"], report
    for f in sorted(folder.glob("*.png")):
        original = np.asarray(Image.open(f).convert("RGB"))
        copies = list(Path(report["folder"]).glob(f"{hashlib.sha256(f.read_bytes()).hexdigest()[:24]}-*.png"))
        cleaned = [np.asarray(Image.open(c).convert("RGB")) for c in copies]
        assert cleaned and all(c.shape == original.shape for c in cleaned), (f.name, [c.shape for c in cleaned])
        assert any(np.abs(c.astype(int) - original.astype(int)).max() <= 1 for c in cleaned), f.name
