"""On-disk caches of VAE latents and text conditionings (safetensors).

Every entry is written to a temporary name and renamed (never half-written), stores a digest of its
tensors in its metadata, and is verified on read: a corrupt or truncated entry is deleted and recomputed,
never trained on. Keys cover everything that changes the result.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import comfy.model_management as mm
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .dataset import Dataset, Item
from .types import CaptionVariant, Sample, TrainingSet

Progress = Callable[[int, str], None]
log = logging.getLogger("aligned_trainer")


def default_cache_root() -> Path:
    import folder_paths

    return Path(folder_paths.get_output_directory()) / "aligned_trainer" / "cache"


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class DiskCache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0
        self.repaired = 0

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        p = self.path(key)
        if not p.exists():
            return None
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if meta.get("key") != key or meta.get("digest") != tensors_digest(tensors):
                raise ValueError("digest mismatch")
            return tensors
        except Exception as e:  # truncated, corrupt, foreign: recompute
            log.warning("aligned_trainer: cache entry %s is unreadable (%s); recomputing it", p, e)
            self.repaired += 1
            p.unlink(missing_ok=True)
            return None

    def put(self, key: str, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> Path:
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        md = {"key": key, "digest": tensors_digest(tensors), **{k: str(v) for k, v in (meta or {}).items()}}
        fd, tmp = tempfile.mkstemp(dir=p.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=md)
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return p

    def get_or_compute(self, key: str, compute: Callable[[], dict[str, torch.Tensor]], meta=None):
        got = self.get(key)
        if got is not None:
            self.hits += 1
            return got
        self.misses += 1
        with torch.no_grad():
            tensors = {k: v.detach().clone() for k, v in compute().items()}
        self.put(key, tensors, meta)
        return tensors


def module_identity(module: torch.nn.Module, *extra) -> str:
    """Cheap identity of a model's weights: names/shapes/dtypes of all tensors + bytes of a few of them."""
    h = hashlib.sha256(type(module).__name__.encode())
    sd = module.state_dict()
    keys = sorted(sd)
    for k in keys:
        h.update(f"{k}{tuple(sd[k].shape)}{sd[k].dtype}".encode())
    for k in {keys[0], keys[len(keys) // 2], keys[-1]} if keys else ():
        h.update(sd[k].detach().float().cpu().numpy().tobytes())
    h.update(json.dumps([str(e) for e in extra]).encode())
    return h.hexdigest()[:24]


def vae_identity(vae) -> str:
    return module_identity(vae.first_stage_model, type(vae).__name__, getattr(vae, "latent_channels", None))


def clip_identity(clip) -> str:
    patches = sorted((k, len(v)) for k, v in getattr(clip.patcher, "patches", {}).items())
    return module_identity(clip.cond_stage_model, type(clip.tokenizer).__name__, clip.layer_idx,
                           sorted(getattr(clip, "tokenizer_options", {}).items()),
                           getattr(clip, "aligned_trainer_spec", None), patches)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class LatentCache:
    dataset: Dataset
    latents: tuple[torch.Tensor, ...]   # one (C, h, w) per dataset item
    vae_id: str
    root: str
    stats: tuple[int, int, int]         # hits, misses, repaired


def item_key(item: Item, vae_id: str) -> str:
    return _key("latent", item.sha, vae_id, item.bucket, item.crop, item.flip)


def cache_latents(dataset: Dataset, vae, root: Path | None = None, progress: Progress | None = None) -> LatentCache:
    root = Path(root or default_cache_root()) / "latents"
    cache = DiskCache(root)
    vid = vae_identity(vae)
    out = []
    for n, item in enumerate(dataset.items):
        mm.throw_exception_if_processing_interrupted()

        def compute(item=item):
            img = dataset.pixels(item)
            pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
            return {"latent": vae.encode(pixels)[0].float()}

        t = cache.get_or_compute(item_key(item, vid), compute, {"source": item.source, "bucket": item.bucket})
        out.append(t["latent"])
        if progress:
            progress(n + 1, f"latents {n + 1}/{len(dataset.items)} (hits {cache.hits}, encoded {cache.misses})")
    return LatentCache(dataset, tuple(out), vid, str(root), (cache.hits, cache.misses, cache.repaired))


def _cond_to_tensors(cond: list) -> dict[str, torch.Tensor]:
    c, extras = cond[0]
    out = {"cond": c.float()}
    for k, v in extras.items():
        if isinstance(v, torch.Tensor):
            out[f"x.{k}"] = v
    return out


def _tensors_to_cond(t: dict[str, torch.Tensor]) -> list:
    return [[t["cond"], {k[2:]: v for k, v in t.items() if k.startswith("x.")}]]


def unload_text_encoder(clip) -> None:
    """Let the text encoder leave memory through ComfyUI's model management."""
    for i in reversed(range(len(mm.current_loaded_models))):
        lm = mm.current_loaded_models[i]
        m = lm.model
        if m is not None and (m is clip.patcher or m.model is clip.patcher.model):
            lm.model_unload()
            mm.current_loaded_models.pop(i)
    mm.soft_empty_cache()


def is_loaded(clip) -> bool:
    return any(lm.model is not None and lm.model.model is clip.patcher.model for lm in mm.current_loaded_models)


def cache_text(latents: LatentCache, clip, root: Path | None = None, progress: Progress | None = None,
               unload: bool = True) -> tuple[TrainingSet, tuple[int, int, int]]:
    root = Path(root or default_cache_root()) / "text"
    cache = DiskCache(root)
    cid = clip_identity(clip)
    ds = latents.dataset
    texts = sorted({c for item in ds.items for c in item.captions} | {""})
    conds = {}
    for n, text in enumerate(texts):
        mm.throw_exception_if_processing_interrupted()
        t = cache.get_or_compute(_key("text", cid, text),
                                 lambda text=text: _cond_to_tensors(clip.encode_from_tokens_scheduled(clip.tokenize(text))),
                                 {"text": text[:200]})
        conds[text] = _tensors_to_cond(t)
        if progress:
            progress(n + 1, f"captions {n + 1}/{len(texts)} (hits {cache.hits}, encoded {cache.misses})")
    if unload:
        unload_text_encoder(clip)
    samples = []
    for item, lat in zip(ds.items, latents.latents):
        caps = tuple(CaptionVariant(c, conds[c]) for c in item.captions)
        samples.append(Sample(key=_key(item.sha, item.bucket, item.flip), latent=lat, captions=caps,
                              weight=ds.reg_weight if item.is_reg else 1.0, is_reg=item.is_reg, bucket=item.bucket,
                              repeats=item.repeats))
    meta = {"dataset_hash": ds.hash, "vae_id": latents.vae_id, "clip_id": cid, "report": ds.report(),
            "latent_cache": latents.root, "text_cache": str(root)}
    ts = TrainingSet(tuple(samples), empty_conditioning=conds[""], caption_dropout=ds.caption_cfg.caption_dropout,
                     te_spec_id=(getattr(clip, "aligned_trainer_spec", None) or {}).get("id"), meta=meta)
    return ts, (cache.hits, cache.misses, cache.repaired)
