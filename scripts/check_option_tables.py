#!/usr/bin/env python3
"""Check the option -> test tables of docs/training.md and docs/data.md (issue #26):

1. every test a row names exists (``pytest --collect-only`` of the files the tables name);
2. every row has a test that killed a mutant in a stored mutation run (``scripts/mutation_results.json``, or a
   ``--tests`` run in ``scripts/mutation_targeted.json``), and its last column names that kill (not "—").

    .work/venv/bin/python scripts/check_option_tables.py          # exit 1 when a name is missing or a row has no kill

A row's test cells are backticked ``file.py::test_name`` (a bare ``test_name`` after it belongs to the same file),
or a bare ``file.py`` for a whole file. Not part of CI (it collects the named files: about a minute here)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("docs/training.md", "docs/data.md")
HEADER = "| option | test |"
REF = re.compile(r"`([^`]+)`")


def rows(doc: Path) -> list[tuple[str, list[tuple[str, str | None]], str]]:
    """(option, [(file, test name or None for the whole file)], last column) per row of the doc's option table."""
    out, inside = [], False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith(HEADER):
            inside = True
            continue
        if not inside:
            continue
        if not line.startswith("|"):
            inside = False
            continue
        if line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) < 4:
            raise SystemExit(f"{doc.name}: a table row without 4 columns: {line[:80]}")
        refs, current = [], None
        for ref in REF.findall(cells[1]):
            if "::" in ref:
                current, name = ref.split("::", 1)
                refs.append((current, name))
            elif ref.endswith(".py"):
                current = ref
                refs.append((ref, None))
            elif ref.startswith("test_") and current:
                refs.append((current, ref))
        out.append((cells[0], refs, cells[-1]))
    return out


def collected(files: set[str]) -> set[tuple[str, str]]:
    env = dict(os.environ, COMFYUI_PATH=os.environ.get("COMFYUI_PATH", str(ROOT / ".work" / "ComfyUI")))
    paths = [f"tests/{f}" for f in sorted(files) if (ROOT / "tests" / f).exists()]
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *paths],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    got = set()
    for line in res.stdout.splitlines():
        if "::" in line:
            path, _, name = line.partition("::")
            got.add((Path(path).name, name.split("[")[0].split("::")[-1]))
    if not got:
        raise SystemExit(f"pytest collected nothing:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return got


def killers() -> set[str]:
    names = set()
    for src in ("mutation_results.json", "mutation_targeted.json"):
        p = ROOT / "scripts" / src
        if not p.exists():
            continue
        data = json.loads(p.read_text())
        runs = data.values() if isinstance(data, dict) else data
        for run in runs:
            for m in run["mutants"]:
                if m["status"] in ("killed", "timeout", "crashed") and m.get("killer"):
                    names.add(m["killer"].split("[")[0])
    return names


def main() -> int:
    table = {doc: rows(ROOT / doc) for doc in DOCS}
    files = {f for rs in table.values() for _, refs, _ in rs for f, _ in refs}
    have = collected(files)
    have_files = {f for f, _ in have}
    kills = killers()
    missing, unkilled, n = [], [], 0
    for doc, rs in table.items():
        for option, refs, last in rs:
            n += 1
            if not refs:
                missing.append(f"{doc}: '{option}' names no test")
            for f, name in refs:
                if (name is None and f not in have_files) or (name is not None and (f, name) not in have):
                    missing.append(f"{doc}: '{option}': {f}{'::' + name if name else ''} not collected")
            named = {name for _, name in refs if name} | {t for f, t in have for g, name in refs if name is None and g == f}
            if not (named & kills) or last.startswith("—"):
                unkilled.append(f"{doc}: '{option}'" + (" (last column: —)" if last.startswith("—") else
                                                        " (none of its tests killed a stored mutant)"))
    print(f"{n} rows, {sum(len(r) for rs in table.values() for _, r, _ in rs)} test references checked")
    for line in missing:
        print("MISSING  " + line)
    for line in unkilled:
        print("NO KILL  " + line)
    return 1 if missing or unkilled else 0


if __name__ == "__main__":
    sys.exit(main())
