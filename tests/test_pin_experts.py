"""Noise-level experts and per-family facts pinned (issue #26), on ComfyUI's own Wan model config classes (tiny
Wan 2.1 DiT, no weights loaded): ``model_facts.lookup`` takes the nearest listed class in the model config's class
hierarchy (a subclass that is not listed inherits its base's entry, a listed subclass keeps its own);
``experts.resolve`` replaces expert_boundary 0 by the official boundary read from experts.json and keeps a value
set by hand; ``experts.note`` states the window and its share of the timesteps before the shift, computed here by
inverting ComfyUI's flow shift ``sigma = s t / (1 + (s - 1) t)``."""
from __future__ import annotations

import json

import pytest

from support.factories import wan, wan22


@pytest.fixture(scope="module")
def X(comfy):
    import comfy.model_patcher as model_patcher
    import comfy.supported_models as sm

    class NS:
        C = comfy.engine("train.config")
        experts = comfy.engine("train.experts")
        facts = comfy.engine("train.model_facts")
        listed = json.loads(experts.FACTS.read_text())["families"]

        @staticmethod
        def model(cls, dit=wan.WAN21_DIT):
            base = cls(dict(dit)).get_model({}, "", device="cpu")
            return model_patcher.ModelPatcher(base, load_device="cpu", offload_device="cpu")
    NS.sm = sm
    return NS


def test_nearest_listed_config_class(X):
    variant = type("MyWanVariant", (X.sm.WAN21_T2V,), {})  # a custom node's config class built on Wan 2.1 T2V
    t2v, sub = X.model(X.sm.WAN21_T2V), X.model(variant)
    ti2v = X.model(X.sm.WAN22_T2V, wan22.WAN22_5B_DIT)  # listed itself (no experts), a subclass of WAN21_T2V
    assert X.facts.lookup(t2v, X.listed) == ("WAN21_T2V", X.listed["WAN21_T2V"])
    assert X.facts.lookup(t2v.model, X.listed) == ("WAN21_T2V", X.listed["WAN21_T2V"])  # a BaseModel as well
    assert X.facts.lookup(sub, X.listed) == ("WAN21_T2V", X.listed["WAN21_T2V"])
    assert X.facts.lookup(ti2v, X.listed) == ("WAN22_T2V", X.listed["WAN22_T2V"])
    assert X.facts.lookup(t2v, {}) is None
    f = X.experts.facts(sub)
    assert (f["config_class"], f["model_class"], f["boundary"]) == ("WAN21_T2V", "MyWanVariant",
                                                                     X.listed["WAN21_T2V"]["boundary"])
    assert X.experts.facts(ti2v)["boundary"] is None and X.experts.facts(ti2v)["config_class"] == "WAN22_T2V"


def _share_before_shift(boundary: float, shift: float) -> float:
    """The t in [0, 1] whose shifted sigma is the boundary."""
    return boundary / (shift - (shift - 1) * boundary)


def test_resolve_and_note_against_the_shift_inverted_by_hand(X, sd15):
    C, experts = X.C, X.experts
    t2v = X.model(X.sm.WAN21_T2V)
    b = X.listed["WAN21_T2V"]["boundary"]
    shift = float(t2v.get_model_object("model_sampling").shift)
    t = _share_before_shift(b, shift)
    for expert, side, share in (("high_noise", ">= ", 1 - t), ("low_noise", "< ", t)):
        cfg = experts.resolve(C.TimestepConfig(shift="model", expert=expert), t2v)
        assert cfg.expert_boundary == b and cfg.expert == expert
        text = experts.note(cfg, t2v)
        assert text == (f"expert {expert}: trains sigma {side}{b:g} (the official boundary of WAN21_T2V "
                        f"({X.listed['WAN21_T2V']['models']})), {share:.1%} of the timesteps before the shift, at "
                        f"the model's shift {shift:g}"), text
    fixed = experts.resolve(C.TimestepConfig(shift="fixed", shift_value=3.0, expert="high_noise"), t2v)
    assert experts.note(fixed, t2v).endswith(f"), {1 - _share_before_shift(b, 3.0):.1%} of the timesteps before the "
                                             "shift, at shift fixed")
    hand = experts.resolve(C.TimestepConfig(shift="model", expert="low_noise", expert_boundary=0.8), t2v)
    assert hand.expert_boundary == 0.8
    assert "trains sigma < 0.8 (set by hand), " + f"{_share_before_shift(0.8, shift):.1%}" in experts.note(hand, t2v)
    none = C.TimestepConfig(shift="model")
    assert experts.resolve(none, t2v) is none and experts.note(none, t2v) == ""
    ti2v = X.model(X.sm.WAN22_T2V, wan22.WAN22_5B_DIT)
    with pytest.raises(C.ConfigError, match=r"\(WAN22_T2V \(Wan 2\.2 TI2V 5B.*\) has no official expert boundary in "
                                            r"experts\.json; set expert to none, or set expert_boundary by hand"):
        experts.resolve(C.TimestepConfig(shift="model", expert="high_noise"), ti2v)
    assert experts.resolve(C.TimestepConfig(expert="high_noise", expert_boundary=0.7), ti2v).expert_boundary == 0.7
    with pytest.raises(C.ConfigError, match=r"\(SD15\) is not a flow model: set expert to none"):
        experts.resolve(C.TimestepConfig(expert="high_noise", expert_boundary=0.7), sd15[0])
