"""The ``channels_last`` speed option (train/speed_channels_last.py): during Train Steps the UNet's 2-D convolution
weights and its latents are in channels-last layout. 5 fp32 steps train the same adapters as the plain layout
(within 1e-6) on SD1.5 and SDXL with LoCon on every conv (the activation-side conv hook runs on channels-last
inputs), every convolution is seen receiving channels-last inputs and weights during training, and the weights
are back in the ordinary layout afterwards (the model is shared with ComfyUI's samplers). Resume across the
switch equals no switch; checkpoints and LoRA files are plain contiguous tensors, the same either way. FLUX
(no 2-D convolutions): nothing changes, Train Init says so. Through the real server: a prompt with the Speed
Options node (fused AdamW + channels_last) trains and the server's log shows both acting."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from support import speed_pair as sp
from support import train_prompt
from support.factories.dataset import make_dataset

CL = torch.channels_last
LOCON = dict(algorithm="locon", rank=4, alpha=4, preset="all-linear+conv")
# The optimizer's default learning rate (1e-4). The layouts run different conv kernels, so gradients differ in
# float rounding (~1e-7 relative); AdamW divides each gradient element by its own running norm, so an element
# whose gradient is near zero (near eps) can move by up to lr differently: at lr 1e-3 the SD1.5 adapters end up
# to 1.3e-6 apart after 5 steps, at 1e-4 ten times less. A real change of the math moves them by ~lr.
OPT = dict(lr=1e-4)


class ConvWatch:
    """Hooks on every 2-D convolution of ``dm`` (the model the trainer shares), registered before the trainer's
    LoRA hooks: per call, whether the convolution's weight (kernels larger than 1x1) and its own output were
    channels-last, and whether
    the model's first convolution (the latents' input) got a channels-last input. Outputs are checked where the
    two layouts differ (C, H, W > 1) and for kernels larger than 1x1: ComfyUI's SpatialTransformer ends with
    ``.contiguous()``, so a conv after an attention block gets an ordinary-layout input; a larger conv converts
    it itself (its weight is channels-last, so its output is), a 1x1 conv (whose weight is both layouts at once)
    keeps the input's.)"""

    def __init__(self, dm):
        self.convs = [m for m in dm.modules() if isinstance(m, torch.nn.Conv2d)]
        self.first = self.convs[0]
        self.inputs, self.weights, self.outputs = [], [], []
        self.handles = [m.register_forward_pre_hook(self.pre) for m in self.convs] + \
            [m.register_forward_hook(self.post) for m in self.convs]

    def pre(self, m, args):
        if m is self.first:
            self.inputs.append(args[0].is_contiguous(memory_format=CL))
        if m.weight.shape[2:].numel() > 1:  # (a 1x1 weight is in both layouts at once)
            self.weights.append(m.weight.is_contiguous(memory_format=CL))

    def post(self, m, args, out):
        if min(out.shape[1:]) > 1 and m.weight.shape[2:].numel() > 1:
            self.outputs.append(out.is_contiguous(memory_format=CL))

    def close(self):
        for h in self.handles:
            h.remove()

    def all(self, value: bool) -> bool:
        seen = self.inputs + self.weights + self.outputs
        return bool(self.inputs and self.outputs) and all(v == value for v in seen)


def _train_watched(T, run, steps, **kw):
    watch = ConvWatch(run.model.model.diffusion_model)
    trainers = []
    try:
        out = sp.train(T, run, steps, on_step=lambda r, tr: trainers.append(tr), **kw)
    finally:
        watch.close()
    return out, watch, trainers


@pytest.fixture(scope="module")
def unets(comfy, T, sd15, sd15_training_set, family_bundle):
    sdxl_model, sdxl_set = sp.one_sample_set(comfy, family_bundle("sdxl"), 4)
    return {"sd15": (sd15[0], sd15_training_set), "sdxl": (sdxl_model, sdxl_set)}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_channels_last_trains_the_same_adapters(T, unets, family, tmp_path):
    model, tset = unets[family]
    lora, opt = T.C.LoraConfig(**LOCON), T.C.OptimizerConfig(**OPT)
    plain, w_plain, _ = _train_watched(T, sp.init(T, model, tset, tmp_path / "runs", "plain", lora=lora, opt=opt), 5)
    run = sp.init(T, model, tset, tmp_path / "runs", "cl", lora=lora, opt=opt, channels_last=True)
    assert run.meta["speed_note"].startswith(f"channels_last: {len(w_plain.convs)} 2-D convolutions run in")
    cl, w_cl, trainers = _train_watched(T, run, 5)
    # acted: the latents went in channels-last, every convolution ran with a channels-last weight and gave a
    # channels-last output; each weight was converted once in the Train Steps call
    assert w_cl.all(True) and w_plain.all(False)
    layout = trainers[-1].channels_last
    larger = [m for m in w_cl.convs if m.weight.shape[2:].numel() > 1]  # 1x1 weights need no copy
    assert layout.converted == len(larger) > 0 and layout.inputs >= 5
    # the LoCon conv adapters ran on the activation side, on those inputs
    assert any(a.kind == "conv" for a in trainers[-1].adapters.values())
    # and the shared model is back in the ordinary layout
    assert all(m.weight.is_contiguous() for m in w_cl.convs)
    print(f"{family}: max adapter difference {sp.max_diff(plain, cl):.3g}")
    sp.assert_same(plain, cl)


@pytest.mark.parametrize("first,then", [(False, True), (True, False)])
def test_resume_across_the_switch_equals_no_switch(T, sd15, sd15_training_set, tmp_path, first, then):
    root = tmp_path / "runs"
    kw = dict(lora=T.C.LoraConfig(**LOCON), opt=T.C.OptimizerConfig(**OPT))
    plain = sp.train(T, sp.init(T, sd15[0], sd15_training_set, root, "plain", **kw), 5)
    half = sp.train(T, sp.init(T, sd15[0], sd15_training_set, root, "switch", channels_last=first, **kw), 2,
                    checkpoint_every=2)
    resumed = sp.init(T, sd15[0], sd15_training_set, root, "switch", resume="latest", channels_last=then, **kw)
    assert resumed.step == 2
    done, watch, _ = _train_watched(T, resumed, 3)
    assert watch.all(then)
    sp.assert_same(plain, done)
    with safe_open(half.checkpoints[-1], "pt") as f:  # plain contiguous tensors, whichever layout trained
        assert all(f.get_tensor(k).is_contiguous() for k in f.keys())
    sp.assert_same_layout(sp.saved_lora(T, plain, tmp_path / "a"), sp.saved_lora(T, done, tmp_path / "b"))


def test_flux_has_nothing_to_convert(comfy, T, family_bundle, tmp_path):
    model, tset = sp.one_sample_set(comfy, family_bundle("flux1-dev"), 16)
    lora = T.C.LoraConfig(rank=4, alpha=2, preset="all-linear+conv")
    run = sp.init(T, model, tset, tmp_path / "runs", "cl", lora=lora, channels_last=True)
    assert run.meta["speed_note"] == ("channels_last: this model has no 2-D convolutions, so it changes nothing "
                                      "(it acts on UNets)")
    hooks = []
    cl = sp.train(T, run, 2, on_step=lambda r, tr: hooks.append(
        (tr.channels_last.convs, dict(tr.patcher.model.diffusion_model._forward_pre_hooks))))
    assert hooks[-1] == ([], {})
    sp.assert_same(sp.train(T, sp.init(T, model, tset, tmp_path / "runs", "plain", lora=lora), 2), cl)


@pytest.mark.server
def test_speed_options_node_through_the_server(server):
    """Speed Options (fused AdamW, channels_last) connected to Train Init: the run trains, Train Init's text names
    the convolutions, and the server's log shows the fused AdamW built and the conv weights converted."""
    make_dataset(server.input_dir / "speed_ds", n=4, sizes=((64, 64),))
    p = train_prompt.prompt("speed_server", 2, dataset="speed_ds")
    p["11"] = {"class_type": train_prompt.P + "SpeedOptions", "inputs": {
        "optimizer_impl": "fused", "channels_last": True, "lora_math": "activation"}}
    p["8"]["inputs"]["speed"] = ["11", 0]
    before = server.log_path.read_text(errors="replace")
    hist = server.run(p)
    text = json.dumps(hist["outputs"]["8"])
    assert "channels_last: " in text and "2-D convolutions run in channels-last layout" in text
    log = server.log_path.read_text(errors="replace")[len(before):]
    assert "optimizer_impl fused: AdamW (fused)" in log
    line = next(x for x in log.splitlines() if "convolution weight conversions to channels-last" in x)
    assert " 0 convolution weight conversions" not in line, line
