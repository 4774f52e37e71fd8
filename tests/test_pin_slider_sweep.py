"""sampling/slider_sweep.py pinned (issue #26): the strengths a Slider Sweep reads from its text box. Commas or
semicolons, blanks and empty entries skipped (not a stop), finite values within -100..100 (the edges allowed),
1 to 16 strengths; each refusal names the bad entry. The sweep's grid itself is compared with the stock LoRA
loader in test_sliders.py::test_sweep_grid_columns_are_the_lora_at_each_strength."""
from __future__ import annotations

import pytest


@pytest.fixture
def S(comfy):
    return comfy.engine("sampling.slider_sweep")


def test_strengths_parsed_in_order(S):
    assert S.parse_strengths("-2, -1, 0, 1, 2") == [-2.0, -1.0, 0.0, 1.0, 2.0]
    assert S.parse_strengths("0.5;-1.5") == [0.5, -1.5]
    assert S.parse_strengths(" , 1, ,  2 ,") == [1.0, 2.0]  # empty entries are skipped, the rest still read
    assert S.parse_strengths("100, -100") == [100.0, -100.0]  # the edges are allowed
    assert S.parse_strengths(", ".join(str(i) for i in range(16))) == [float(i) for i in range(16)]


@pytest.mark.parametrize("text, match", [
    ("1, abc, 2", r"'abc' is not a number"),
    ("1, 100.5", r"'100.5' must be a finite number between -100 and 100"),
    ("-101", r"'-101' must be a finite number"),
    ("nan", r"'nan' must be a finite number"),
    ("1, inf", r"'inf' must be a finite number"),
    ("", r"give 1 to 16 LoRA strengths separated by commas \(got 0\)"),
    (" , ;", r"\(got 0\)"),
    (", ".join("1" * 17), r"give 1 to 16 LoRA strengths separated by commas \(got 17\)"),
])
def test_bad_strengths_refused_by_name(S, text, match):
    with pytest.raises(ValueError, match=match):
        S.parse_strengths(text)
