"""Train Init's resume checks (train/resume.py) pinned in process (issue #26, survivors of the first run): the
refusal of a checkpoint whose layers differ names the first missing layer; one trained on a model whose layer has
another output count names both counts; the data-order note reads absent settings as 1."""
from __future__ import annotations

import pytest
import torch


def _ck(adapters, settings=None):
    return {"path": "runs/a/checkpoints/step_0000004.safetensors", "config": {"settings": settings or {}},
            "state": {"adapters": adapters}}


def test_layer_refusals_name_the_layer_and_the_sizes(comfy, sd15):
    resume = comfy.engine("train.resume")
    st = comfy.engine("train.state")
    C = comfy.engine("train.config")
    dm = sd15[0].model.diffusion_model
    lin = [(n, m) for n, m in dm.named_modules() if isinstance(m, torch.nn.Linear)][:3]
    names = [n for n, _ in lin]
    lora, opt = C.LoraConfig(rank=4, alpha=4), C.OptimizerConfig()

    def pair(m, rows):
        return {"lora_up.weight": torch.zeros(rows, 4), "lora_down.weight": torch.zeros(4, m.weight.shape[1])}

    fitting = {f"{n}.{k}": v for n, m in lin for k, v in pair(m, m.weight.shape[0]).items()}
    resume.check_compatible(_ck(fitting), sd15[0], names, lora, opt, None)  # the same layers and sizes: accepted
    only_first = {k: v for k, v in fitting.items() if k.startswith(names[0] + ".")}
    with pytest.raises(st.CheckpointError, match=rf"2 of this run's 3 target layers are not in it "
                                                 rf"\(e\.g\. '{names[1]}'\)"):
        resume.check_compatible(_ck(only_first), sd15[0], names, lora, opt, None)
    n, m = lin[0]
    rows = m.weight.shape[0]
    wider = {**fitting, f"{n}.lora_up.weight": torch.zeros(rows + 3, 4)}
    with pytest.raises(st.CheckpointError, match=rf"layer '{n}' has {rows + 3} outputs, this model's has {rows}"):
        resume.check_compatible(_ck(wider), sd15[0], names, lora, opt, None)


def test_data_order_note_reads_absent_settings_as_one(comfy):
    resume = comfy.engine("train.resume")
    st = comfy.engine("train.state")
    assert resume.samples_per_step({}) == 1 and resume.samples_per_step({"batch_size": 2, "grad_accum": 3}) == 6
    now = st.RunSettings(run_name="r", batch_size=1, grad_accum=1)
    assert resume.data_order_note(_ck({}, {"batch_size": 1}), now) == ""
    note = resume.data_order_note(_ck({}, {"batch_size": 2}), now)
    assert "took 2 samples per step (batch_size 2 x grad_accum 1 x processes 1), this run takes 1" in note
    note = resume.data_order_note(_ck({}, {"grad_accum": 3}), now)
    assert "(batch_size 1 x grad_accum 3 x processes 1)" in note and "= 3 to continue it exactly" in note
