"""The pack's headless package (``aligned_trainer/headless``: standard library only, imports no ComfyUI)
imported by file path, so the repository root never goes on ``sys.path`` (its ``nodes/`` would shadow
ComfyUI's ``nodes`` module). The same code serves ``python -m aligned_trainer.cli``, scripts/demo.py and
the tests."""
from __future__ import annotations

import importlib
import importlib.util
import sys

from .paths import REPO


def module(name: str):
    """``aligned_trainer.headless.<name>`` (or ``aligned_trainer.<name>`` for ``cli``)."""
    if "aligned_trainer" not in sys.modules:
        pkg = REPO / "aligned_trainer"
        spec = importlib.util.spec_from_file_location("aligned_trainer", pkg / "__init__.py",
                                                      submodule_search_locations=[str(pkg)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["aligned_trainer"] = mod
        spec.loader.exec_module(mod)
    return importlib.import_module("aligned_trainer." + (name if name == "cli" else f"headless.{name}"))
