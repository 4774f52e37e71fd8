"""Run one API prompt on a ComfyUI server and follow it over the websocket: the node that runs, progress and
loss (rendered by :class:`progress.Terminal`), the first error with the node it happened in, and at the end
the files it wrote (LoRA files reported by Save LoRA, images saved to the output folder).

The prompt runs in ComfyUI's own executor (``main.py``'s prompt worker), exactly as a prompt queued from the
browser; this module only talks HTTP and websocket."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import workflow as wf
from .progress import Terminal
from .server import ComfyServer, HTTPStatusError


class RunFailed(RuntimeError):
    """The prompt was refused or failed; the message names the node and ComfyUI's own message."""


@dataclass
class Result:
    prompt_id: str
    entry: dict
    seconds: float
    loras: list[str] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)


def prepare(server: ComfyServer, data: dict, sets: list[str]) -> tuple[dict, dict, dict[str, str]]:
    """(API prompt with ``sets`` applied, /object_info, node id -> label) for a workflow in either format."""
    info = server.get("/object_info", timeout=120)
    prompt = wf.apply_sets(wf.to_prompt(data, info), info, sets)
    labels = {nid: wf.node_label(nid, node, info) for nid, node in prompt.items()}
    return prompt, info, labels


def _refusal(body: str, labels: dict[str, str]) -> str:
    """ComfyUI's answer to an invalid prompt (POST /prompt 400), one line per problem."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return f"ComfyUI refused the workflow: {body[:2000]}"
    err = data.get("error") or {}
    lines = [f"ComfyUI refused the workflow: {err.get('message', 'invalid prompt')}"
             + (f" ({err['details']})" if err.get("details") else "")]
    for nid, ne in (data.get("node_errors") or {}).items():
        for e in ne.get("errors", []):
            detail = f": {e['details']}" if e.get("details") else ""
            lines.append(f"  node {labels.get(nid, nid)}: {e.get('message', '')}{detail}")
    return "\n".join(lines)


def _failure(d: dict, labels: dict[str, str]) -> str:
    nid = str(d.get("node_id"))
    kind = str(d.get("exception_type") or "error").rsplit(".", 1)[-1]  # the pack's errors carry its module path
    return f"node {labels.get(nid, nid)} failed: {kind}: {str(d.get('exception_message', '')).strip()}"


def files_written(entry: dict, output_dir: Path | None) -> tuple[list[str], list[Path]]:
    """(LoRA files Save LoRA reports, images saved to the output folder) of a /history entry."""
    loras, images = [], []
    for out in entry.get("outputs", {}).values():
        for img in out.get("images", []):
            if img.get("type") == "output":
                base = Path(output_dir) if output_dir else Path("output")
                images.append(base / img.get("subfolder", "") / img["filename"])
        for text in out.get("text", []):
            try:
                report = json.loads(text)
            except (TypeError, json.JSONDecodeError):
                continue
            if isinstance(report, dict) and str(report.get("path", "")).endswith(".safetensors"):
                loras.append(report["path"])
    return loras, images


async def _follow(server: ComfyServer, prompt: dict, term: Terminal | None, labels: dict[str, str],
                  timeout: float | None, targets: list[str] | None) -> str:
    import aiohttp  # ComfyUI's own requirement

    ws_url = server.url.replace("http", "ws", 1) + f"/ws?clientId={server.client_id}"
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        try:
            pid = server.queue(prompt, targets)
        except HTTPStatusError as e:
            raise RunFailed(_refusal(e.body, labels)) from None
        deadline = None if not timeout else time.monotonic() + timeout
        while True:
            try:
                msg = await asyncio.wait_for(ws.receive(), 1.0)
            except asyncio.TimeoutError:
                if server.proc is not None and server.proc.poll() is not None:
                    raise RunFailed(f"ComfyUI exited (code {server.proc.returncode}) while running the "
                                    f"workflow; its log: {server.log_path}\n{server.log_tail(3000)}") from None
                if deadline is not None and time.monotonic() > deadline:
                    server.interrupt()
                    raise RunFailed(f"the workflow did not finish within {timeout:g} s; interrupted") from None
                continue
            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.ERROR):
                raise RunFailed(f"lost the connection to ComfyUI at {server.url}; its log: {server.log_path}")
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue  # binary preview frames
            event = json.loads(msg.data)
            kind, d = event.get("type"), event.get("data") or {}
            if kind == "aligned_trainer.loss":
                if term:
                    term.loss(d)
                continue
            if d.get("prompt_id") != pid:
                continue
            if kind == "executing" and d.get("node") is not None:
                if term:
                    term.executing(str(d["node"]))
            elif kind == "progress" and term:
                term.progress(str(d.get("node")), int(d.get("value", 0)), int(d.get("max", 1)))
            elif kind == "execution_error":
                raise RunFailed(_failure(d, labels))
            elif kind == "execution_interrupted":
                nid = str(d.get("node_id"))
                raise RunFailed(f"interrupted while node {labels.get(nid, nid)} ran")
            elif kind == "executing" and d.get("node") is None:  # sent once the history entry is written
                return pid


def run_prompt(server: ComfyServer, prompt: dict, labels: dict[str, str] | None = None, stream=None,
               timeout: float | None = None, targets: list[str] | None = None) -> Result:
    """Queue ``prompt`` and follow it to the end; raise RunFailed with a clear message if it fails. With
    ``stream`` (a text file) show node starts, progress bars and loss on it; with ``targets`` (output node ids)
    run only what they need."""
    labels = labels or {nid: f"{nid} ({n['class_type']})" for nid, n in prompt.items()}
    term = Terminal(labels, stream) if stream is not None else None
    t0 = time.monotonic()
    pid = asyncio.run(_follow(server, prompt, term, labels, timeout, targets))
    entry = {}
    for _ in range(50):
        entry = server.get(f"/history/{pid}").get(pid, {})
        if entry:
            break
        time.sleep(0.1)
    status = entry.get("status", {})
    if status.get("status_str") == "error":  # reported over the websocket first, normally
        errs = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
        raise RunFailed(_failure(errs[0], labels) if errs else f"the workflow failed: {status}")
    loras, images = files_written(entry, server.output_dir)
    return Result(pid, entry, time.monotonic() - t0, loras, images)
