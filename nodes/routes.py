"""The pack's small HTTP routes for the frontend (js/aligned_trainer.js), on ComfyUI's own server:

- ``GET  /aligned_trainer/datasets``: the folders in ComfyUI's input folder (dataset picker);
- ``GET  /aligned_trainer/dataset?folder=NAME&resolution=..``: what a dataset folder holds (images, captions,
  buckets, a preview strip) before anything runs;
- ``POST /aligned_trainer/validate`` ``{"prompt": {...}}``: ComfyUI's own prompt validation, so that the
  frontend can refuse to queue a training graph with a missing model instead of letting ComfyUI run the part
  of the graph that needs none.

Dataset names are confined to ComfyUI's input folder: relative names only, no ``..``, resolved with
folder_paths."""
from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..aligned_trainer import paths
from ..aligned_trainer.data.buckets import BucketConfig
from ..aligned_trainer.data.summary import folder_summary

BASE = "/aligned_trainer"
_registered = False


class BadName(ValueError):
    pass


def input_folder(name: str) -> Path:
    """``name`` (a folder relative to ComfyUI's input folder) as an absolute path inside it, through the same
    path guard as the Dataset node (aligned_trainer.paths), so a link out of the folder is refused alike."""
    name = (name or "").strip()
    if not name:
        raise BadName("no folder given: name a folder inside ComfyUI's input folder")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        raise BadName(f"folder {name!r} is absolute: give a name relative to ComfyUI's input folder")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise BadName(f"folder {name!r} contains '..': give a name inside ComfyUI's input folder")
    try:
        return paths.confine(name, paths.dataset_roots())
    except paths.PathRefused as e:
        raise BadName(str(e)) from None


def _int(q, key: str, default: int) -> int:
    try:
        return int(q.get(key, default))
    except (TypeError, ValueError):
        raise BadName(f"{key}={q.get(key)!r} is not a whole number") from None


def register() -> None:
    """Add the routes to ComfyUI's server (once; no-op without a running server, e.g. in-process tests)."""
    global _registered
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:  # pragma: no cover - ComfyUI always has both
        return
    srv = getattr(PromptServer, "instance", None)
    if srv is None or _registered:
        return
    _registered = True
    routes = srv.routes

    @routes.get(BASE + "/datasets")
    async def datasets(request):
        import folder_paths

        root = Path(folder_paths.get_input_directory())
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
        return web.json_response({"folders": names})

    @routes.get(BASE + "/dataset")
    async def dataset(request):
        q = request.rel_url.query
        try:
            folder = input_folder(q.get("folder", ""))
            res = _int(q, "resolution", 512)
            cfg = BucketConfig(res, _int(q, "min_side", 256), max(_int(q, "max_side", 1024), res),
                               _int(q, "bucket_step", 64))
            cfg.validate()
            out = folder_summary(folder, cfg, roots=paths.dataset_roots())
        except ValueError as e:  # a bad name, a missing folder (DataError), bad bucket widgets
            return web.json_response({"error": str(e)}, status=400)
        out["folder"] = q.get("folder", "").strip()
        return web.json_response(out)

    @routes.post(BASE + "/validate")
    async def validate(request):
        import execution

        try:
            prompt = (await request.json())["prompt"]
        except Exception:
            return web.json_response({"error": "send JSON {\"prompt\": {...}} (ComfyUI's API format)"}, status=400)
        try:
            valid = await execution.validate_prompt("aligned_trainer-check", prompt, None)
        except Exception as e:
            logging.debug("aligned_trainer: validation failed", exc_info=True)
            return web.json_response({"error": str(e)}, status=400)
        return web.json_response({"ok": bool(valid[0]) and not valid[3], "error": valid[1],
                                  "node_errors": valid[3]})
