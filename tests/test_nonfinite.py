"""NaN and infinity pass every min/max check of a JSON prompt: each engine entry point that takes a float
from a node refuses them with a message naming the field (the LoRA/timestep/optimizer configs and the
Dataset node are covered through the server in test_paths.py)."""
from __future__ import annotations

import math

import pytest

BAD = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("field", ["ema_decay", "guidance", "reg_weight", "dop_weight"])
def test_run_settings_refuse_non_finite(comfy, field, value):
    st = comfy.engine("train.state")
    with pytest.raises(ValueError, match=field):
        st.RunSettings(**{field: value})
    st.RunSettings(**{field: 0.5})  # a finite value is fine


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("field", ["cfg", "guidance"])
def test_sample_settings_refuse_non_finite(comfy, field, value):
    render = comfy.engine("sampling.render")
    with pytest.raises(ValueError, match=field):
        render.SampleSettings(**{field: value})
    render.SampleSettings(**{field: 2.0})


@pytest.mark.parametrize("value", BAD)
def test_checkpoint_grid_refuses_non_finite_strength(comfy, value):
    ck = comfy.engine("sampling.checkpoints")
    render = comfy.engine("sampling.render")
    with pytest.raises(ValueError, match="strength"):
        ck.checkpoint_grid(None, None, None, [], ["a"], "", render.SampleSettings(), strength=value)


@pytest.mark.parametrize("value", [*BAD, 1.0, -0.1])
def test_loss_plot_refuses_bad_smoothing(comfy, value):
    plot = comfy.engine("plot")
    with pytest.raises(ValueError, match="smoothing"):
        plot.summarize([{"step": 1, "loss": 1.0}], smoothing=value)
    assert plot.summarize([{"step": 1, "loss": 1.0}], smoothing=0.5)["loss"] == [1.0]
