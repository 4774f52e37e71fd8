"""On-disk caches of VAE latents and text conditionings (safetensors).

Every entry is written to a temporary name and renamed (never half-written), stores a digest of its
tensors in its metadata, and is verified on read: a corrupt or truncated entry is deleted and recomputed,
never trained on. Keys cover everything that changes the result.
"""
from __future__ import annotations

import contextlib

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import comfy.model_management as mm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .dataset import Dataset, Item
from .types import CaptionVariant, Sample, TrainingSet

Progress = Callable[[int, str], None]
log = logging.getLogger("aligned_trainer")

# Part of every key: bump when the way an entry is computed changes (resize/crop method, stored layout).
CACHE_VERSION = "2"
PIXEL_PIPELINE = "exif-rgb8|lanczos-cover|centre-crop"
TMP_MAX_AGE_S = 3600


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

    def sweep_temporaries(self, max_age_s: float = TMP_MAX_AGE_S) -> int:
        """Delete temporary files left by a process killed mid-write (older than ``max_age_s``)."""
        import time

        n = 0
        if self.root.is_dir():
            for t in self.root.glob("*/*.tmp"):
                try:
                    if time.time() - t.stat().st_mtime > max_age_s:
                        t.unlink()
                        n += 1
                except OSError:
                    pass
        return n

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


SAMPLES_PER_TENSOR = 32


def _tensor_sample(t: torch.Tensor) -> bytes:
    """Bytes of up to ``SAMPLES_PER_TENSOR`` evenly spaced elements of ``t`` (cheap on any device/size)."""
    try:
        flat = t.detach().reshape(-1)
        n = flat.numel()
        if n == 0:
            return b""
        k = min(n, SAMPLES_PER_TENSOR)
        idx = torch.tensor([i * (n - 1) // max(k - 1, 1) for i in range(k)], device=flat.device)
        return flat[idx].float().cpu().numpy().tobytes()
    except Exception:  # exotic (quantized) tensor types: names/shapes still count
        return b"?"


def _fingerprint(obj, h, depth: int = 0) -> None:
    """Feed a stable description of ``obj`` (tensors sampled, containers recursed) into ``h``."""
    if depth > 6:
        h.update(type(obj).__name__.encode())
    elif isinstance(obj, torch.Tensor):
        h.update(f"T{tuple(obj.shape)}{obj.dtype}".encode())
        h.update(_tensor_sample(obj))
    elif isinstance(obj, (str, int, float, bool, type(None))):
        h.update(repr(obj).encode())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(f"k{k}".encode())
            _fingerprint(obj[k], h, depth + 1)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _fingerprint(v, h, depth + 1)
    elif hasattr(obj, "weights"):  # comfy.weight_adapter objects
        h.update(type(obj).__name__.encode())
        _fingerprint(obj.weights, h, depth + 1)
    else:
        h.update(type(obj).__name__.encode())


def module_identity(module: torch.nn.Module, *extra) -> str:
    """Cheap identity of a model's weights: class, every tensor's name/shape/dtype and a few evenly spaced
    values of each tensor (a fine-tune, a different checkpoint or another dtype all change it) + ``extra``."""
    h = hashlib.sha256(type(module).__name__.encode())
    sd = module.state_dict()
    for k in sorted(sd):
        h.update(k.encode())
        _fingerprint(sd[k], h)
    _fingerprint(list(extra), h)
    return h.hexdigest()[:24]


def vae_identity(vae) -> str:
    """VAE weights identity + its class, latent channels, dtype and any weight patches."""
    return module_identity(vae.first_stage_model, type(vae).__name__, getattr(vae, "latent_channels", None),
                           str(getattr(vae, "vae_dtype", "")), getattr(getattr(vae, "patcher", None), "patches", {}))


def clip_identity(clip) -> str:
    """Text-encoder identity: weights, weight patches (LoRA applied to the CLIP, with strengths), tokenizer
    class and options, clip layer, the aligned spec (``aligned_trainer_spec``) and the CLIP's class."""
    return module_identity(clip.cond_stage_model, type(clip).__name__, type(clip.tokenizer).__name__,
                           clip.layer_idx, getattr(clip, "tokenizer_options", {}),
                           getattr(clip, "aligned_trainer_spec", None), getattr(clip, "use_clip_schedule", None),
                           getattr(clip.patcher, "patches", {}))


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts], default=str, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class LatentCache:
    dataset: Dataset
    latents: tuple[torch.Tensor, ...]   # one (C, h, w) per dataset item; (C, frames, h, w) from a video VAE
    vae_id: str
    root: str
    stats: tuple[int, int, int]         # hits, misses, repaired
    controls: tuple = ()                # image-edit training: per item a tuple of its control latents (C, h, w), one
                                        # per control folder in folder order (() for an item without controls)


def item_key(item: Item, vae_id: str, sampling: str = "") -> str:
    """``sampling``: the dataset's ``sampling_key`` (video: frames and fps); empty for images (keys unchanged)."""
    parts = (item.sha, vae_id, item.bucket, item.crop, item.flip) + ((sampling,) if sampling else ())
    return _key("latent", PIXEL_PIPELINE, *parts)


def control_key(item: Item, vae_id: str, index: int = 0) -> str:
    """Cache key of an item's control latent (of control folder ``index``): the control image's bytes, the target
    geometry it is resized and cropped to (the target's size, bucket and crop box), the flip, the VAE and the pixel
    pipeline. The folder's position is not part of it: the same image on the same geometry is the same latent (and
    the first folder's keys are the ones a single control folder always had)."""
    return _key("control", PIXEL_PIPELINE, item.control_shas[index], item.size, item.bucket, item.crop, item.flip,
                vae_id)


def cache_latents(dataset: Dataset, vae, root: Path | None = None, progress: Progress | None = None,
                  unload: bool = False) -> LatentCache:
    """VAE-encode every dataset item once (disk cache); ``unload`` lets the VAE leave memory afterwards."""
    root = Path(root or default_cache_root()) / "latents"
    cache = DiskCache(root)
    cache.sweep_temporaries()
    dataset.check_vae(vae)
    vid = vae_identity(vae)
    out, controls = [], []
    for n, item in enumerate(dataset.items):
        mm.throw_exception_if_processing_interrupted()

        def compute(item=item):
            return {"latent": vae.encode(dataset.vae_input(item))[0].float()}

        t = cache.get_or_compute(item_key(item, vid, dataset.sampling_key(item)), compute,
                                 {"source": item.source, "bucket": item.bucket, "flip": item.flip, "vae": vid})
        lat = t["latent"]
        if lat.ndim not in (3, 4) or not torch.isfinite(lat).all():  # (C, h, w); video VAEs (C, frames, h, w)
            raise ValueError(f"VAE gave a {tuple(lat.shape)} latent with non-finite values for {item.source}; "
                             "check the VAE (dtype/weights)")
        out.append(lat)
        mine = []
        for k, source in enumerate(item.controls):
            c = cache.get_or_compute(control_key(item, vid, k),
                                     lambda item=item, k=k: {"latent": vae.encode(dataset.control_vae_input(item, k))[0].float()},
                                     {"source": source, "target": item.source, "bucket": item.bucket,
                                      "flip": item.flip, "vae": vid})["latent"]
            if c.shape != lat.shape or not torch.isfinite(c).all():
                raise ValueError(f"VAE gave a {tuple(c.shape)} control latent (target {tuple(lat.shape)}) or non-finite "
                                 f"values for {source}; check the VAE (dtype/weights)")
            mine.append(c)
        controls.append(tuple(mine))
        if progress:
            progress(n + 1, f"latents {n + 1}/{len(dataset.items)} (hits {cache.hits}, encoded {cache.misses})")
    if unload:
        unload_patcher(vae.patcher)
    return LatentCache(dataset, tuple(out), vid, str(root), (cache.hits, cache.misses, cache.repaired),
                       tuple(controls) if any(controls) else ())


def _cond_to_tensors(cond: list) -> dict[str, torch.Tensor]:
    """ComfyUI CONDITIONING ``[[cond, extras], ...]`` -> flat tensors ``{i}.cond`` / ``{i}.x.<name>``.
    Non-tensor extras that are plain JSON values go to ``{i}.json`` (a uint8 tensor); others are dropped."""
    out = {}
    for i, (c, extras) in enumerate(cond):
        out[f"{i}.cond"] = c.float()
        plain = {}
        for k, v in extras.items():
            if isinstance(v, torch.Tensor):
                out[f"{i}.x.{k}"] = v
            elif isinstance(v, (str, int, float, bool, type(None))):
                plain[k] = v
        if plain:
            out[f"{i}.json"] = torch.frombuffer(bytearray(json.dumps(plain).encode()), dtype=torch.uint8)
    return out


def _tensors_to_cond(t: dict[str, torch.Tensor]) -> list:
    n = len([k for k in t if k.endswith(".cond")])
    cond = []
    for i in range(n):
        extras = {k[len(f"{i}.x."):]: v for k, v in t.items() if k.startswith(f"{i}.x.")}
        if f"{i}.json" in t:
            extras.update(json.loads(bytes(t[f"{i}.json"].numpy()).decode()))
        cond.append([t[f"{i}.cond"], extras])
    return cond


def unload_patcher(patcher) -> int:
    """Unload every ComfyUI-loaded model that shares ``patcher``'s model, through model management
    (``LoadedModel.model_unload`` then removal from ``current_loaded_models``, as ``free_memory`` does)."""
    n = 0
    for i in reversed(range(len(mm.current_loaded_models))):
        lm = mm.current_loaded_models[i]
        m = lm.model
        if m is not None and (m is patcher or m.model is patcher.model):
            lm.model_unload()
            mm.current_loaded_models.pop(i)
            n += 1
    mm.soft_empty_cache()
    return n


def unload_text_encoder(clip) -> None:
    """Let the text encoder leave memory through ComfyUI's model management."""
    unload_patcher(clip.patcher)


def is_loaded(model) -> bool:
    """True while ComfyUI's model management holds ``model`` (a CLIP, a VAE or a ModelPatcher) loaded."""
    patcher = getattr(model, "patcher", model)
    return any(lm.model is not None and lm.model.model is patcher.model for lm in mm.current_loaded_models)


def text_image_key(item: Item) -> tuple:
    """What fixes the image an item's captions are encoded with, for a spec whose prompts hold an image: the
    control image's bytes and the target geometry ``Dataset.control_pixels`` brings it to (size, bucket, crop,
    flip)."""
    return (item.control_sha, item.size, item.bucket, item.crop, item.flip)


def _text_images(ds: Dataset, spec) -> bool:
    """True when ``spec`` (an aligned CLIP's) encodes each prompt with an input image (Qwen-Image-Edit): every
    item's captions are then encoded with its control image, which every item must have, and only one (the spec's
    template holds one image placeholder)."""
    from ..te import vision

    if not vision.needs_images(spec):
        return False
    from .images import DataError

    for item in ds.items:
        if not item.control:
            raise DataError(f"text-encoder spec '{spec.key}' encodes each caption with the item's input image, but "
                            f"{item.source} has no control image. Give the Dataset a control_folder with an image "
                            "of that file's name (regularization folders too), or pick the family's text-to-image "
                            "spec on Load Aligned Text Encoders.")
        if len(item.controls) != (n := vision.images_per_prompt(spec)):
            raise DataError(f"text-encoder spec '{spec.key}' encodes each caption with {n} input image(s) ({n} image "
                            f"placeholder(s) in its template), but {item.source} has {len(item.controls)} control "
                            f"images ({', '.join(item.controls)}), one per control folder. Give the Dataset "
                            f"{n} control_folder line(s) for this spec, or pick a spec that takes "
                            f"{len(item.controls)} images.")
    return True


def cache_text(latents: LatentCache, clip, root: Path | None = None, progress: Progress | None = None,
               unload: bool = True, quantize: str = "none") -> tuple[TrainingSet, tuple[int, int, int]]:
    """Encode every caption variant (and the empty caption) once into the on-disk cache. ``quantize`` (int8 or
    int4) runs the text encoders with quantized weights while they encode (train/quantize.py), entered only when
    something must be encoded; its embeddings are cached under their own key, and the encoder is unloaded
    afterwards whatever ``unload`` says. When the CLIP's spec encodes each prompt with an input image
    (Qwen-Image-Edit), each item's captions and empty caption are encoded with its control image on the target's
    geometry (``Dataset.control_vae_input``, the pixels its control latent comes from), keyed by that image
    (``text_image_key``), and the sample carries its own empty-caption conditioning."""
    root = Path(root or default_cache_root()) / "text"
    cache = DiskCache(root)
    cache.sweep_temporaries()
    if hasattr(clip, "training_clip"):  # an aligned CLIP: captions are read literally whatever its prompt syntax
        clip = clip.training_clip()
    from ..train import quantize as q

    q.check(quantize)
    cid = clip_identity(clip) + ("" if quantize == "none" else f"+{quantize}")
    ds = latents.dataset
    with_image = _text_images(ds, getattr(clip, "spec", None))
    if with_image:  # (image key, text) pairs, one image per distinct control geometry
        images = {text_image_key(item): item for item in ds.items}
        jobs = sorted({(ik, c) for ik, item in images.items() for c in (*item.captions, "")}, key=repr)
    else:
        jobs = [(None, c) for c in sorted({c for item in ds.items for c in item.captions} | {""})]
    conds = {}
    with contextlib.ExitStack() as scope:
        entered = []

        def encode(text, ik):
            if not entered:  # the first miss quantizes (hits never load the encoder)
                entered.append(scope.enter_context(q.quantized_text_encoder(clip, quantize, unload_patcher)))
            kw = {} if ik is None else {"images": [ds.control_vae_input(images[ik])]}
            return _cond_to_tensors(clip.encode_from_tokens_scheduled(clip.tokenize(text, **kw)))

        for n, (ik, text) in enumerate(jobs):
            mm.throw_exception_if_processing_interrupted()
            key = _key("text", cid, text) if ik is None else _key("text", cid, text, "image", *ik)
            meta = {"text": text, "clip": cid} if ik is None else {"text": text, "clip": cid,
                                                                      "image": images[ik].control}
            t = cache.get_or_compute(key, lambda text=text, ik=ik: encode(text, ik), meta)
            conds[(ik, text)] = _tensors_to_cond(t)
            if progress:
                progress(n + 1, f"captions {n + 1}/{len(jobs)} (hits {cache.hits}, encoded {cache.misses})")
    if unload:
        unload_text_encoder(clip)
    samples = []
    controls = latents.controls or ((),) * len(ds.items)
    for item, lat, ctrl in zip(ds.items, latents.latents, controls):
        ik = text_image_key(item) if with_image else None
        caps = tuple(CaptionVariant(c, conds[(ik, c)]) for c in item.captions)
        key = _key(item.sha, item.bucket, item.flip, *item.control_shas)  # as before: none or one control sha
        samples.append(Sample(key=key, latent=lat, captions=caps,
                              weight=ds.reg_weight if item.is_reg else 1.0, is_reg=item.is_reg, bucket=item.bucket,
                              repeats=item.repeats, control_latents=tuple(ctrl),
                              empty_conditioning=conds[(ik, "")] if with_image else None))
    meta = {"dataset_hash": ds.hash, "vae_id": latents.vae_id, "clip_id": cid, "report": ds.report(),
            "prompt_syntax": getattr(clip, "prompt_syntax", "comfyui"),
            "latent_cache": latents.root, "text_cache": str(root)}
    if with_image:
        meta["text_images"] = "control"
    ts = TrainingSet(tuple(samples), empty_conditioning=None if with_image else conds[(None, "")],
                     caption_dropout=ds.caption_cfg.caption_dropout,
                     te_spec_id=getattr(getattr(clip, "spec", None), "key", None),  # id or id:variant
                     meta=meta)
    return ts, (cache.hits, cache.misses, cache.repaired)
