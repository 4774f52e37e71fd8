"""The real ComfyUI server (``main.py``) as a child process: aligned_trainer/headless/server.py, shared with
the headless command and scripts/demo.py."""
from __future__ import annotations

from .headless import module

_m = module("server")
ComfyServer = _m.ComfyServer
HTTPStatusError = _m.HTTPStatusError
free_port = _m.free_port
write_extra_model_paths = _m.write_extra_model_paths
