"""Small PIL helpers shared by report, grid and plot outputs: PIL <-> ComfyUI IMAGE tensors, text tables,
labelled grids. No fonts are downloaded: PIL's built-in font is used."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BG = (24, 24, 28)
FG = (230, 230, 230)
MUTED = (150, 150, 160)


def font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # old Pillow
        return ImageFont.load_default()


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> ComfyUI IMAGE (1, H, W, 3) float in [0, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]


def to_pil(image: torch.Tensor) -> Image.Image:
    """One ComfyUI IMAGE (H, W, 3) or (1, H, W, 3) -> PIL."""
    if image.ndim == 4:
        image = image[0]
    arr = (image.detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr)


def text_width(draw: ImageDraw.ImageDraw, text: str, f) -> int:
    box = draw.textbbox((0, 0), text, font=f)
    return box[2] - box[0]


def fit(text: str, width: int, draw, f) -> str:
    """``text``, or its longest prefix that fits ``width`` pixels with an ellipsis. The prefix is found by bisection
    (a prefix is never wider than a longer one): a label of n characters costs log n measurements, not n (a 20,000
    character label took minutes, blocking the queue)."""
    if text_width(draw, text, f) <= width:
        return text
    lo, hi = 0, len(text) - 1          # text[:lo] + "…" fits (or lo is 0); text[:hi + 1] + "…" is too wide
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text_width(draw, text[:mid] + "…", f) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + "…"


def table_image(headers: list[str], rows: list[list[str]], title: str = "", col_width: int = 130,
                first_col_width: int = 260, row_h: int = 20) -> torch.Tensor:
    """A readable table as an IMAGE."""
    f = font(12)
    widths = [first_col_width] + [col_width] * (len(headers) - 1)
    w = sum(widths) + 20
    h = (len(rows) + 1) * row_h + (30 if title else 10) + 10
    img = Image.new("RGB", (w, h), BG)
    d = ImageDraw.Draw(img)
    y = 8
    if title:
        d.text((10, y), title, fill=FG, font=font(14))
        y += 22
    for r, cells in enumerate([headers] + rows):
        x = 10
        for c, cell in enumerate(cells):
            d.text((x, y), fit(str(cell), widths[c] - 8, d, f), fill=MUTED if r == 0 else FG, font=f)
            x += widths[c]
        y += row_h
    return to_tensor(img)


def labelled_grid(cells: list[list[Image.Image]], row_labels: list[str], col_labels: list[str],
                  cell_labels: list[list[str]] | None = None, label_h: int = 18, left_w: int = 110) -> tuple[Image.Image, dict]:
    """Cells laid out in rows/columns with labels; returns the grid and its geometry (cell boxes)."""
    f = font(11)
    ch = max(c.height for row in cells for c in row)
    cw = max(c.width for row in cells for c in row)
    cell_h = ch + (label_h if cell_labels else 0)
    W = left_w + cw * len(col_labels)
    H = label_h + cell_h * len(row_labels)
    img = Image.new("RGB", (W, H), BG)
    d = ImageDraw.Draw(img)
    boxes = []
    for j, lab in enumerate(col_labels):
        d.text((left_w + j * cw + 3, 3), fit(lab, cw - 6, d, f), fill=FG, font=f)
    for i, lab in enumerate(row_labels):
        y0 = label_h + i * cell_h
        d.text((3, y0 + 3), fit(lab, left_w - 6, d, f), fill=FG, font=f)
        row_boxes = []
        for j, cell in enumerate(cells[i]):
            x0 = left_w + j * cw
            img.paste(cell, (x0, y0))
            row_boxes.append((x0, y0, x0 + cell.width, y0 + cell.height))
            if cell_labels:
                d.text((x0 + 3, y0 + ch + 2), fit(cell_labels[i][j], cw - 6, d, f), fill=MUTED, font=f)
        boxes.append(row_boxes)
    return img, {"cell_boxes": boxes, "size": (W, H)}


def rows_grid(rows: list[tuple[str, list[Image.Image], list[str]]], col_labels: list[str]) -> torch.Tensor:
    """An IMAGE of labelled rows ``(label, cells, cell captions)``; a one-line note when there are none."""
    if not rows:
        return table_image(["", ""], [["no images", ""]], title="nothing to show")
    img, _ = labelled_grid([r[1] for r in rows], [r[0] for r in rows], col_labels, [r[2] for r in rows])
    return to_tensor(img)
