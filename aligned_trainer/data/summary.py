"""What a dataset folder holds, before anything runs: images, captions and the buckets they would fall in,
read from image headers only (no decoding, no cache). Used by the frontend's dataset picker."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from PIL import Image

from .buckets import BucketConfig, assign_bucket, make_buckets
from .dataset import read_caption, scan_folder


def folder_summary(folder: Path, bucket_cfg: BucketConfig, limit: int = 24, roots=None) -> dict:
    """Counts of images, captions, repeats and buckets, and the first ``limit`` images (paths relative to
    ``folder``, with their caption) for a preview strip. Links out of ``roots`` (aligned_trainer.paths.Roots)
    are skipped, as the Dataset node skips them. Raises DataError for a missing folder."""
    folder = Path(folder)
    found = scan_folder(folder, roots)
    buckets = make_buckets(bucket_cfg)
    per_bucket: Counter = Counter()
    captions = unreadable = 0
    shown = []
    for path, repeats in found:
        caption = read_caption(path)
        captions += caption is not None
        try:
            with Image.open(path) as im:
                size = im.size
        except OSError:
            unreadable += 1
            continue
        w, h = assign_bucket(size, buckets)
        per_bucket[f"{w}x{h}"] += 1
        if len(shown) < limit:
            rel = path.relative_to(folder).as_posix()
            shown.append({"file": rel, "caption": caption or "", "size": list(size), "bucket": f"{w}x{h}",
                          "repeats": repeats})
    return {"images": len(found), "captions": captions, "unreadable": unreadable,
            "buckets": dict(sorted(per_bucket.items())), "shown": shown}
