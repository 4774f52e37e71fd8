"""Two paths of ``loop.Trainer`` pinned on the tiny SD1.5 (issue #26): a weight-side adapter (LoHa) computes in the
trainer's forward exactly what ComfyUI's stock LoRA loader computes with the same weights (the weight wrapper is
registered on the trainer's patcher), and an ordinary RuntimeError in a pass is raised at once: the in-place retry
(a second pass cloning saved tensors) is only for autograd's in-place error."""
from __future__ import annotations

import dataclasses

import pytest
import torch


def _run(T, sd15, tset, tmp_path, name, lora):
    return T.loop.init_run(sd15[0], tset, lora, T.C.TimestepConfig(), T.C.OptimizerConfig(lr=1e-3),
                           T.st.RunSettings(run_name=name, seed=2), runs_root=tmp_path / "runs")


def test_weight_side_adapter_computes_what_the_stock_loader_does(T, sd15, sd15_training_set, tmp_path):
    import comfy.model_management as mm
    from comfy.sd import load_lora_for_models

    run = _run(T, sd15, sd15_training_set, tmp_path, "loha",
               T.C.LoraConfig(algorithm="loha", rank=4, alpha=2, preset="attention"))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 8, 8, generator=g)
    sigma = torch.tensor([3.0])
    cond = [sd15_training_set.samples[0].captions[0].conditioning]
    with torch.inference_mode(False), torch.enable_grad():
        tr = T.loop.Trainer(run)
        try:
            assert tr.adapters and all(not a.kind for a in tr.adapters.values())  # all weight side
            tr.load()
            with torch.no_grad():
                for p in tr.params:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                got = tr.denoised_at(x, sigma, cond)
            state = tr.adapter_state()
        finally:
            tr.release()
    lora = T.export.kohya_state_dict(run.advanced(state={"adapters": state}), dtype=torch.float32)
    patched = load_lora_for_models(sd15[0], None, lora, 1.0, 0.0)[0]
    c = cond[0][0][0]
    with torch.no_grad():
        mm.load_models_gpu([sd15[0]])
        base = sd15[0].model.apply_model(x, sigma, c_crossattn=c)
        mm.load_models_gpu([patched])
        want = patched.model.apply_model(x, sigma, c_crossattn=c)
        mm.load_models_gpu([sd15[0]])
    assert (want - base).abs().max() > 1e-3  # the adapter changes the prediction
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_ordinary_runtime_error_is_raised_without_a_cloning_retry(T, sd15, sd15_training_set, tmp_path):
    """Captions encoded at the wrong width (13 instead of the UNet's 768): the cross-attention's RuntimeError comes
    out of the first pass; the trainer ran one forward, and does not switch to cloning saved tensors."""
    bad = dataclasses.replace(sd15_training_set, samples=tuple(
        dataclasses.replace(s, captions=tuple(dataclasses.replace(
            c, conditioning=[[torch.zeros(1, 77, 13), dict(c.conditioning[0][1])]]) for c in s.captions))
        for s in sd15_training_set.samples))
    run = _run(T, sd15, bad, tmp_path, "bad", T.C.LoraConfig(rank=4, alpha=4, preset="attention"))
    calls = []
    with torch.inference_mode(False), torch.enable_grad():
        tr = T.loop.Trainer(run)
        try:
            tr.load()
            h = tr.patcher.model.diffusion_model.register_forward_pre_hook(lambda *a: calls.append(1))
            try:
                with pytest.raises(RuntimeError) as e:
                    tr.backward()
            finally:
                h.remove()
        finally:
            tr.release()
    assert "modified by an inplace operation" not in str(e.value)
    assert calls == [1] and tr.clone_saved is False

