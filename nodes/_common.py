"""Shared bits of the node layer: id prefix, categories, and the bridge from engine progress
callbacks to ComfyUI's progress bar, node text and websocket events."""
from __future__ import annotations

import logging

import comfy.utils

NODE_PREFIX = "AlignedTrainer_"
CATEGORY = "Aligned Trainer"
EVENT_PREFIX = "aligned_trainer."


def node_id(name: str) -> str:
    return NODE_PREFIX + name


def category(sub: str | None = None) -> str:
    return f"{CATEGORY}/{sub}" if sub else CATEGORY


def _server():
    try:
        from server import PromptServer
    except ImportError:  # pragma: no cover - ComfyUI always has it
        return None
    return getattr(PromptServer, "instance", None)


def send_event(event: str, data: dict) -> None:
    """Send a custom websocket event (``aligned_trainer.<event>``) to the frontend, if a server runs."""
    srv = _server()
    if srv is None:
        return
    try:
        srv.send_sync(EVENT_PREFIX + event, data)
    except Exception:  # a missing client must never break a training run
        logging.debug("aligned_trainer: could not send %s", event, exc_info=True)


def progress_text(text: str, unique_id: str | None) -> None:
    """Show a line of text under the node in the UI."""
    srv = _server()
    if srv is None or unique_id is None:
        return
    try:
        srv.send_progress_text(text, unique_id)
    except Exception:
        logging.debug("aligned_trainer: could not send progress text", exc_info=True)


class NodeProgress:
    """Progress sink handed to engine code: a ComfyUI progress bar plus a status line under the node."""

    def __init__(self, total: int, unique_id: str | None = None):
        self.total = max(1, int(total))
        self.unique_id = unique_id
        self.bar = comfy.utils.ProgressBar(self.total, node_id=unique_id)

    def __call__(self, done: int, text: str | None = None, preview=None) -> None:
        self.bar.update_absolute(done, self.total, preview)
        if text:
            progress_text(text, self.unique_id)
