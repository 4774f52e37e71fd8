"""The shipped family workflows (train_lora_sd15 / _sdxl / _sd35 / _flux1 / _wan / _wan22 ...) run to completion on
tiny generated models, queued from the real frontend in ``tests/test_browser.py`` and checked by
``support.workflow_checks``. What is changed in each shipped workflow (loaders and sizes, nothing else) is
documented in ``support.tiny_workflows``; the guard here checks that it is exactly that, and that each shipped
family workflow validates against the server's node definitions.
"""
from __future__ import annotations

from support.paths import REPO
from support.tiny_workflows import FAMILIES, shrink_for, tiny_prompt
from support.workflow import load, ui_to_api, validate


def test_substitutions_touch_only_loaders_and_sizes(comfy):
    """Guard on the test itself: what tiny_prompt changes is exactly the loaders and the SHRINK inputs (and each
    shipped family workflow validates against the node definitions)."""
    from support.workflow import object_info_inprocess

    info = object_info_inprocess(comfy.nodes)
    for name, (_, loaders) in FAMILIES.items():
        wf = load(REPO / "workflows" / f"{name}.json")
        assert validate(wf, info) == [], name
        api = ui_to_api(wf, info)
        tiny = tiny_prompt(api, name)
        assert tiny.keys() == api.keys()
        assert {n["class_type"] for n in api.values()} >= set(loaders), name
        for nid, node in api.items():
            new = tiny[nid]
            if node["class_type"] in loaders:
                continue
            assert new["class_type"] == node["class_type"]
            changed = {k for k in node["inputs"] if new["inputs"][k] != node["inputs"][k]}
            assert new["inputs"].keys() == node["inputs"].keys() and changed <= set(shrink_for(name).get(node["class_type"], {}))
        # links out of the substituted loaders are untouched (same node ids, same output slots)
        assert [v for n in tiny.values() for v in n["inputs"].values() if isinstance(v, list)] == \
               [v for n in api.values() for v in n["inputs"].values() if isinstance(v, list)]
