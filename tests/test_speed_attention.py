"""Speed option ``attention`` (train/attention.py): the training step's attention through ComfyUI's own override
switch. Another kernel computes the same attention: the adapters after 5 steps (fp32) equal ComfyUI's choice within
1e-6, on a UNet (tiny SD1.5) and a transformer (tiny FLUX.1), and the chosen kernel is the one that ran (on this
CPU ComfyUI's choice is its sub-quadratic attention, no SDPA call; 'pytorch' and 'sdpa_flash' call PyTorch's SDPA,
the latter its CPU flash kernel alone). A kernel this machine lacks is refused at Train Init, naming it."""
from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from test_train_activation import _flux_set

SDPA_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "scaled_dot_product_attention",
            "_scaled_dot_product_attention_math")


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _train(T, model, tset, tmp_path, name, attention, steps=5, resume="none", gc=False):
    # the default learning rate (1e-4): Adam divides each gradient by its own running size, so a rounding-level
    # difference in a near-zero gradient moves a weight by up to about lr x its relative change (2.1e-6 at 1e-3)
    run = T.loop.init_run(model, tset, T.C.LoraConfig(rank=4, alpha=4), T.C.TimestepConfig(),
                          T.C.OptimizerConfig(), T.st.RunSettings(run_name=name, seed=3, attention=attention,
                                                                         gradient_checkpointing=gc),
                          resume=resume, runs_root=tmp_path / "runs")
    ops = _Ops()
    with ops:
        out = T.loop.train_steps(run, steps, checkpoint_every=steps)
    return out, ops.seen


def _assert_same(a, b):
    assert a.state["adapters"].keys() == b.state["adapters"].keys()
    worst = max(float((a.state["adapters"][k] - b.state["adapters"][k]).abs().max()) for k in a.state["adapters"])
    assert worst < 1e-6, worst
    assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in b.history], abs=1e-6)


@pytest.mark.parametrize("family", ["sd15", "flux1-dev"])
def test_other_kernels_train_the_same_adapters(T, comfy, sd15, sd15_training_set, family_bundle, tmp_path, family):
    if family == "sd15":
        model, tset = sd15[0], sd15_training_set
    else:
        model, tset = _flux_set(comfy, T, family_bundle)
    plain, seen = _train(T, model, tset, tmp_path, "plain", "comfy")
    assert not any(seen[o] for o in SDPA_OPS), "ComfyUI's choice on a CPU is its chunked attention"
    sdpa, seen = _train(T, model, tset, tmp_path, "sdpa", "pytorch")
    assert seen["_scaled_dot_product_flash_attention_for_cpu"] > 0  # PyTorch's SDPA ran (its CPU pick here)
    _assert_same(plain, sdpa)
    flash, seen = _train(T, model, tset, tmp_path, "flash", "sdpa_flash", gc=True)
    assert seen["_scaled_dot_product_flash_attention_for_cpu"] > 0
    plain_gc, _ = _train(T, model, tset, tmp_path, "plain_gc", "comfy", gc=True)
    _assert_same(plain_gc, flash)


def test_resume_switches_the_kernel_and_continues_alike(T, sd15, sd15_training_set, tmp_path):
    """A checkpoint written with ComfyUI's attention continues with SDPA as it would have continued as it was."""
    half, _ = _train(T, sd15[0], sd15_training_set, tmp_path, "half", "comfy", steps=3)
    ck = str(half.checkpoints[-1])
    on, _ = _train(T, sd15[0], sd15_training_set, tmp_path, "on", "comfy", steps=3, resume=ck)
    switched, seen = _train(T, sd15[0], sd15_training_set, tmp_path, "switched", "pytorch", steps=3, resume=ck)
    assert seen["_scaled_dot_product_flash_attention_for_cpu"] > 0
    _assert_same(on, switched)


def test_unavailable_kernels_are_refused_at_train_init(T, sd15, sd15_training_set, tmp_path):
    """On this CPU PyTorch has no memory-efficient or cuDNN SDPA kernel, and ComfyUI registers sage/flash/xformers
    only with their packages installed (none here): each is refused before anything trains, naming it."""
    from comfy.ldm.modules import attention as comfy_attention

    for name in ("sdpa_efficient", "sdpa_cudnn", "sage"):
        assert name.startswith("sdpa") or comfy_attention.get_attention_function(name, default=None) is None
        with pytest.raises(T.C.ConfigError, match=f"attention '{name}'"):
            T.loop.init_run(sd15[0], sd15_training_set, T.C.LoraConfig(rank=4), T.C.TimestepConfig(),
                            T.C.OptimizerConfig(), T.st.RunSettings(run_name="refused", attention=name),
                            runs_root=tmp_path / "runs")
    assert not (tmp_path / "runs" / "refused").exists()
    with pytest.raises(T.C.ConfigError, match="attention must be one of"):
        T.loop.init_run(sd15[0], sd15_training_set, T.C.LoraConfig(rank=4), T.C.TimestepConfig(),
                        T.C.OptimizerConfig(), T.st.RunSettings(run_name="refused", attention="fastest"),
                        runs_root=tmp_path / "runs")


@pytest.mark.server
def test_speed_options_node_through_the_server(server):
    """Through the real server: the Speed Options node's attention reaches the run (the checkpoint's recorded
    settings) and trains the same losses as ComfyUI's choice; a kernel this CPU lacks fails the prompt naming it."""
    import json

    from safetensors import safe_open

    from support import train_prompt
    from support.api_nodes import execution_error
    from support.factories.dataset import make_dataset

    make_dataset(server.input_dir / "speed_ds", n=2, sizes=((64, 64),))
    runs = server.output_dir / "aligned_trainer" / "runs"

    def prompt(name, attention):
        p = train_prompt.prompt(name, 2, dataset="speed_ds", checkpoint_every=2)
        p["11"] = {"class_type": "AlignedTrainer_SpeedOptions", "inputs": {
            "optimizer_impl": "default", "channels_last": False, "lora_math": "activation",
            "attention": attention}}
        p["8"]["inputs"]["speed"] = ["11", 0]
        return p

    def recorded(name):
        with safe_open(str(runs / name / "checkpoints" / "step_0000002.safetensors"), "pt") as f:
            meta = f.metadata()
        return json.loads(meta["config"])["settings"], [h["loss"] for h in json.loads(meta["history"])]

    server.run(prompt("speed_comfy", "comfy"))
    server.run(prompt("speed_sdpa", "pytorch"))
    (s1, l1), (s2, l2) = recorded("speed_comfy"), recorded("speed_sdpa")
    assert (s1["attention"], s2["attention"]) == ("comfy", "pytorch")
    assert l2 == pytest.approx(l1, abs=1e-6) and len(l1) == 2
    err = execution_error(server, prompt("speed_refused", "sdpa_cudnn"))
    assert err["node_type"] == "AlignedTrainer_TrainInit" and "attention 'sdpa_cudnn'" in err["exception_message"]
