"""The pack loads in a real ComfyUI through ComfyUI's own loader; layout rules; setup errors."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from support.paths import REPO

PREFIX = "AlignedTrainer_"


def test_pack_loaded_through_comfyui_loader(comfy):
    assert comfy.pack_node_ids, "the pack registered no nodes"
    for nid in comfy.pack_node_ids:
        assert nid.startswith(PREFIX), nid
        cls = comfy.node(nid)
        assert cls.RELATIVE_PYTHON_MODULE.startswith("custom_nodes."), nid


def test_layout_and_v3_entrypoint():
    for name in ("__init__.py", "nodes", "aligned_trainer", "te_specs", "js", "workflows", "tests",
                 "pyproject.toml", "requirements.txt", "README.md", ".ci/run"):
        assert (REPO / name).exists(), f"missing {name}"
    tree = ast.parse((REPO / "__init__.py").read_text())
    names = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert "NODE_CLASS_MAPPINGS" not in names, "V1 mappings make ComfyUI skip comfy_entrypoint"
    assert "WEB_DIRECTORY" in names
    assert any(isinstance(n, ast.AsyncFunctionDef) and n.name == "comfy_entrypoint" for n in tree.body)


def _imports(path: Path) -> set[str]:
    mods = set()
    for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(n, ast.Import):
            mods.update(a.name.split(".")[0] for a in n.names)
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            mods.add(n.module.split(".")[0])
    return mods


def test_engine_does_not_import_node_api_or_server():
    files = sorted((REPO / "aligned_trainer").rglob("*.py"))
    assert files
    for f in files:
        bad = _imports(f) & {"comfy_api", "server", "nodes", "execution", "comfy_execution"}
        assert not bad, f"{f.relative_to(REPO)} imports {bad}: the engine must stay free of the node API/server"


def test_nodes_hold_no_engine_logic():
    """Node modules declare schemas and call the engine; a node module over 400 lines is a smell."""
    for f in sorted((REPO / "nodes").glob("*.py")):
        lines = f.read_text(encoding="utf-8").count("\n")
        assert lines < 400, f"{f.name} has {lines} lines; move logic into aligned_trainer/"


def _setup(env_path: str) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, COMFYUI_PATH=env_path)
    return subprocess.run([sys.executable, str(REPO / "scripts" / "setup.py")], env=env, capture_output=True,
                          text=True, timeout=60)


def test_setup_rejects_a_path_that_is_not_comfyui(tmp_path):
    (tmp_path / "main.py").write_text("print('hello')\n")
    r = _setup(str(tmp_path))
    assert r.returncode == 2
    assert "is not a ComfyUI folder" in r.stderr and "nodes.py" in r.stderr and str(tmp_path) in r.stderr
    r = _setup(str(tmp_path / "missing"))
    assert r.returncode == 2 and "is not a directory" in r.stderr


def test_setup_rejects_unsupported_comfyui_version(tmp_path):
    for name in ("main.py", "nodes.py", "requirements.txt"):
        (tmp_path / name).write_text("")
    (tmp_path / "comfy").mkdir()
    (tmp_path / "comfyui_version.py").write_text('__version__ = "0.2.7"\n')
    r = _setup(str(tmp_path))
    assert r.returncode == 2
    assert "ComfyUI 0.2.7" in r.stderr and ">= 0.3.75" in r.stderr


def test_project_processes_cache_their_bytecode_under_work(tmp_path):
    """scripts/test.py and scripts/demo.py start Python (pytest, every ComfyUI server and worker they start) with
    bytecode written to .work/pycache even where PYTHONDONTWRITEBYTECODE is set: a module imported in such a child
    leaves its compiled file there, and a second child reads it instead of compiling again."""
    import os

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import setup as project_setup
    finally:
        sys.path.remove(str(REPO / "scripts"))
    env = project_setup.bytecode_env(dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(tmp_path)))
    assert "PYTHONDONTWRITEBYTECODE" not in env and env["PYTHONPYCACHEPREFIX"] == str(REPO / ".work" / "pycache")
    (tmp_path / "at_bytecode_probe.py").write_text("X = 1\n")
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path / "pycache")  # (the same mechanism, in a folder of this test)
    for _ in range(2):
        subprocess.run([sys.executable, "-c", "import at_bytecode_probe"], env=env, check=True, timeout=60)
    assert list((tmp_path / "pycache").rglob("at_bytecode_probe.*.pyc"))


@pytest.mark.server
def test_server_lists_every_pack_node_with_tooltips(server, comfy):
    info = server.get("/object_info")
    missing = [n for n in comfy.pack_node_ids if n not in info]
    assert not missing, f"not in /object_info: {missing}"
    untipped = []
    for nid in comfy.pack_node_ids:
        for section in ("required", "optional"):
            for name, spec in info[nid]["input"].get(section, {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if not opts.get("tooltip"):
                    untipped.append(f"{nid}.{name}")
    assert not untipped, f"inputs without a tooltip: {untipped}"
