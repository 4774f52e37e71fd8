"""Start the real ComfyUI server (``main.py``) with this pack on a free loopback port, talk to its HTTP
API and websocket, and always stop it. Standard library only (the websocket uses aiohttp, which ComfyUI
itself requires); nothing here imports ComfyUI: the server is a child process. Used by the headless command
(``aligned_trainer.cli``), scripts/demo.py and the tests."""
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


REPO = Path(__file__).resolve().parents[2]


def comfyui_path(explicit: str | Path | None = None) -> Path:
    """The ComfyUI to run: ``explicit``, else $COMFYUI_PATH (scripts/setup.py exports it), else the ComfyUI
    whose custom_nodes folder holds this pack, else the bundled copy in .work/ComfyUI."""
    if explicit:
        candidates = [("--comfyui", Path(explicit))]
    elif os.environ.get("COMFYUI_PATH"):
        candidates = [("COMFYUI_PATH", Path(os.environ["COMFYUI_PATH"]))]
    else:
        here = Path(__file__).absolute().parents[2]  # not resolved: a clone inside custom_nodes/
        candidates = [("the ComfyUI around this pack", here.parent.parent)] if here.parent.name == "custom_nodes" \
            else []
        candidates.append(("the bundled ComfyUI", REPO / ".work" / "ComfyUI"))
    for origin, path in candidates:
        if (path / "main.py").is_file():
            return path.resolve()
    origin, path = candidates[-1]
    raise FileNotFoundError(f"{origin} '{path}' has no main.py: pass --comfyui /path/to/ComfyUI (the folder "
                            "with main.py), or run `python3 scripts/setup.py` to get the bundled one.")


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


class HTTPStatusError(RuntimeError):
    """A non-2xx answer; ``body`` is the server's text (ComfyUI answers /prompt errors in JSON)."""

    def __init__(self, route: str, code: int, body: str):
        super().__init__(f"POST {route} -> {code}: {body}")
        self.route, self.code, self.body = route, code, body


class ComfyServer:
    """A ComfyUI ``main.py`` process on 127.0.0.1. Use as a context manager.

    ``base`` holds its output/temp/input/user folders (the tests' layout); ``dirs`` sets any of them
    (``output``, ``temp``, ``input``, ``user``) one by one instead. ``cpu`` passes ``--cpu``."""

    def __init__(self, base: Path | None = None, model_folders: dict[str, Path] | None = None, port: int | None = None,
                 extra_args: list[str] | None = None, log_name: str = "comfyui-server.log",
                 env: dict[str, str] | None = None, comfyui: Path | None = None, cpu: bool = True,
                 dirs: dict[str, Path] | None = None, log_path: Path | None = None):
        self.comfyui = Path(comfyui) if comfyui else comfyui_path()
        self.base = Path(base) if base is not None else self.comfyui
        dirs = dirs or {}
        self.output_dir = Path(dirs.get("output") or self.base / "output")
        self.temp_dir = Path(dirs.get("temp") or self.base / "temp")
        self.input_dir = Path(dirs.get("input") or self.base / "input")
        self.user_dir = Path(dirs.get("user") or self.base / "user")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cpu = cpu
        self.model_folders = model_folders or {}
        self.extra_args = extra_args or []
        self.extra_env = env or {}
        self.log_path = Path(log_path) if log_path else self.base / log_name
        self.proc: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex

    @classmethod
    def remote(cls, url: str, output_dir: Path | None = None) -> "ComfyServer":
        """A ComfyUI someone else started (no process of ours; ``stop`` leaves it running)."""
        self = cls.__new__(cls)
        self.url = url.rstrip("/")
        self.port = None
        self.comfyui = None
        self.output_dir = Path(output_dir) if output_dir else None
        self.log_path = f"(the log of the server at {self.url})"
        self.proc = None
        self.client_id = uuid.uuid4().hex
        return self

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        try:
            self.get("/system_stats", timeout=2)
            return True
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> "ComfyServer":
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> "ComfyServer":
        """Start the process and return at once (``wait_ready`` before talking to it): a server that boots
        while other tests run."""
        root = self.comfyui
        for d in (self.output_dir, self.temp_dir, self.input_dir, self.user_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(root / "main.py"), *(["--cpu"] if self.cpu else []),
               "--listen", "127.0.0.1", "--port", str(self.port),
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
                time.sleep(0.1)
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
        if self.proc is None and self.port is None:
            return ""
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
            raise HTTPStatusError(route, e.code, e.read().decode("utf-8", "replace")) from None

    def queue(self, prompt: dict, targets: list[str] | None = None) -> str:
        """Submit an API-format workflow to /prompt; returns the prompt id. ``targets``: run only these output
        nodes and what they need (ComfyUI's ``partial_execution_targets``)."""
        body = {"prompt": prompt, "client_id": self.client_id}
        if targets:
            body["partial_execution_targets"] = list(targets)
        return self.post("/prompt", body)["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """Wait for a prompt to finish; return its /history entry (raises on error or timeout)."""
        deadline = time.time() + timeout
        pause = 0.02  # quick prompts (a refused input, a cached graph) finish in milliseconds: poll fast, then back off
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist:
                entry = hist[prompt_id]
                status = entry.get("status", {})
                if status.get("completed") or status.get("status_str") in ("success", "error"):
                    return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(pause)
            pause = min(0.5, pause * 2)
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
