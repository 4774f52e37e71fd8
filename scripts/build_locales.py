#!/usr/bin/env python3
"""Regenerate locales/en/nodeDefs.json (display names and descriptions of the pack's nodes) from the live node
schemas. ComfyUI serves it through /i18n; the frontend names a running node by it ("Current node: Train Steps"
instead of the node id) where a workflow stores no title.

    .work/venv/bin/python scripts/build_locales.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
OUT = REPO / "locales" / "en" / "nodeDefs.json"


def node_defs(info: dict) -> dict:
    return {name: {"display_name": d["display_name"], "description": d.get("description", "")}
            for name, d in sorted(info.items()) if name.startswith("AlignedTrainer_")}


def render(info: dict) -> str:
    return json.dumps(node_defs(info), indent=1, ensure_ascii=False) + "\n"


def main() -> int:
    from support.boot import boot
    from support.workflow import object_info_inprocess

    c = boot()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render(object_info_inprocess(c.nodes)), encoding="utf-8")
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
