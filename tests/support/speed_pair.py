"""Runs of one tiny model with and without a speed option (tests/test_speed_optimizer.py,
tests/test_speed_channels_last.py): the same seed, fp32, trained in process with the loop's own ``train_steps``;
compared adapter by adapter."""
from __future__ import annotations

import torch

TOL = 1e-6  # issue #25: adapters after 5 steps within 1e-6 (fp32)


def one_sample_set(comfy, bundle, channels: int):
    """(MODEL, TrainingSet) of a tiny family bundle: one 64 px sample captioned by the bundle's own CLIP."""
    model, clip, _ = bundle
    types = comfy.engine("data.types")
    (cond,) = comfy.nodes.CLIPTextEncode().encode(clip, "ohwx, a red circle")
    lat = torch.randn(channels, 8, 8, generator=torch.Generator().manual_seed(0))
    return model, types.TrainingSet((types.Sample("a", lat, (types.CaptionVariant("ohwx", cond),), bucket=(64, 64)),))


def init(T, model, tset, root, name, lora=None, opt=None, resume="none", **settings):
    return T.loop.init_run(model, tset, lora or T.C.LoraConfig(rank=4, alpha=4, preset="attention"),
                           T.C.TimestepConfig(), opt or T.C.OptimizerConfig(lr=1e-3),
                           T.st.RunSettings(run_name=name, batch_size=2, **settings), resume=resume, runs_root=root)


def train(T, run, steps, on_step=None, checkpoint_every=0):
    return T.loop.train_steps(run, steps, checkpoint_every=checkpoint_every, on_step=on_step)


def assert_same(a, b, tol: float = TOL) -> None:
    """Every adapter tensor of runs ``a`` and ``b`` within ``tol`` (absolute), the same losses within ``tol``, and
    the adapters trained at all (not both still at their initial values)."""
    sa, sb = a.state["adapters"], b.state["adapters"]
    assert sa.keys() == sb.keys()
    assert a.step == b.step
    for k, v in sa.items():
        assert v.shape == sb[k].shape and v.dtype == sb[k].dtype == torch.float32, k
        diff = float((v - sb[k]).abs().max())
        assert diff <= tol, f"{k}: max difference {diff:.3g} > {tol}"
    assert any(float(v.abs().max()) > 0 for k, v in sa.items() if "lora_up" in k)  # it trained
    la, lb = [h["loss"] for h in a.history], [h["loss"] for h in b.history]
    assert len(la) == len(lb) and all(abs(x - y) <= tol for x, y in zip(la, lb)), (la, lb)


def max_diff(a, b) -> float:
    return max(float((v - b.state["adapters"][k]).abs().max()) for k, v in a.state["adapters"].items())


def saved_lora(T, run, folder) -> dict[str, torch.Tensor]:
    """The LoRA file Save LoRA writes (fp32) into ``folder``, read back with safetensors."""
    from safetensors.torch import load_file

    path, _ = T.export.save_lora(run, "speed", folder=folder, dtype=torch.float32, ema=False)
    return load_file(str(path))


def assert_same_layout(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], tol: float = TOL) -> None:
    """Two LoRA state dicts with the same keys, shapes, dtypes, plain contiguous tensors, values within ``tol``."""
    assert x.keys() == y.keys()
    for k, v in x.items():
        assert v.shape == y[k].shape and v.dtype == y[k].dtype, k
        assert v.is_contiguous() and y[k].is_contiguous(), k
        assert float((v.float() - y[k].float()).abs().max()) <= tol, k
