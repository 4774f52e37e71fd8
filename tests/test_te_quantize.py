"""Text encoders quantized while captions are cached (issue #19: Cache Text Embeddings ``quantize``): the tiny
FLUX.1 encoders (ComfyUI's CLIP-L and T5 classes, ``manual_cast`` layers) encode with int8/int4 weights quantized
around ComfyUI's load, and the shared CLIP is exactly as loaded afterwards."""
from __future__ import annotations

import dataclasses

import pytest
import torch

P = "AlignedTrainer_"


@pytest.fixture(scope="module")
def flux_clip(family_bundle):
    return family_bundle("flux1-dev")[1].clone()


def _encode(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))[0]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _fake_int8(clip):
    """An independent int8 reference: each Linear weight rounded to 255 levels of its row's absmax, put back in
    full precision (what quanto's per-row symmetric int8 stores)."""
    saved = {}
    with torch.no_grad():
        for m in clip.cond_stage_model.modules():
            if isinstance(m, torch.nn.Linear):
                w = m.weight
                s = w.abs().amax(dim=1, keepdim=True) / 127
                saved[m] = w.detach().clone()
                w.copy_(torch.clamp(torch.round(w / s), -127, 127) * s)
    return saved


def test_quantized_scope_encodes_with_int8_weights_and_restores_the_shared_clip(comfy, D, flux_clip):
    q = comfy.engine("train.quantize")
    clip = flux_clip
    text = "ohwx, a red circle on a blue background"
    ref_cond, ref_extra = _encode(clip, text)
    D.cache.unload_text_encoder(clip)
    before = {k: v for k, v in clip.cond_stage_model.state_dict(keep_vars=True).items()}
    linears = [m for m in clip.cond_stage_model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m).comfy_cast_weights for m in linears), "ComfyUI builds its encoders with manual_cast"
    out = {}
    for mode in ("int8", "int4"):
        with q.quantized_text_encoder(clip, mode, D.cache.unload_patcher):
            assert all(type(m.weight.data) is not torch.Tensor for m in linears), "every Linear is quantized"
            out[mode] = _encode(clip, text)
            assert D.cache.is_loaded(clip)
        # the shared encoder is as loaded: same parameter objects, unloaded, no per-layer cast flag left
        after = clip.cond_stage_model.state_dict(keep_vars=True)
        assert set(after) == set(before) and all(after[k] is before[k] for k in before)
        assert not any("comfy_cast_weights" in m.__dict__ for m in linears)
        assert not D.cache.is_loaded(clip)
    c2, e2 = _encode(clip, text)
    assert torch.equal(c2, ref_cond) and torch.equal(e2["pooled_output"], ref_extra["pooled_output"])
    D.cache.unload_text_encoder(clip)
    saved = _fake_int8(clip)
    try:
        fake_cond, fake_extra = _encode(clip, text)
    finally:
        with torch.no_grad():
            for m, w in saved.items():
                m.weight.copy_(w)
        D.cache.unload_text_encoder(clip)
    cond, extra = out["int8"]
    assert _rel(cond, fake_cond) < 1e-5 and _rel(extra["pooled_output"], fake_extra["pooled_output"]) < 1e-5
    assert cond.dtype == ref_cond.dtype and extra["pooled_output"].dtype == ref_extra["pooled_output"].dtype
    e8, e4 = _rel(cond, ref_cond), _rel(out["int4"][0], ref_cond)
    assert 0 < e8 < e4 < 0.5, (e8, e4)  # 4-bit weights are coarser than 8-bit ones


def test_cache_text_node_quantized_has_its_own_key(comfy, D, flux_clip, latents_flux):
    n = len({c for i in latents_flux.dataset.items for c in i.captions} | {""})
    ts, info = comfy.call(P + "CacheTextEmbeddings", latents=latents_flux, clip=flux_clip, unload_text_encoder=True,
                          quantize="int8")
    assert f"0 cached, {n} encoded" in info, info
    assert not D.cache.is_loaded(flux_clip)
    root = info.split(":")[0]
    full, stats = D.cache.cache_text(latents_flux, flux_clip, root.rsplit("/text", 1)[0])
    assert stats == (0, n, 0), "full-precision embeddings are cached apart from int8 ones"
    a, b = full.samples[0].captions[0].conditioning[0][0], ts.samples[0].captions[0].conditioning[0][0]
    assert 0 < _rel(b, a) < 0.05
    _, again = D.cache.cache_text(latents_flux, flux_clip, root.rsplit("/text", 1)[0], quantize="int8")
    assert again == (n, 0, 0) and not D.cache.is_loaded(flux_clip), "hits never load (or quantize) the encoder"
    with pytest.raises(Exception, match="quantize"):
        D.cache.cache_text(latents_flux, flux_clip, root, quantize="int3")


@pytest.fixture(scope="module")
def latents_flux(comfy, D, family_bundle, tmp_path_factory):
    from support.factories.dataset import make_dataset

    vae = family_bundle("flux1-dev")[2]
    base = tmp_path_factory.mktemp("teq")
    folder = make_dataset(base / "data", n=1, sizes=((64, 64),))
    bk = comfy.engine("data.buckets")
    caps = comfy.engine("data.captions")
    ds = D.dataset.from_folder(folder.parent, caps.CaptionConfig(trigger_word="ohwx"),
                               bk.BucketConfig(resolution=64, min_side=64, max_side=64, step=64))
    return D.cache.cache_latents(ds, vae, base / "cache")


def test_4bit_unpack_needs_no_compiled_extension_on_cuda(comfy):
    """quanto's own CUDA and CPU unpack are kernels of extensions it compiles at first use (nvcc / a C++ compiler;
    the CUDA one hung an H200 run); ours is plain tensor ops, registered for both, and reads back exactly what
    quanto's packer wrote, without building either extension."""
    from optimum.quanto.library.extensions.extension import get_extension
    from optimum.quanto.tensor.packed import pack_weights

    q = comfy.engine("train.quantize")
    q._qtype("int4")
    g = torch.Generator().manual_seed(0)
    for bits in (2, 4):
        values = torch.randint(0, 2 ** bits, (12, 7), generator=g, dtype=torch.uint8)
        packed = pack_weights(values, bits)  # quanto's own packing
        assert packed.shape == (12 * bits // 8, 7)
        assert torch.equal(q.unpack_bits(packed, bits), values)
        assert torch.equal(torch.ops.quanto.unpack(packed, bits), values)  # the op now dispatches to it on the CPU
    assert torch._C._dispatch_has_kernel_for_dispatch_key("quanto::unpack", "CUDA")
    assert get_extension("quanto_cpp")._lib is None, "quanto compiled its C++ extension"
