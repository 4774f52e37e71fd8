"""Latent and text caches: hit/miss, invalidation by every key part, corruption, atomic writes, encoder
identities, the TrainingSet they build, and the text encoder / VAE leaving memory afterwards."""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from support.factories.dataset import make_dataset

P = "AlignedTrainer_"


def _bc(D):
    return D.buckets.BucketConfig(resolution=64, min_side=64, max_side=128, step=64, max_area=128 * 64)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("cds") / "data", n=2, sizes=((128, 64),)).parent


@pytest.fixture(scope="module")
def latents(D, sd15, folder, tmp_path_factory):
    """Latents of a 1-image dataset (2 caption variants) with a 1-image reg folder (weight 0.5)."""
    base = tmp_path_factory.mktemp("cone")
    one = make_dataset(base / "one", n=1, sizes=((128, 64),)).parent
    reg = make_dataset(base / "reg", n=1, trigger="class", sizes=((64, 64),)).parent
    ds = D.dataset.from_folder(one, D.captions.CaptionConfig(trigger_word="ohwx", shuffle_tags=True, variants=2,
                                                             caption_dropout=0.2), _bc(D),
                               reg_folder=reg, reg_weight=0.5)
    return D.cache.cache_latents(ds, sd15[2], tmp_path_factory.mktemp("clat"))


def test_latent_key_covers_bucket_and_flip(D, sd15, folder, tmp_path):
    vae = sd15[2]
    cc = D.captions.CaptionConfig()
    a = D.cache.cache_latents(D.dataset.from_folder(folder, cc, _bc(D)), vae, tmp_path)
    assert a.stats == (0, 2, 0)
    flipped = D.dataset.from_folder(folder, cc, _bc(D), flip=True)
    b = D.cache.cache_latents(flipped, vae, tmp_path)
    assert b.stats == (2, 2, 0)  # the unflipped items hit, the mirrored ones are new entries
    assert not torch.equal(b.latents[0], b.latents[1])
    square = D.dataset.from_folder(folder, cc, D.buckets.BucketConfig(resolution=64, min_side=64, max_side=64, step=64))
    c = D.cache.cache_latents(square, vae, tmp_path)
    assert c.stats[1] == 2 and c.latents[0].shape[-2:] == (8, 8) and a.latents[0].shape[-2:] == (8, 16)


def test_corrupt_foreign_and_tampered_entries_are_recomputed(D, sd15, folder, tmp_path):
    vae = sd15[2]
    ds = D.dataset.from_folder(folder, D.captions.CaptionConfig(), _bc(D))
    a = D.cache.cache_latents(ds, vae, tmp_path)
    files = sorted((tmp_path / "latents").rglob("*.safetensors"))
    raw = bytearray(files[0].read_bytes())
    raw[-5] ^= 0xFF  # one flipped bit pattern inside the tensor data: still a valid file
    files[0].write_bytes(bytes(raw))
    save_file({"latent": torch.zeros_like(a.latents[1])}, str(files[1]),  # valid file, wrong content/no digest
              metadata={"key": files[1].stem})
    b = D.cache.cache_latents(ds, vae, tmp_path)
    assert b.stats == (0, 2, 2)
    assert all(torch.equal(x, y) for x, y in zip(a.latents, b.latents))
    c = D.cache.cache_latents(ds, vae, tmp_path)
    assert c.stats == (2, 0, 0)


def test_atomic_write_leaves_nothing_on_failure_and_sweeps_stale_temporaries(D, tmp_path):
    dc = D.cache.DiskCache(tmp_path)
    t = torch.ones(4)
    with pytest.raises(Exception):
        dc.put("ab" * 16, {"a": t, "b": t})  # safetensors refuses tensors sharing memory
    assert not list(tmp_path.rglob("*.tmp")) and not dc.path("ab" * 16).exists()
    stale = tmp_path / "cd" / "x.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"half")
    fresh = tmp_path / "cd" / "y.tmp"
    fresh.write_bytes(b"in progress")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert dc.sweep_temporaries() == 1 and not stale.exists() and fresh.exists()


def test_weight_identity_sees_weight_changes(D, sd15):
    vae = sd15[2]
    base = D.cache.vae_identity(vae)
    assert base == D.cache.vae_identity(vae)
    w = dict(vae.first_stage_model.named_parameters())["encoder.conv_in.weight"]
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.mul_(1.01)  # what any fine-tune does to a tensor
        assert D.cache.vae_identity(vae) != base
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert D.cache.vae_identity(vae) == base


def test_text_cache_training_set_and_unload(comfy, D, sd15, latents, tmp_path):
    clip = sd15[1]
    ds = latents.dataset
    texts = {c for i in ds.items for c in i.captions} | {""}
    ts, stats = D.cache.cache_text(latents, clip, tmp_path, unload=False)
    assert stats == (0, len(texts), 0)
    assert D.cache.is_loaded(clip), "the encoder ran through model management"
    D.cache.unload_text_encoder(clip)
    assert not D.cache.is_loaded(clip)
    ts2, stats2 = D.cache.cache_text(latents, clip, tmp_path)  # all hits: nothing loads the encoder
    assert stats2 == (len(texts), 0, 0) and not D.cache.is_loaded(clip)
    # the TrainingSet contract
    assert len(ts) == 2 and ts.caption_dropout == 0.2 and ts.te_spec_id is None
    reg = [s for s in ts.samples if s.is_reg]
    assert len(reg) == 1 and reg[0].weight == 0.5 and all(s.weight == 1.0 for s in ts.samples if not s.is_reg)
    direct_empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    assert torch.allclose(ts.empty_conditioning[0][0], direct_empty[0][0].float(), atol=1e-6)
    assert torch.allclose(ts.empty_conditioning[0][1]["pooled_output"], direct_empty[0][1]["pooled_output"])
    for a, b in zip(ts.samples, ts2.samples):
        assert [c.text for c in a.captions] == [c.text for c in b.captions]
        assert all(torch.equal(x.conditioning[0][0], y.conditioning[0][0]) for x, y in zip(a.captions, b.captions))
        assert a.latent.shape[0] == 4 and a.bucket == (a.latent.shape[2] * 8, a.latent.shape[1] * 8)
    D.cache.unload_text_encoder(clip)


def test_text_key_covers_layer_tokenizer_options_and_patches(D, sd15, latents, tmp_path):
    clip = sd15[1]
    ds = latents.dataset  # one item with one caption: two texts with the empty one (encoding is slow on CPU)
    small = dataclasses.replace(latents, latents=latents.latents[:1], dataset=dataclasses.replace(
        ds, items=(dataclasses.replace(ds.items[0], captions=ds.items[0].captions[:1]),)))
    _, s = D.cache.cache_text(small, clip, tmp_path)
    n = s[1]
    assert n == 2
    layered = clip.clone()
    layered.clip_layer(-2)
    optioned = clip.clone()
    optioned.set_tokenizer_option("aligned_trainer_test_option", 1)
    patched = clip.clone()
    k = "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    sd = patched.cond_stage_model.state_dict()
    assert k in sd, sorted(sd)[:5]
    patched.add_patches({k: (torch.full_like(sd[k], 1e-3),)}, 1.0)
    ids = {D.cache.clip_identity(c) for c in (clip, layered, optioned, patched, clip.clone())}
    assert len(ids) == 4  # the plain clone is the same encoder
    _, s2 = D.cache.cache_text(small, layered, tmp_path)
    assert s2 == (0, n, 0)
    _, s3 = D.cache.cache_text(small, clip.clone(), tmp_path)
    assert s3 == (n, 0, 0)


def test_cache_nodes_write_under_output_and_unload(comfy, D, sd15, folder):
    import folder_paths

    _, clip, vae = sd15
    ds = D.dataset.from_folder(folder, D.captions.CaptionConfig(trigger_word="ohwx"), _bc(D))
    lc, info = comfy.call(P + "CacheLatents", dataset=ds, vae=vae, unload_vae=True)
    root = os.path.join(folder_paths.get_output_directory(), "aligned_trainer", "cache")
    assert lc.root.startswith(root) and "encoded" in info
    assert not D.cache.is_loaded(vae)
    ts, info2 = comfy.call(P + "CacheTextEmbeddings", latents=lc, clip=clip, unload_text_encoder=True)
    assert not D.cache.is_loaded(clip)
    assert ts.meta["text_cache"].startswith(root) and len(ts) == 2
    assert list(Path(root, "latents").rglob("*.safetensors")) and list(Path(root, "text").rglob("*.safetensors"))
