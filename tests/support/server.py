"""Start the real ComfyUI server (``main.py``) with this pack on a free loopback port, talk to its HTTP
API, and always stop it."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from .paths import comfyui_path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_extra_model_paths(path: Path, folders: dict[str, Path]) -> Path:
    """An extra_model_paths.yaml that adds our folders first (``is_default``: Save LoRA writes there)."""
    lines = ["aligned_trainer_tests:", "    is_default: true"]
    for kind, folder in folders.items():
        lines.append(f"    {kind}: {folder}")
    path.write_text("\n".join(lines) + "\n")
    return path


class ComfyServer:
    """A ComfyUI ``main.py`` process on 127.0.0.1. Use as a context manager."""

    def __init__(self, base: Path, model_folders: dict[str, Path] | None = None, port: int | None = None,
                 extra_args: list[str] | None = None, log_name: str = "comfyui-server.log",
                 env: dict[str, str] | None = None):
        self.base = Path(base)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output_dir = self.base / "output"
        self.temp_dir = self.base / "temp"
        self.input_dir = self.base / "input"
        self.user_dir = self.base / "user"
        self.model_folders = model_folders or {}
        self.extra_args = extra_args or []
        self.extra_env = env or {}
        self.log_path = self.base / log_name
        self.proc: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> "ComfyServer":
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> "ComfyServer":
        """Start the process and return at once (``wait_ready`` before talking to it): a server that boots
        while other tests run."""
        root = comfyui_path()
        for d in (self.output_dir, self.temp_dir, self.input_dir, self.user_dir):
            d.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(root / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--output-directory", str(self.output_dir), "--temp-directory", str(self.temp_dir),
               "--input-directory", str(self.input_dir), "--user-directory", str(self.user_dir),
               "--disable-auto-launch", "--disable-api-nodes", *self.extra_args]
        if self.model_folders:
            cfg = write_extra_model_paths(self.base / "extra_model_paths.yaml", self.model_folders)
            cmd += ["--extra-model-paths-config", str(cfg)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.extra_env)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=str(root), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 180.0) -> "ComfyServer":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer on {self.url} within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        self.proc = None
        self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, n: int = 8000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    # -- HTTP API --------------------------------------------------------------------------------
    def get(self, route: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + route, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, route: str, payload: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + route, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            body = e.read().decode("utf-8", "replace")
            raise RuntimeError(f"POST {route} -> {e.code}: {body}") from None

    def queue(self, prompt: dict) -> str:
        """Submit an API-format workflow to /prompt; returns the prompt id."""
        return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """Wait for a prompt to finish; return its /history entry (raises on error or timeout)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist:
                entry = hist[prompt_id]
                status = entry.get("status", {})
                if status.get("completed") or status.get("status_str") in ("success", "error"):
                    return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue and wait; raise with ComfyUI's own error message if execution failed."""
        entry = self.wait(self.queue(prompt), timeout)
        status = entry.get("status", {})
        if status.get("status_str") != "success":
            msgs = [m for m in status.get("messages", []) if m[0] == "execution_error"]
            raise RuntimeError(f"workflow failed: {json.dumps(msgs, indent=1)[:6000]}\n{self.log_tail(3000)}")
        return entry

    def interrupt(self) -> None:
        self.post("/interrupt", {})
