"""Noise-level experts (Wan 2.2 A14B): where a model's schedule is split between its high-noise and low-noise
transformer.

The official boundary of each model is data (``experts.json``, keyed by ComfyUI's model config class like
``lora_formats.json``). Train Init calls :func:`resolve` once: Timestep Strategy's ``expert_boundary = 0`` becomes
the loaded model's official boundary, a value set by hand is kept. The window itself (every drawn sigma on the
chosen expert's side of the boundary, on the model's own shifted schedule) is ``timesteps.expert_u``."""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

from . import model_facts
from .config import ConfigError, TimestepConfig
from .timesteps import boundary_u, is_flow, sigmas_for

FACTS = Path(__file__).with_name("experts.json")


@functools.lru_cache(maxsize=1)
def _families() -> dict:
    return json.loads(FACTS.read_text())["families"]


def facts(model) -> dict:
    """The experts.json entry of ``model`` (a ModelPatcher or BaseModel), from the nearest class in its model
    config's class hierarchy that the file lists, with ``config_class`` (the listed class) and ``model_class``
    (the model's own); without an entry ``boundary`` is None."""
    own = type(getattr(model, "model", model).model_config).__name__
    found = model_facts.lookup(model, _families())
    if found:
        return {"config_class": found[0], "model_class": own, **found[1]}
    return {"config_class": None, "model_class": own, "boundary": None}


def resolve(cfg: TimestepConfig, model) -> TimestepConfig:
    """``cfg`` with the boundary its ``expert`` trains against: the model's official one when ``expert_boundary``
    is 0, else the value given. Raises ConfigError, naming the model's config, for an expert on a model that is
    not a flow model or has no official boundary (and none was given)."""
    if cfg.expert == "none":
        return cfg
    f = facts(model)
    patcher_ms = getattr(model, "get_model_object", None)
    ms = patcher_ms("model_sampling") if patcher_ms else getattr(model, "model_sampling", None)
    if ms is not None and not is_flow(ms):
        raise ConfigError(f"expert '{cfg.expert}' splits a flow model's schedule (Wan 2.2 A14B); this model "
                          f"({f['model_class']}) is not a flow model: set expert to none")
    if cfg.expert_boundary > 0:
        return cfg
    if f["boundary"] is None:
        why = f" ({f['models']})" if f.get("models") else ""
        raise ConfigError(f"expert '{cfg.expert}': this model ({f['model_class']}{why}) has no official expert "
                          f"boundary in {FACTS.name}; set expert to none, or set expert_boundary by hand "
                          "(Wan 2.2 A14B: 0.875 T2V, 0.9 I2V)")
    return dataclasses.replace(cfg, expert_boundary=float(f["boundary"]))


def note(cfg: TimestepConfig, model) -> str:
    """One line for Train Init's text: the expert's window on this model's schedule, and where its boundary
    came from (``""`` without an expert). ``cfg`` is resolved (:func:`resolve`)."""
    if cfg.expert == "none":
        return ""
    ms = model.get_model_object("model_sampling")
    whole = dataclasses.replace(cfg, expert="none")
    b = boundary_u(lambda x: sigmas_for(whole, ms, x, None), cfg.expert_boundary)
    f = facts(model)
    official = f["boundary"] is not None and abs(f["boundary"] - cfg.expert_boundary) < 1e-9
    where = (f"the official boundary of {f['config_class']} ({f.get('models', '')})" if official
             else "set by hand")
    side, share = ("sigma >= ", 1.0 - b) if cfg.expert == "high_noise" else ("sigma < ", b)
    shift = (f"the model's shift {float(ms.shift):g}" if cfg.shift == "model" and hasattr(ms, "shift")
             else f"shift {cfg.shift}")
    return (f"expert {cfg.expert}: trains {side}{cfg.expert_boundary:g} ({where}), {share:.1%} of the timesteps "
            f"before the shift, at {shift}")
