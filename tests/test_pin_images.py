"""data/images.py pinned to hand-built files (issue #26): 16-bit and 32-bit grey scaled to 8 bits, alpha and
palette transparency composited on white, EXIF rotation, animated files refused by name, decompression bombs
and truncated files named in the error. Expected pixels are computed here with numpy from the values written."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


def _load(D, img: Image.Image, path, **save):
    img.save(path, **save)
    return np.asarray(D.images.load_image(path))


def test_high_bit_depth_grey_scaled_to_8_bits(D, tmp_path):
    v16 = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    out = _load(D, Image.fromarray(v16), tmp_path / "deep.png")
    expect = np.floor(v16.astype(np.float64) / 65535.0 * 255.0).astype(np.uint8)  # [0, 1, 127, 255]
    assert out.shape == (1, 4, 3) and np.array_equal(out[..., 0], expect) and np.array_equal(out[..., 2], expect)
    # 256 is beyond 8 bits: the file is scaled from 16 bits (256 / 65535 * 255 < 1)
    assert np.array_equal(_load(D, Image.fromarray(np.array([[0, 256]], dtype=np.uint16)), tmp_path / "d2.png")[..., 0],
                          np.array([[0, 0]], dtype=np.uint8))
    # a 16-bit file whose values stay within 0..255 is read as 8-bit values (no division by 65535)
    low = np.array([[0, 100, 255]], dtype=np.uint16)
    assert np.array_equal(_load(D, Image.fromarray(low), tmp_path / "low.png")[..., 1], low.astype(np.uint8))
    i32 = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32))  # mode "I" (32-bit), 8-bit range
    assert i32.mode == "I"
    assert np.array_equal(np.asarray(D.images.to_rgb(i32))[..., 0], np.array([[0, 100, 255]], dtype=np.uint8))


def test_alpha_and_palette_transparency_on_white(D, tmp_path):
    rgba = np.array([[[200, 10, 20, 0], [200, 10, 20, 255], [200, 10, 20, 102]]], dtype=np.uint8)
    out = _load(D, Image.fromarray(rgba, "RGBA"), tmp_path / "a.png").astype(int)
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [200, 10, 20]
    a = 102 / 255  # composited: colour * a + white * (1 - a)
    assert np.abs(out[0, 2] - (np.array([200, 10, 20]) * a + 255 * (1 - a))).max() <= 1
    la = np.array([[[90, 0], [90, 255]]], dtype=np.uint8)
    out = _load(D, Image.fromarray(la, "LA"), tmp_path / "la.png")
    assert out[0].tolist() == [[255, 255, 255], [90, 90, 90]]
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 30, 60, 90] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    out = _load(D, pal, tmp_path / "p.png", transparency=0)
    assert out[0].tolist() == [[255, 255, 255], [30, 60, 90]]


def test_exif_rotation_applied(D, tmp_path):
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: shown rotated 90 degrees clockwise
    out = _load(D, img, tmp_path / "r.png", exif=exif)
    assert np.array_equal(out, np.rot90(arr, k=-1))


def test_animated_refused_still_gif_read(D, tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    for ext in ("gif", "png", "webp"):
        p = tmp_path / f"anim.{ext}"
        frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
        with pytest.raises(D.images.Unsupported, match=rf"anim\.{ext} is an animated \w+ \(2 frames\)"):
            D.images.load_image(p)
    still = _load(D, frames[0], tmp_path / "still.gif")
    assert still.shape == (8, 8, 3) and still[0, 0].tolist() == [255, 0, 0]


def test_bomb_truncated_and_unsupported_named(D, tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2 x 1000: Pillow's bomb error
    with pytest.raises(D.images.DataError, match=r"big\.png is too large to open safely .*below 1000 pixels"):
        D.images.load_image(big)
    monkeypatch.undo()
    cut = tmp_path / "cut.png"
    cut.write_bytes(big.read_bytes()[:60])
    with pytest.raises(D.images.DataError, match=r"cannot read image .*cut\.png"):
        D.images.load_image(cut)
    assert "HEIC images are not supported" in D.images.unsupported(tmp_path / "x.HEIC")
    assert D.images.unsupported(tmp_path / "x.png") is None
