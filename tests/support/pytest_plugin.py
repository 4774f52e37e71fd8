"""pytest plugin (loaded with ``-p support.pytest_plugin``): the repo root is a ComfyUI custom-node
package (its ``__init__.py`` imports ComfyUI's node API), so pytest must not import it as a test
package. ComfyUI's own loader imports it in the ``comfy`` fixture instead."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def pytest_collect_directory(path: Path, parent):
    if Path(path).resolve() == REPO:
        return pytest.Dir.from_parent(parent, path=path)
    return None
