"""Placement of the frozen base (Train Init ``quantize`` / ``offload_blocks``, train/placement.py) pinned from the
outside (issue #26): quantize and offload together, a preview in between, a failed load, and another clone of
the model loaded by ComfyUI with a LoRA patched into the shared weights. The expected values are the base's own
(a forward of the unchanged model, the weights as built), not numbers typed here."""
from __future__ import annotations

import pytest
import torch

from support.factories import families


@pytest.fixture(scope="module")
def tset(comfy, family_bundle):
    types = comfy.engine("data.types")
    _, clip, _ = family_bundle("flux1-dev")
    (cond,) = comfy.nodes.CLIPTextEncode().encode(clip, "ohwx, a red circle")
    g = torch.Generator().manual_seed(0)
    return types.TrainingSet((types.Sample("s", torch.randn(16, 8, 8, generator=g),
                                           (types.CaptionVariant("ohwx", cond),), bucket=(64, 64)),))


def _init(comfy, model, tset, tmp_path, name, **settings):
    C = comfy.engine("train.config")
    st = comfy.engine("train.state")
    loop = comfy.engine("train.loop")
    with torch.inference_mode():
        return loop.init_run(model, tset, C.LoraConfig(rank=4, alpha=4, preset="attention"), C.TimestepConfig(),
                             C.OptimizerConfig(lr=1e-2), st.RunSettings(run_name=name, **settings), runs_root=tmp_path)


def _linears(model):
    return [m for m in model.model.diffusion_model.modules() if isinstance(m, torch.nn.Linear)]


def _as_built(model, originals):
    """Every Linear holds its original weight Parameter again, as a plain full tensor, and no module keeps an
    instance ``forward`` (offload / checkpointing wrappers)."""
    dm = model.model.diffusion_model
    assert all(m.weight is w for m, w in zip(_linears(model), originals))
    assert all(type(p.data) is torch.Tensor and p.numel() > 0 for p in dm.parameters())
    assert not [n for n, m in dm.named_modules() if "forward" in m.__dict__]


def test_quantize_with_offload_preview_sees_the_full_base_and_everything_is_restored(comfy, tset, tmp_path,
                                                                                      monkeypatch):
    """quantize int8 + offload_blocks 1: a preview between steps computes exactly what the unchanged base computes
    (the offloaded block's quantized weights are not streamed into it); the step after the preview streams the
    offloaded block again; afterwards every weight is the original (the offload scope closes before the
    quantization is undone, else it would put quantized weights back)."""
    loop = comfy.engine("train.loop")
    offload = comfy.engine("train.offload")
    model = families.build_model("flux1-dev")
    originals = [m.weight for m in _linears(model)]
    run = _init(comfy, model, tset, tmp_path, "qoff", quantize="int8", offload_blocks=1)
    smp = tset.samples[0]
    g = torch.Generator().manual_seed(1)
    x0 = smp.latent[None].float()
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.tensor([0.6])
    conds = [smp.captions[0].conditioning]
    probe = loop.Trainer(run)  # LoRA B starts at zero: the base's own prediction
    try:
        with torch.no_grad():
            ref = probe.predict(x0, noise, sigma, conds)[0]
    finally:
        probe.release()
    events = []
    orig_copy = offload._Streamer._copy

    def counting(self, i):
        events.append("copy")
        return orig_copy(self, i)

    monkeypatch.setattr(offload._Streamer, "_copy", counting)
    previews = []

    def preview(tr, step):
        previews.append(tr.predict(x0, noise, sigma, conds)[0])
        events.append("preview")

    with torch.inference_mode():
        loop.train_steps(run, 2, preview=preview, preview_every=1, on_step=lambda r, tr: events.append("step"))
    assert len(previews) == 2 and all(torch.equal(p, ref) for p in previews)
    # step 1 streams, its preview does not, step 2 (after the preview) streams again
    first = events.index("preview")
    assert "copy" in events[:first] and "copy" in events[first:events.index("step", first)], events
    assert events.count("copy") >= 2
    _as_built(model, originals)


def test_failed_load_leaves_the_base_as_built(comfy, tset, tmp_path, monkeypatch):
    """A load that fails (here: ComfyUI's loader runs out of memory) after the quantized layers' weights were taken
    out: the error reaches the caller and every weight is back in the model."""
    import comfy.model_management as mm

    loop = comfy.engine("train.loop")
    model = families.build_model("flux1-dev")
    originals = [m.weight for m in _linears(model)]
    run = _init(comfy, model, tset, tmp_path, "qfail", quantize="int8", offload_blocks=1)
    orig = mm.load_models_gpu

    def failing(models, *a, **k):
        if any(getattr(m, "model", None) is model.model for m in models):
            raise torch.OutOfMemoryError("out of memory (test)")
        return orig(models, *a, **k)

    monkeypatch.setattr(mm, "load_models_gpu", failing)
    with torch.inference_mode(), pytest.raises(torch.OutOfMemoryError):
        loop.train_steps(run, 1)
    _as_built(model, originals)


def test_quantize_starts_from_the_unpatched_base_when_a_lora_clone_is_loaded(comfy, tset, tmp_path):
    """The user sampled with a LoRA (another clone of the same model, loaded by ComfyUI: its patch is written into
    the shared weights) and then trains on the base with ``quantize``: the quantized weights are those of the
    base, not of the LoRA-patched model, and afterwards the base's weights hold their original values."""
    import comfy.model_management as mm

    loop = comfy.engine("train.loop")
    model = families.build_model("flux1-dev")
    dm = model.model.diffusion_model
    name = "double_blocks.0.img_mlp.0"  # a quantized layer (no adapter with the attention preset)
    layer = dm.get_submodule(name)
    before = layer.weight.detach().clone()
    lora_clone = model.clone()
    assert lora_clone.add_patches({f"diffusion_model.{name}.weight": (torch.full_like(before, 10.0),)}, 1.0)
    mm.load_models_gpu([lora_clone], force_full_load=True)
    assert torch.allclose(layer.weight, before + 10.0)  # ComfyUI patched the shared weight in place
    run = _init(comfy, model, tset, tmp_path, "qpatched", quantize="int8")
    seen = []

    def on_step(r, tr):
        w = layer.weight.data
        seen.append(w.dequantize().float() if hasattr(w, "dequantize") else None)

    with torch.inference_mode():
        loop.train_steps(run, 1, on_step=on_step)
    assert seen[0] is not None  # the layer trained quantized
    assert (seen[0] - before).abs().max() < 0.1 * before.abs().max()  # int8 of the base, not of base + 10
    assert torch.equal(layer.weight.detach(), before)
    assert not any(getattr(lm.model, "model", None) is model.model for lm in mm.current_loaded_models)
