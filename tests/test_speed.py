"""Speed options (train/speed.py): the node's values reach the run's settings, bad values are refused at Train
Init. What each option does is tested in tests/test_speed_*.py."""
import pytest


def test_speed_options_validate_and_reach_the_settings(comfy):
    speed = comfy.engine("train.speed")
    state = comfy.engine("train.state")
    C = comfy.engine("train.config")
    base = state.RunSettings(run_name="x")
    assert speed.of(base) == speed.SpeedConfig()  # nothing connected: the plain path
    cfg = speed.SpeedConfig("fused", True, "merged", "pytorch")
    s = speed.apply(base, cfg)
    assert speed.of(s) == cfg and s.run_name == "x"
    assert speed.apply(base, None) is base
    for bad in (dict(optimizer_impl="apex"), dict(lora_math="fast"), dict(attention="fastest"), dict(channels_last="yes")):
        with pytest.raises(C.ConfigError, match=next(iter(bad))):
            speed.apply(base, speed.SpeedConfig(**bad))
