"""Image-edit training (FLUX.1 Kontext style): the Dataset node's control_folder pairs every training image with
the control image of its file stem, the control is brought to the target's bucket and cached through the VAE,
and training gives it to the model as ComfyUI's ``reference_latents`` (the ReferenceLatent node's conditioning
entry), which FLUX's own ``extra_conds`` turn into the ``ref_latents`` its forward takes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from support.factories.dataset import make_dataset

P = "AlignedTrainer_"
FLUX = "flux1-dev"  # ComfyUI runs FLUX.1 Kontext as model_base.Flux: the same class, reference latents in extra_conds


def _node_args(folder: str, control: str, **kw) -> dict:
    args = dict(folder=folder, resolution=64, min_side=64, max_side=128, bucket_step=64, trigger_word="",
                shuffle_tags=False, keep_tokens=1, tag_dropout=0.0, caption_dropout=0.0, caption_variants=1,
                flip=False, seed=0, control_folder=control)
    args.update(kw)
    return args


def _edit_set(base, name: str, n: int = 3, seed: int = 0):
    """``n`` targets (64x64, 96x64, 64x96) in ``base/name/1_ohwx`` and their controls in ``base/name_control``: each
    control is its target mirrored and upscaled 2x (another size and other pixels, the same aspect ratio), one of
    them saved as JPEG (pairing is by file stem, not by name with extension)."""
    folder = make_dataset(base / name, n=n, seed=seed)
    ctrl = base / f"{name}_control"
    ctrl.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(sorted(folder.glob("*.png"))):
        img = ImageOps.mirror(Image.open(p).convert("RGB"))
        img = img.resize((img.width * 2, img.height * 2), Image.Resampling.LANCZOS)
        img.save(ctrl / (p.stem + (".jpg" if i == 1 else ".png")), quality=95)
    return folder, ctrl


def test_control_folder_pairs_by_stem_on_target_geometry(comfy, comfy_dirs):
    D = comfy.engine("data.dataset")
    images = comfy.engine("data.images")
    folder, ctrl = _edit_set(comfy_dirs["input"], "edit_pairs")
    ds, rep, _ = comfy.call(P + "Dataset", **_node_args(folder.parent.name, ctrl.name, flip=True))
    assert '"control_images": 3' in rep
    assert len(ds.items) == 6 and all(i.control for i in ds.items)
    for item in ds.items:
        assert Path(item.control).stem == Path(item.source).stem
        c = np.asarray(ds.control_pixels(item), dtype=np.float32)
        assert c.shape == (item.bucket[1], item.bucket[0], 3)
        # the control (its target mirrored, at 2x) on the target's resize, crop and flip shows the target's own
        # bucket pixels, mirrored (up to the Lanczos round trip and one JPEG)
        t = np.asarray(ImageOps.mirror(ds.pixels(item)), dtype=np.float32)
        assert np.abs(c - t).mean() < 6.0, (item.source, item.flip, np.abs(c - t).mean())
    # a control that is a byte copy of its target gives exactly the target's VAE input (same geometry, same scale)
    same = comfy_dirs["input"] / "edit_pairs_same"
    same.mkdir()
    for p in folder.glob("*.png"):
        shutil.copy(p, same / p.name)
    ds_same, _, _ = comfy.call(P + "Dataset", **_node_args(folder.parent.name, same.name, flip=True))
    for item in ds_same.items:
        got, want = ds_same.control_vae_input(item), ds_same.vae_input(item)
        assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want), item
    # the dataset's identity covers the control images
    plain, _, _ = comfy.call(P + "Dataset", **_node_args(folder.parent.name, ""))
    paired, _, _ = comfy.call(P + "Dataset", **_node_args(folder.parent.name, ctrl.name))
    assert plain.hash != paired.hash and not any(i.control for i in plain.items)

    # a target without its control image, an unreadable control image, two controls of one stem: one error each
    # naming the file
    missing = sorted(ctrl.iterdir())[0]
    moved = missing.with_suffix(".bak")
    before = D.guarded_fingerprint(folder.parent.name, "", ctrl.name)
    missing.rename(moved)
    # the node runs again when a control image is added, removed or edited (ComfyUI's fingerprint_inputs)
    assert D.guarded_fingerprint(folder.parent.name, "", ctrl.name) != before and not before.startswith("error")
    with pytest.raises(images.DataError, match=f"no control image for .*{missing.stem}"):
        D.from_folder(folder.parent, comfy.engine("data.captions").CaptionConfig(),
                      comfy.engine("data.buckets").BucketConfig(64, 64, 128, 64), control_folder=ctrl)
    moved.rename(missing)
    bad = ctrl / "img_002.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(Exception, match="control image for .*img_002.*cannot read image .*img_002.png"):
        comfy.call(P + "Dataset", **_node_args(folder.parent.name, ctrl.name, seed=1))
    bad.unlink()
    shutil.copy(ctrl / "img_001.jpg", ctrl / "img_001.png")
    with pytest.raises(Exception, match="two images named 'img_001'"):
        comfy.call(P + "Dataset", **_node_args(folder.parent.name, ctrl.name, seed=2))
    (ctrl / "img_001.png").unlink()
    # the control folder is confined like the dataset folder
    with pytest.raises(Exception, match="not inside a folder this server reads"):
        comfy.call(P + "Dataset", **_node_args(folder.parent.name, "/etc", seed=3))


def test_control_latents_cached_keyed_and_verified(comfy, family_bundle, tmp_path):
    D = comfy.engine("data.dataset")
    cache = comfy.engine("data.cache")
    C, B = comfy.engine("data.captions").CaptionConfig(), comfy.engine("data.buckets").BucketConfig(64, 64, 128, 64)
    _, _, vae = family_bundle(FLUX)
    folder, ctrl = _edit_set(tmp_path, "set", n=2)
    ds = D.from_folder(folder.parent, C, B, control_folder=ctrl)
    root = tmp_path / "cache"
    a = cache.cache_latents(ds, vae, root)
    assert a.stats == (0, 4, 0)  # 2 targets + 2 controls
    for item, (c,) in zip(ds.items, a.controls):
        direct = vae.encode(ds.control_vae_input(item))[0].float()
        assert c.shape == direct.shape and torch.equal(c, direct)
    b = cache.cache_latents(ds, vae, root)
    assert b.stats == (4, 0, 0) and all(torch.equal(x, y) for (x,), (y,) in zip(a.controls, b.controls))
    # a truncated control entry is found on read and recomputed
    entry = cache.DiskCache(root / "latents").path(cache.control_key(ds.items[0], a.vae_id))
    entry.write_bytes(entry.read_bytes()[:-9])
    c = cache.cache_latents(ds, vae, root)
    assert c.stats == (3, 1, 1) and torch.equal(c.controls[0][0], a.controls[0][0])
    # an edited control image: that control alone is encoded again
    p = Path(ds.items[1].control)
    Image.new("RGB", Image.open(p).size, "white").save(p, quality=95)
    ds2 = D.from_folder(folder.parent, C, B, control_folder=ctrl)
    d = cache.cache_latents(ds2, vae, root)
    assert d.stats == (3, 1, 0) and not torch.equal(d.controls[1][0], a.controls[1][0])
    assert not list((root / "latents").rglob("*.tmp"))


def _cached_pairs(comfy, family_bundle, family: str, tmp_path):
    """(MODEL, training set) of ``family``'s tiny bundle on 2 edit pairs (64 px bucket), latents and captions cached
    under ``tmp_path / "c"``."""
    D, cache = comfy.engine("data.dataset"), comfy.engine("data.cache")
    C, B = comfy.engine("data.captions").CaptionConfig(), comfy.engine("data.buckets").BucketConfig(64, 64, 64, 64)
    model, clip, vae = family_bundle(family)
    folder, ctrl = _edit_set(tmp_path, "set", n=2)
    lc = cache.cache_latents(D.from_folder(folder.parent, C, B, control_folder=ctrl), vae, tmp_path / "c")
    return model, cache.cache_text(lc, clip, tmp_path / "c", unload=False)[0]


def edit_sets(comfy, family_bundle, base):
    """A cached FLUX edit training set: 2 targets with controls, and the same with one control image changed
    (built inside each test, so a mutation run's forked mutant builds it again)."""
    D = comfy.engine("data.dataset")
    cache = comfy.engine("data.cache")
    C, B = comfy.engine("data.captions").CaptionConfig(), comfy.engine("data.buckets").BucketConfig(64, 64, 64, 64)
    _, clip, vae = family_bundle(FLUX)
    folder, ctrl = _edit_set(base, "set", n=2)
    out = []
    for change in (False, True):
        if change:
            p = sorted(ctrl.iterdir())[0]
            Image.open(p).convert("RGB").rotate(90).save(p)
        ds = D.from_folder(folder.parent, C, B, control_folder=ctrl)
        lc = cache.cache_latents(ds, vae, base / "cache")
        ts, _ = cache.cache_text(lc, clip, base / "cache", unload=False)
        out.append(ts)
    return out


def _init(comfy, model, ts, root, name, resume="none", batch_size=1):
    C = comfy.engine("train.config")
    st = comfy.engine("train.state")
    loop = comfy.engine("train.loop")
    return loop.init_run(model, ts, C.LoraConfig(rank=4, alpha=4, preset="attention"),
                         C.TimestepConfig(density="logit_normal", shift="flux_resolution", weighting="sd3_sigma_sqrt"),
                         C.OptimizerConfig(lr=1e-3), st.RunSettings(run_name=name, batch_size=batch_size),
                         runs_root=root, resume=resume)


def _stock_refs(model, sample) -> list:
    """What ComfyUI's sampler gives the model's forward as ``ref_latents`` for ``sample``'s caption with its control
    latents attached by ComfyUI's own ReferenceLatent nodes, one node per control chained in folder order: the
    nodes, then ``convert_cond`` and ``encode_model_conds`` with the model's ``extra_conds``."""
    import importlib

    from comfy_extras.nodes_edit_model import ReferenceLatent

    sampler_helpers, samplers = (importlib.import_module(m) for m in ("comfy.sampler_helpers", "comfy.samplers"))
    cond = sample.captions[0].conditioning
    for lat in sample.control_latents:
        (cond,) = ReferenceLatent.execute(cond, {"samples": lat[None]}).result
    conv = sampler_helpers.convert_cond(cond)
    x = torch.zeros((1, *sample.latent.shape))
    conv = samplers.encode_model_conds(model.model.extra_conds, conv, x, x.device, "positive", latent_image=x)
    return conv[0]["model_conds"]["ref_latents"].cond


def test_flux_edit_training_reference_latents(comfy, family_bundle, tmp_path):
    loop = comfy.engine("train.loop")
    export = comfy.engine("train.export")
    model, _, _ = family_bundle(FLUX)
    ts, ts_changed = edit_sets(comfy, family_bundle, tmp_path / "data")
    assert all(s.control_latent is not None for s in ts.samples)
    # a sample's identity covers its control image: only the sample whose control changed has a new key
    assert [a.key == b.key for a, b in zip(ts.samples, ts_changed.samples)] == [False, True]

    seen = []
    dm = model.model.diffusion_model
    handle = dm.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("ref_latents")), with_kwargs=True)
    try:
        out = loop.train_steps(_init(comfy, model, ts, tmp_path, "edit"), 2, val_every=2)
    finally:
        handle.remove()
    losses = [h["loss"] for h in out.history] + [out.history[-1]["val_loss"]]
    assert all(np.isfinite(losses)), losses
    assert export.unmapped_keys(model, export.kohya_state_dict(out)) == []

    # every forward got ref_latents: exactly what ComfyUI's ReferenceLatent node + FLUX's extra_conds give for the
    # cached control latent of one of the samples
    refs = [_stock_refs(model, s) for s in ts.samples]
    assert len(seen) >= 3 and all(r is not None for r in seen), [type(r) for r in seen]
    for got in seen:
        assert len(got) == 1
        assert any(torch.equal(got[0][:1], ref[0]) for ref in refs), "forward's ref_latents match no stock result"
    assert not torch.equal(refs[0][0], refs[1][0])

    # resume is exact: 1 step, a checkpoint, a new Train Init from it, 1 more == 2 straight
    loop.train_steps(_init(comfy, model, ts, tmp_path, "half"), 1, val_every=2, checkpoint_every=1)
    resumed = loop.train_steps(_init(comfy, model, ts, tmp_path, "half", "latest"), 1, val_every=2)
    assert resumed.step == 2 and [h["loss"] for h in resumed.history] == [h["loss"] for h in out.history]
    for k, v in out.state["adapters"].items():
        assert torch.equal(v, resumed.state["adapters"][k]), k

    # a changed control image changes the loss (same seed, same targets, same captions)
    changed = loop.train_steps(_init(comfy, model, ts_changed, tmp_path, "changed"), 2, val_every=2)
    assert changed.history[-1]["val_loss"] != out.history[-1]["val_loss"]


def test_samples_with_and_without_reference_run_in_separate_forwards(comfy, family_bundle, tmp_path):
    """A batch mixing a sample with a control and one without (a regularization image) cannot join: different
    model cond keys, so concat_groups runs them in separate forwards, each as it would run alone; two samples with
    controls of one size batch in one forward with the same result as alone."""
    types = comfy.engine("data.types")
    loop = comfy.engine("train.loop")
    model, _, _ = family_bundle(FLUX)
    ts, _ = edit_sets(comfy, family_bundle, tmp_path / "data")
    a, b = ts.samples
    tr = loop.Trainer(_init(comfy, model, ts, tmp_path, "groups"))
    tr.load()
    try:
        x = torch.randn((2, *a.latent.shape), generator=torch.Generator().manual_seed(0))
        sigma = torch.tensor([0.7, 0.4])
        with_ref = [types.with_reference(a.captions[0].conditioning, a), types.with_reference(b.captions[0].conditioning, b)]
        mixed = [with_ref[0], b.captions[0].conditioning]
        assert loop.concat_groups(tr.model_conds(mixed, x)) == [[0], [1]]
        assert loop.concat_groups(tr.model_conds(with_ref, x)) == [[0, 1]]
        with torch.no_grad():
            for conds in (mixed, with_ref):
                both = tr.denoised_at(x, sigma, conds)
                alone = torch.cat([tr.denoised_at(x[i:i + 1], sigma[i:i + 1], conds[i:i + 1]) for i in range(2)])
                assert torch.allclose(both, alone, atol=1e-5), (both - alone).abs().max()
            # the reference reaches the model: the same noisy latent predicts differently with and without it
            assert not torch.allclose(tr.denoised_at(x[:1], sigma[:1], with_ref[:1]),
                                      tr.denoised_at(x[:1], sigma[:1], [a.captions[0].conditioning]), atol=1e-6)
    finally:
        tr.release()
    # caption dropout trains on the empty caption, still with the sample's control image
    import dataclasses

    tr = loop.Trainer(_init(comfy, model, dataclasses.replace(ts, caption_dropout=1.0), tmp_path, "dropout"))
    cond = tr.conditioning(a)
    assert torch.equal(cond[0][0], ts.empty_conditioning[0][0])
    assert len(cond[0][1]["reference_latents"]) == 1 and torch.equal(cond[0][1]["reference_latents"][0], a.control_latent[None])


def test_qwen_image_forward_receives_reference_latents(comfy, family_bundle, tmp_path):
    """Qwen-Image's extra_conds also take ``reference_latents`` (the latent half of Qwen-Image-Edit; with the plain
    qwen-image spec the captions hold no vision tokens: the qwen-image-edit spec adds them, tested below): a batch of 2 trains with finite loss and every forward gets
    ``ref_latents`` equal to the stock path's for its samples, in the Wan VAE's (C, 1, h, w) layout."""
    loop = comfy.engine("train.loop")
    model, ts = _cached_pairs(comfy, family_bundle, "qwen-image", tmp_path)
    seen = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("ref_latents")),
                                                                   with_kwargs=True)
    try:
        cfg, st = comfy.engine("train.config"), comfy.engine("train.state")
        run = loop.init_run(model, ts, cfg.LoraConfig(rank=4, alpha=4, preset="attention"), cfg.TimestepConfig(),
                            cfg.OptimizerConfig(lr=1e-3), st.RunSettings(run_name="qwen", batch_size=2), runs_root=tmp_path)
        out = loop.train_steps(run, 2, val_every=2)
    finally:
        handle.remove()
    assert all(np.isfinite([h["loss"] for h in out.history] + [out.history[-1]["val_loss"]]))
    refs = [_stock_refs(model, s)[0] for s in ts.samples]
    assert refs[0].shape == (1, *ts.samples[0].control_latent.shape)
    assert len(seen) >= 2 and all(r is not None and len(r) == 1 for r in seen)
    for got in seen:
        assert all(any(torch.equal(row[None], ref) for ref in refs) for row in got[0])


def _stock_conds(model, conditioning, control_latent, shape) -> dict:
    """The model conds ComfyUI's sampler gives the forward for ``conditioning`` with ``control_latent`` attached by
    ComfyUI's own ReferenceLatent node (``convert_cond`` and ``encode_model_conds`` with the model's extra_conds):
    ``c_crossattn`` (the forward's ``context``) and ``ref_latents``."""
    import importlib

    from comfy_extras.nodes_edit_model import ReferenceLatent

    sampler_helpers, samplers = (importlib.import_module(m) for m in ("comfy.sampler_helpers", "comfy.samplers"))
    (cond,) = ReferenceLatent.execute(conditioning, {"samples": control_latent[None]}).result
    conv = sampler_helpers.convert_cond(cond)
    x = torch.zeros((1, *shape))
    conv = samplers.encode_model_conds(model.model.extra_conds, conv, x, x.device, "positive", latent_image=x)
    mc = conv[0]["model_conds"]
    return {"context": mc["c_crossattn"].cond, "ref_latents": mc["ref_latents"].cond}


def test_qwen_image_edit_training_encodes_captions_with_the_control(comfy, family_bundle, tmp_path):
    """Qwen-Image-Edit training (30 s to 2.5 min on 2 busy CPU cores: every caption holds ~1300 vision tokens): with the aligned ``qwen-image-edit`` spec (a tiny Qwen2.5-VL with its vision tower,
    the bundle's language-model weights), each caption is encoded with its item's control image (and cached under
    that image), so every forward's text context and ``ref_latents`` are what ComfyUI's graph gives: the aligned
    CLIP's tokenize(caption, images=[control]) (TextEncodeQwenImageEdit's call, on the control's pixels) ->
    ReferenceLatent(control latent). Finite loss, resume bit-exact, a changed control changes the text embedding,
    caption dropout uses the sample's own empty caption (encoded with its control), no control is refused."""
    from support.factories import te_qwen_image

    D = comfy.engine("data.dataset")
    cache = comfy.engine("data.cache")
    loop = comfy.engine("train.loop")
    cfg, st = comfy.engine("train.config"), comfy.engine("train.state")
    C, B = comfy.engine("data.captions").CaptionConfig(), comfy.engine("data.buckets").BucketConfig(64, 64, 64, 64)
    model, _, vae = family_bundle("qwen-image")
    clip = comfy.engine("te.align").align_clip(
        te_qwen_image.qwen_image_clip(te_qwen_image.qwen25vl_edit_tiny_file(41), vision=True), "qwen-image-edit")
    folder, ctrl = _edit_set(tmp_path, "set", n=2)
    ds = D.from_folder(folder.parent, C, B, control_folder=ctrl)
    lc = cache.cache_latents(ds, vae, tmp_path / "c")
    ts, stats = cache.cache_text(lc, clip, tmp_path / "c", unload=False)
    assert stats == (0, 4, 0) and ts.empty_conditioning is None  # 2 items x (caption + empty), per control image
    assert ts.meta["text_images"] == "control"

    # each sample's caption and empty caption = the aligned CLIP on that caption with the item's control pixels
    stock = []
    for s, item in zip(ts.samples, ds.items):
        with torch.no_grad():
            image = [ds.control_vae_input(item)]
            want = clip.encode_from_tokens_scheduled(clip.tokenize(item.captions[0], images=image))
            empty = clip.encode_from_tokens_scheduled(clip.tokenize("", images=image))
        assert torch.equal(s.captions[0].conditioning[0][0], want[0][0])
        assert torch.equal(s.empty_conditioning[0][0], empty[0][0])
        assert s.captions[0].conditioning[0][0].shape[1] > 1000  # the control's ~1300 vision tokens are in the text
        stock.append(_stock_conds(model, want, s.control_latent, s.latent.shape))

    # every forward gets exactly one sample's stock context and ref_latents
    seen = []
    dm = model.model.diffusion_model
    handle = dm.register_forward_pre_hook(lambda m, a, kw: seen.append((a[2] if len(a) > 2 else kw.get("context"),
                                                                        kw.get("ref_latents"))), with_kwargs=True)

    def init(name, resume="none", tset=ts):
        return loop.init_run(model, tset, cfg.LoraConfig(rank=4, alpha=4, preset="attention"), cfg.TimestepConfig(),
                             cfg.OptimizerConfig(lr=1e-3), st.RunSettings(run_name=name, batch_size=1),
                             runs_root=tmp_path, resume=resume)
    try:
        out = loop.train_steps(init("qe"), 2, val_every=2)
    finally:
        handle.remove()
    losses = [h["loss"] for h in out.history] + [out.history[-1]["val_loss"]]
    print("qwen-image-edit losses (2 steps, validation)", losses)
    assert all(np.isfinite(losses))
    assert len(seen) >= 3
    for context, refs in seen:
        assert context is not None and refs is not None and len(refs) == 1
        for i in range(context.shape[0]):  # validation batches several timesteps of one sample
            assert any(torch.equal(context[i:i + 1], s["context"]) and torch.equal(refs[0][i:i + 1], s["ref_latents"][0])
                       for s in stock), "a forward's context/ref_latents match no sample's ComfyUI-graph conditioning"

    # resume is exact: 1 step, a checkpoint, a new Train Init from it, 1 more == 2 straight
    loop.train_steps(init("half"), 1, val_every=2, checkpoint_every=1)
    resumed = loop.train_steps(init("half", "latest"), 1, val_every=2)
    assert resumed.step == 2 and [h["loss"] for h in resumed.history] == [h["loss"] for h in out.history]
    for k, v in out.state["adapters"].items():
        assert torch.equal(v, resumed.state["adapters"][k]), k

    # caption dropout trains on the sample's own empty caption, with its control latent
    import dataclasses

    tr = loop.Trainer(init("dropout", tset=dataclasses.replace(ts, caption_dropout=1.0)))
    for s in ts.samples:
        cond = tr.conditioning(s)
        assert torch.equal(cond[0][0], s.empty_conditioning[0][0])
        assert torch.equal(cond[0][1]["reference_latents"][0], s.control_latent[None])

    # a changed control image changes that item's text embedding (and only its entries are encoded again)
    p = sorted(ctrl.iterdir())[0]
    Image.open(p).convert("RGB").rotate(90).save(p)
    ds2 = D.from_folder(folder.parent, C, B, control_folder=ctrl)
    changed = [i for i, (a, b) in enumerate(zip(ds.items, ds2.items)) if a.control_sha != b.control_sha]
    ts2, stats2 = cache.cache_text(cache.cache_latents(ds2, vae, tmp_path / "c"), clip, tmp_path / "c", unload=False)
    assert len(changed) == 1 and stats2 == (2, 2, 0)
    for i, (a, b) in enumerate(zip(ts.samples, ts2.samples)):
        same = torch.equal(a.captions[0].conditioning[0][0], b.captions[0].conditioning[0][0])
        assert same == (i not in changed), i

    # a target without a control image is refused, naming the file
    plain = D.from_folder(folder.parent, C, B)
    with pytest.raises(Exception, match=r"'qwen-image-edit'.*has no control image.*control_folder"):
        cache.cache_text(cache.cache_latents(plain, vae, tmp_path / "c"), clip, tmp_path / "c", unload=False)


def _flux2_observed(comfy, model, ts, tmp_path, name: str, pick):
    """(initial run, trained run, ``pick(kwargs)`` of every forward) of 2 steps at batch 2 and a validation pass on the tiny FLUX.2
    (rank 4 attention LoRA, logit-normal on FLUX.2's resolution shift, guidance 4)."""
    loop = comfy.engine("train.loop")
    cfg, st = comfy.engine("train.config"), comfy.engine("train.state")
    seen = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda m, a, kw: seen.append(pick(kw)),
                                                                   with_kwargs=True)
    try:
        run = loop.init_run(model, ts, cfg.LoraConfig(rank=4, alpha=4, preset="attention"),
                            cfg.TimestepConfig(density="logit_normal", shift="flux_resolution"),
                            cfg.OptimizerConfig(lr=1e-3), st.RunSettings(run_name=name, batch_size=2, guidance=4.0),
                            runs_root=tmp_path)
        return run, loop.train_steps(run, 2, val_every=2), seen
    finally:
        handle.remove()


def test_flux2_forward_receives_reference_latents(comfy, family_bundle, tmp_path):
    """FLUX.2 [dev] with reference images (ComfyUI's Flux2 model: ``model_base.Flux`` extra_conds, references placed
    by FLUX.2's default 'index' method): a batch of 2 edit pairs trains with finite loss and 0 unmapped keys, and
    every forward of training and validation gets ``ref_latents`` equal (``torch.equal``) to what ComfyUI's
    ReferenceLatent node + the model's extra_conds give for its samples, in FLUX.2's 128-channel latent layout, with
    no method override (so the model's own 'index' placement); the reference changes the prediction."""
    loop = comfy.engine("train.loop")
    export = comfy.engine("train.export")
    types = comfy.engine("data.types")
    model, ts = _cached_pairs(comfy, family_bundle, "flux2-dev", tmp_path)
    assert all(s.control_latent is not None and s.control_latent.shape[0] == 128 for s in ts.samples)
    run, out, seen = _flux2_observed(comfy, model, ts, tmp_path, "flux2edit", lambda kw: kw)
    assert all(np.isfinite([h["loss"] for h in out.history] + [out.history[-1]["val_loss"]]))
    assert export.unmapped_keys(model, export.kohya_state_dict(out)) == []
    refs = [_stock_refs(model, s)[0] for s in ts.samples]
    assert refs[0].shape == (1, *ts.samples[0].control_latent.shape) and not torch.equal(refs[0], refs[1])
    assert len(seen) >= 3, len(seen)  # 2 training steps and a validation pass
    for kw in seen:
        got = kw.get("ref_latents")
        assert got is not None and len(got) == 1 and "ref_latents_method" not in kw
        assert all(any(torch.equal(row[None], ref) for ref in refs) for row in got[0])
    # the reference reaches the model: the same noisy latent predicts differently with and without it
    a = ts.samples[0]
    tr = loop.Trainer(run)
    tr.load()
    try:
        x = torch.randn((1, *a.latent.shape), generator=torch.Generator().manual_seed(0))
        sigma = torch.tensor([0.6])
        with torch.no_grad():
            with_ref = tr.denoised_at(x, sigma, [types.with_reference(a.captions[0].conditioning, a)])
            without = tr.denoised_at(x, sigma, [a.captions[0].conditioning])
    finally:
        tr.release()
    assert not torch.allclose(with_ref, without, atol=1e-6)


# --- several control folders (one per line of control_folder): several control images per target ---------------

def _two_control_set(base, name: str, n: int = 3):
    """``_edit_set`` plus a second control folder ``base/name_control2``: each target's colours inverted, at the
    target's own size (other pixels than the first folder's mirrored 2x controls)."""
    folder, ctrl = _edit_set(base, name, n=n)
    ctrl2 = base / f"{name}_control2"
    ctrl2.mkdir(parents=True, exist_ok=True)
    for p in sorted(folder.glob("*.png")):
        ImageOps.invert(Image.open(p).convert("RGB")).save(ctrl2 / p.name)
    return folder, ctrl, ctrl2


def test_several_control_folders_pair_cache_and_report(comfy, comfy_dirs, family_bundle, tmp_path):
    """control_folder with two lines: every target pairs with the image of its stem in each folder, in line order,
    each on the target's geometry; the report counts controls per folder; each control has its own verified cache
    entry, and changing a target's second control encodes that entry alone; a missing control names the target,
    the folder and the file to add; a folder given twice is refused."""
    D = comfy.engine("data.dataset")
    cache = comfy.engine("data.cache")
    folder, ctrl, ctrl2 = _two_control_set(comfy_dirs["input"], "multi_pairs")
    reg = make_dataset(comfy_dirs["input"] / "multi_pairs_reg", n=1, seed=5)  # regularization images: no controls
    ds, rep, _ = comfy.call(P + "Dataset", **_node_args(folder.parent.name, f"{ctrl.name}\n\n {ctrl2.name}\n", flip=True,
                                                        reg_folder=reg.parent.name))
    assert '"control_images": 3' in rep
    assert [(c["folder"], c["control_images"]) for c in json.loads(rep)["control_folders"]] == \
        [(ctrl.name, 3), (ctrl2.name, 3)]
    assert len(ds.items) == 8 and [i.controls for i in ds.items if i.is_reg] == [(), ()]
    for item in (i for i in ds.items if not i.is_reg):
        assert [Path(c).parent.name for c in item.controls] == [ctrl.name, ctrl2.name]
        assert all(Path(c).stem == Path(item.source).stem for c in item.controls)
        # the second folder's control (the target inverted, same size) on the target's geometry: the target's own
        # bucket pixels inverted, up to rounding
        c2 = ds.control_vae_input(item, 1)
        assert (c2 - (1.0 - ds.vae_input(item))).abs().max() <= 1.5 / 255, item
        assert not torch.equal(ds.control_vae_input(item, 0), c2)
    # one folder is still a one-control dataset; the order of the lines is the order of the controls
    one, rep_one, _ = comfy.call(P + "Dataset", **_node_args(folder.parent.name, ctrl.name))
    assert [(c["folder"], c["control_images"]) for c in json.loads(rep_one)["control_folders"]] == [(ctrl.name, 3)]
    swapped, _, _ = comfy.call(P + "Dataset", **_node_args(folder.parent.name, f"{ctrl2.name}\n{ctrl.name}"))
    assert all(len(i.controls) == 1 for i in one.items)
    assert [i.controls[::-1] for i in swapped.items] == [i.controls for i in ds.items if not i.flip and not i.is_reg]
    assert len({one.hash, swapped.hash, ds.hash}) == 3

    # a target without its image in the second folder: one error naming the target, that folder and the file
    gone = ctrl2 / "img_001.png"
    gone.rename(gone.with_suffix(".bak"))
    with pytest.raises(Exception, match=f"no control image for .*img_001.png: the control folder .*{ctrl2.name} "
                                        "needs an image named 'img_001'"):
        comfy.call(P + "Dataset", **_node_args(folder.parent.name, f"{ctrl.name}\n{ctrl2.name}", seed=1))
    gone.with_suffix(".bak").rename(gone)
    with pytest.raises(Exception, match=f"control folder .*{ctrl.name} is given twice"):
        comfy.call(P + "Dataset", **_node_args(folder.parent.name, f"{ctrl.name}\n{ctrl.name}", seed=2))
    with pytest.raises(Exception, match="not inside a folder this server reads"):
        comfy.call(P + "Dataset", **_node_args(folder.parent.name, f"{ctrl.name}\n/etc", seed=3))

    # the cache: one entry per control, verified against a direct encode; the second control of one target
    # changed -> that entry alone is encoded again, every other latent is the same
    _, _, vae = family_bundle(FLUX)
    C, B = comfy.engine("data.captions").CaptionConfig(), comfy.engine("data.buckets").BucketConfig(64, 64, 128, 64)
    small = _two_control_set(tmp_path, "set", n=2)
    ds2 = D.from_folder(small[0].parent, C, B, control_folder=small[1:])
    root = tmp_path / "cache"
    a = cache.cache_latents(ds2, vae, root)
    assert a.stats == (0, 6, 0)  # 2 targets + 2 x 2 controls
    for item, ctrls in zip(ds2.items, a.controls):
        assert len(ctrls) == 2
        for k, c in enumerate(ctrls):
            assert torch.equal(c, vae.encode(ds2.control_vae_input(item, k))[0].float()), (item.source, k)
        assert not torch.equal(ctrls[0], ctrls[1])
    entry = cache.DiskCache(root / "latents").path(cache.control_key(ds2.items[1], a.vae_id, 1))
    entry.write_bytes(entry.read_bytes()[:-9])
    assert cache.cache_latents(ds2, vae, root).stats == (5, 1, 1)
    p = Path(ds2.items[0].controls[1])
    Image.new("RGB", Image.open(p).size, "white").save(p)
    ds3 = D.from_folder(small[0].parent, C, B, control_folder=small[1:])
    d = cache.cache_latents(ds3, vae, root)
    assert d.stats == (5, 1, 0)
    assert not torch.equal(d.controls[0][1], a.controls[0][1])
    assert all(torch.equal(x, y) for k, (xs, ys) in enumerate(zip(a.controls, d.controls)) for j, (x, y)
               in enumerate(zip(xs, ys)) if (k, j) != (0, 1))
    assert not list((root / "latents").rglob("*.tmp"))


def test_flux_two_controls_train_as_chained_reference_latents(comfy, family_bundle, tmp_path):
    """Tiny FLUX.1 (as Kontext) with two control folders: every training and validation forward's ``ref_latents``
    equals (torch.equal) what two chained ComfyUI ReferenceLatent nodes + the model's extra_conds give for its
    sample, in folder order; samples with two controls of one size batch in one forward (same result as alone), a
    sample with one control does not join them; the second control reaches the model; resume is bit-exact; a
    changed second control changes only that sample's key."""
    import dataclasses

    D = comfy.engine("data.dataset")
    cache = comfy.engine("data.cache")
    loop = comfy.engine("train.loop")
    types = comfy.engine("data.types")
    C, B = comfy.engine("data.captions").CaptionConfig(), comfy.engine("data.buckets").BucketConfig(64, 64, 64, 64)
    model, clip, vae = family_bundle(FLUX)
    folder, ctrl, ctrl2 = _two_control_set(tmp_path, "set", n=2)
    ds = D.from_folder(folder.parent, C, B, control_folder=[ctrl, ctrl2])
    ts, _ = cache.cache_text(cache.cache_latents(ds, vae, tmp_path / "c"), clip, tmp_path / "c", unload=False)
    assert all(len(s.control_latents) == 2 for s in ts.samples)

    seen = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("ref_latents")),
                                                                   with_kwargs=True)
    try:
        out = loop.train_steps(_init(comfy, model, ts, tmp_path, "two", batch_size=2), 2, val_every=2)
    finally:
        handle.remove()
    losses = [h["loss"] for h in out.history] + [out.history[-1]["val_loss"]]
    print("two controls: losses (2 steps of batch 2, validation)", losses)
    assert all(np.isfinite(losses)), losses
    refs = [_stock_refs(model, s) for s in ts.samples]
    assert all(len(r) == 2 and not torch.equal(r[0], r[1]) for r in refs)
    assert len(seen) >= 3 and all(r is not None for r in seen)
    for got in seen:
        assert len(got) == 2
        for row in range(got[0].shape[0]):
            assert any(all(torch.equal(got[k][row:row + 1], ref[k]) for k in range(2)) for ref in refs), \
                "a forward's ref_latents match no sample's chained ReferenceLatent conditioning"

    # batching: two samples with two controls join; a sample with one control does not join one with two
    a, b = ts.samples
    a1 = dataclasses.replace(a, control_latents=a.control_latents[:1])
    tr = loop.Trainer(_init(comfy, model, ts, tmp_path, "groups"))
    tr.load()
    try:
        x = torch.randn((2, *a.latent.shape), generator=torch.Generator().manual_seed(0))
        sigma = torch.tensor([0.7, 0.4])
        two = [types.with_reference(s.captions[0].conditioning, s) for s in (a, b)]
        mixed = [types.with_reference(b.captions[0].conditioning, b), types.with_reference(a.captions[0].conditioning, a1)]
        assert loop.concat_groups(tr.model_conds(two, x)) == [[0, 1]]
        assert loop.concat_groups(tr.model_conds(mixed, x)) == [[0], [1]]
        with torch.no_grad():
            for conds in (two, mixed):
                both = tr.denoised_at(x, sigma, conds)
                alone = torch.cat([tr.denoised_at(x[i:i + 1], sigma[i:i + 1], conds[i:i + 1]) for i in range(2)])
                assert torch.allclose(both, alone, atol=1e-5), (both - alone).abs().max()
            # the second control reaches the model
            assert not torch.allclose(tr.denoised_at(x[:1], sigma[:1], two[:1]),
                                      tr.denoised_at(x[:1], sigma[:1], mixed[1:]), atol=1e-6)
    finally:
        tr.release()

    # resume is exact: 1 step, a checkpoint, a new Train Init from it, 1 more == 2 straight
    loop.train_steps(_init(comfy, model, ts, tmp_path, "half", batch_size=2), 1, val_every=2, checkpoint_every=1)
    resumed = loop.train_steps(_init(comfy, model, ts, tmp_path, "half", "latest", batch_size=2), 1, val_every=2)
    assert resumed.step == 2 and [h["loss"] for h in resumed.history] == [h["loss"] for h in out.history]
    for k, v in out.state["adapters"].items():
        assert torch.equal(v, resumed.state["adapters"][k]), k

    # a changed second control: only that sample's key and second control latent change
    p = sorted(ctrl2.iterdir())[0]
    Image.open(p).convert("RGB").rotate(90).save(p)
    ds2 = D.from_folder(folder.parent, C, B, control_folder=[ctrl, ctrl2])
    lc2 = cache.cache_latents(ds2, vae, tmp_path / "c")
    assert lc2.stats == (5, 1, 0)
    ts2, _ = cache.cache_text(lc2, clip, tmp_path / "c", unload=False)
    assert [s.key == t.key for s, t in zip(ts.samples, ts2.samples)] == [False, True]
    assert torch.equal(ts.samples[0].control_latents[0], ts2.samples[0].control_latents[0])
    assert not torch.equal(ts.samples[0].control_latents[1], ts2.samples[0].control_latents[1])


def test_qwen_image_edit_refuses_two_controls(comfy, family_bundle, tmp_path):
    """The qwen-image-edit spec's template holds one image: a dataset with two control folders is refused before
    anything is encoded, with a message naming the spec, the target and the fix."""
    from support.factories import te_qwen_image

    D = comfy.engine("data.dataset")
    cache = comfy.engine("data.cache")
    C, B = comfy.engine("data.captions").CaptionConfig(), comfy.engine("data.buckets").BucketConfig(64, 64, 64, 64)
    _, _, vae = family_bundle("qwen-image")
    clip = comfy.engine("te.align").align_clip(
        te_qwen_image.qwen_image_clip(te_qwen_image.qwen25vl_edit_tiny_file(41), vision=True), "qwen-image-edit")
    assert comfy.engine("te.vision").images_per_prompt(clip.spec) == 1
    folder, ctrl, ctrl2 = _two_control_set(tmp_path, "set", n=2)
    lc = cache.cache_latents(D.from_folder(folder.parent, C, B, control_folder=[ctrl, ctrl2]), vae, tmp_path / "c")
    with pytest.raises(Exception, match=r"'qwen-image-edit' encodes each caption with 1 input image.*img_000.png has 2 "
                                        r"control images.*Give the Dataset 1 control_folder line"):
        cache.cache_text(lc, clip, tmp_path / "c", unload=False)
    assert not (tmp_path / "c" / "text").exists() or not list((tmp_path / "c" / "text").rglob("*.safetensors"))


def test_flux2_two_controls_forward_receives_chained_references(comfy, family_bundle, tmp_path):
    """FLUX.2 [dev] with two control folders (its 'index' placement of several references): a batch of 2 trains with
    finite loss, and every training and validation forward gets two ``ref_latents`` equal (torch.equal) to two
    chained ComfyUI ReferenceLatent nodes + the model's extra_conds for its sample, in folder order."""
    D = comfy.engine("data.dataset")
    cache = comfy.engine("data.cache")
    loop = comfy.engine("train.loop")
    cfg, st = comfy.engine("train.config"), comfy.engine("train.state")
    C, B = comfy.engine("data.captions").CaptionConfig(), comfy.engine("data.buckets").BucketConfig(64, 64, 64, 64)
    model, clip, vae = family_bundle("flux2-dev")
    folder, ctrl, ctrl2 = _two_control_set(tmp_path, "set", n=2)
    ds = D.from_folder(folder.parent, C, B, control_folder=[ctrl, ctrl2])
    ts, _ = cache.cache_text(cache.cache_latents(ds, vae, tmp_path / "c"), clip, tmp_path / "c", unload=False)
    _, out, seen = _flux2_observed(comfy, model, ts, tmp_path, "flux2two", lambda kw: kw.get("ref_latents"))
    losses = [h["loss"] for h in out.history] + [out.history[-1]["val_loss"]]
    print("FLUX.2 two controls: losses (2 steps of batch 2, validation)", losses)
    assert all(np.isfinite(losses)), losses
    refs = [_stock_refs(model, s) for s in ts.samples]
    assert all(len(r) == 2 and r[0].shape[1] == 128 for r in refs)
    assert len(seen) >= 3, len(seen)
    for got in seen:
        assert got is not None and len(got) == 2
        for row in range(got[0].shape[0]):
            assert any(all(torch.equal(got[k][row:row + 1], ref[k]) for k in range(2)) for ref in refs), \
                "a forward's ref_latents match no sample's chained ReferenceLatent conditioning"
