"""Reading training images robustly: EXIF rotation, CMYK, palette, alpha and 16-bit images all become
8-bit RGB; unreadable or truncated files and decompression bombs raise one error naming the file. Formats a
dataset cannot use (animated GIF, SVG, HEIC, PSD) are named by ``unsupported`` so the dataset report can list
them."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
# image formats Pillow does not decode into a training image: reported, not silently skipped
UNSUPPORTED_EXTS = {".svg": "SVG (vector)", ".svgz": "SVG (vector)", ".heic": "HEIC", ".heif": "HEIF",
                    ".psd": "Photoshop", ".jxl": "JPEG XL", ".avif": "AVIF", ".raw": "camera raw", ".dng": "camera raw",
                    ".cr2": "camera raw", ".nef": "camera raw", ".arw": "camera raw"}


class DataError(ValueError):
    """Bad training data; the message names the file and what to do."""


def file_sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: EXIF orientation applied, alpha composited on white, 16-bit scaled down, CMYK converted."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray((arr / top * 255.0).clip(0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img.convert("RGBA"), mask=img.convert("RGBA").split()[-1])
        return bg
    return img.convert("RGB")


def unsupported(path: Path) -> str | None:
    """Why the file cannot be a training image (by its name), or None. Animated images are found on load."""
    kind = UNSUPPORTED_EXTS.get(Path(path).suffix.lower())
    return f"{kind} images are not supported; export it as PNG or JPEG" if kind else None


class Unsupported(DataError):
    """An image file in a format a dataset cannot use (animated); the dataset lists it in its report."""


def load_image(path: Path) -> Image.Image:
    path = Path(path)
    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1 and im.format in ("GIF", "PNG", "WEBP"):
                raise Unsupported(f"{path} is an animated {im.format} ({im.n_frames} frames); only still images "
                                  "are supported: export the frame you want as PNG")
            im.load()
            return to_rgb(im)
    except Image.DecompressionBombError as e:
        raise DataError(f"image {path} is too large to open safely ({e}); downscale it (e.g. below "
                        f"{Image.MAX_IMAGE_PIXELS} pixels) or remove it from the dataset folder.") from None
    except (OSError, SyntaxError, ValueError, MemoryError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"cannot read image {path}: {e}. Re-export it as PNG/JPEG or remove it from the "
                        "dataset folder.") from None
