"""Per-family facts kept as data files keyed by ComfyUI's model config class (``lora_formats.json``,
``experts.json``): the entry of a model is the one of the nearest class in its model config's class hierarchy
that the file lists."""
from __future__ import annotations


def lookup(model, families: dict) -> tuple[str, dict] | None:
    """``(listed class name, entry)`` for ``model`` (a ModelPatcher or BaseModel) in ``families``, or None."""
    base = getattr(model, "model", model)
    for cls in type(base.model_config).__mro__:
        if cls.__name__ in families:
            return cls.__name__, families[cls.__name__]
    return None
