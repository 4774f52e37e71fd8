"""Resume through the real ComfyUI server (main.py; every node runs inside torch.inference_mode()): after the
server process is killed with SIGKILL and a new one starts on the same folders, and after POST /interrupt.
The adapters after more steps equal an uninterrupted run's (CPU, fp32, saved LoRA tensors compared exactly).
A corrupted checkpoint and paths outside the runs folder are refused with clear messages over /history.

Two server starts for the whole module: the first is killed, the second serves every other scenario."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from support import train_prompt
from support.factories.dataset import make_dataset
from support.server import ComfyServer

pytestmark = pytest.mark.server
LONG = 1000  # steps queued for runs that are stopped from outside


def prompt(run_name: str, steps: int, resume: str = "none", checkpoint_every: int = 0, lora_name: str = "",
           if_exists: str = "new_name", seed: int = 5) -> dict:
    """The shared tiny SD1.5 run (support.train_prompt) with this module's settings: lr 1e-3 with a cosine schedule
    over LONG steps after 2 warmup steps (so a resumed run must restore the scheduler), 3 checkpoints kept, the
    LoRA saved under the next free name."""
    return train_prompt.prompt(run_name, steps, resume=resume, checkpoint_every=checkpoint_every, lora_name=lora_name,
                               dataset="resume_ds", lr=1e-3, scheduler="cosine", warmup_steps=2, total_steps=LONG,
                               seed=seed, keep_last=3, if_exists=if_exists, lora_if_exists="new_name")


class Pair:
    """Servers started one after another on the same folders (output, input, models)."""

    def __init__(self, base: Path, models: dict[str, Path]):
        self.base, self.models, self.current = base, models, None

    def start(self) -> ComfyServer:
        if self.current is not None:
            self.current.stop()
        self.current = ComfyServer(self.base, model_folders=self.models,
                                   log_name=f"server-{time.time_ns()}.log").start()
        make_dataset(self.current.input_dir / "resume_ds", n=4, sizes=((64, 64),))
        return self.current

    def server(self) -> ComfyServer:
        return self.current or self.start()

    @property
    def runs(self) -> Path:
        return self.base / "output" / "aligned_trainer" / "runs"

    @property
    def loras(self) -> Path:
        return self.models["loras"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, sd15_checkpoint):
    base = tmp_path_factory.mktemp("resume_server")
    loras = base / "models" / "loras"
    loras.mkdir(parents=True)
    p = Pair(base, {"checkpoints": sd15_checkpoint.parent, "loras": loras})
    try:
        yield p
    finally:
        if p.current is not None:
            p.current.stop()


def _wait_file(pattern_dir: Path, name: str, srv: ComfyServer, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not (pattern_dir / name).exists():
        assert srv.proc.poll() is None, srv.log_tail()
        assert time.time() < deadline, f"{name} did not appear in {pattern_dir}:\n{srv.log_tail()}"
        time.sleep(0.2)


def _error(entry: dict) -> str:
    msgs = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
    assert msgs, entry["status"]
    return msgs[0]["exception_message"]


def _lora(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def _assert_same_adapters(a: str, b: str) -> None:
    sa, sb = _lora(a), _lora(b)
    assert sa.keys() == sb.keys() and sa
    ups = [k for k in sa if k.endswith("lora_up.weight")]
    assert any(sa[k].abs().sum() > 0 for k in ups)  # trained, not the zero init
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _saved(entry: dict) -> str:
    """The path Save LoRA (node "10") reports (Train Init shows its memory plan as text too)."""
    return json.loads(entry["outputs"]["10"]["text"][0])["path"]


def _checkpoint_step(path: Path) -> int:
    return int(path.stem.removeprefix("step_"))


def test_resume_latest_after_sigkill_and_restart_equals_uninterrupted(pair):
    srv = pair.start()
    ckdir = pair.runs / "killed" / "checkpoints"
    srv.queue(prompt("killed", LONG, checkpoint_every=1))
    _wait_file(ckdir, "step_0000002.safetensors", srv)
    os.killpg(srv.proc.pid, signal.SIGKILL)  # kill -9, mid-training
    srv.proc.wait(timeout=30)
    assert srv.proc.returncode == -signal.SIGKILL
    srv.stop()
    pair.current = None
    newest = sorted(ckdir.glob("step_*.safetensors"))[-1]
    k = _checkpoint_step(newest)
    assert 2 <= k < LONG

    srv = pair.start()  # a new process on the same folders
    resumed = srv.run(prompt("killed", 2, resume="latest", lora_name="after_kill"), timeout=600)
    reference = srv.run(prompt("killed_reference", k + 2, lora_name="after_kill_reference"), timeout=600)
    _assert_same_adapters(_saved(resumed), _saved(reference))
    assert sorted(ckdir.glob("step_*.safetensors"))[-1].name == f"step_{k + 2:07d}.safetensors"
    print(f"killed after step {k}; resumed {k} + 2 steps == {k + 2} uninterrupted steps")


async def _wait_loss_event(srv: ComfyServer, step: int, timeout: float) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.ws_connect(f"ws://127.0.0.1:{srv.port}/ws?clientId=watch") as ws:
        async def events():
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    d = json.loads(msg.data)
                    if d.get("type") == "aligned_trainer.loss" and d["data"]["step"] >= step:
                        return d["data"]
        return await asyncio.wait_for(events(), timeout)


def test_resume_latest_after_interrupt_equals_uninterrupted(pair):
    srv = pair.server()
    pid = srv.queue(prompt("interrupted", LONG))  # no periodic checkpoints: only the interrupt writes one
    asyncio.run(_wait_loss_event(srv, 2, timeout=300))
    srv.interrupt()
    entry = srv.wait(pid, timeout=120)
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"]), entry["status"]
    kept = sorted((pair.runs / "interrupted" / "checkpoints").glob("step_*.safetensors"))
    assert len(kept) == 1  # the checkpoint written on interrupt, at the last completed step
    k = _checkpoint_step(kept[0])
    assert 2 <= k < LONG
    resumed = srv.run(prompt("interrupted", 2, resume="latest", lora_name="after_interrupt"), timeout=600)
    reference = srv.run(prompt("interrupted_reference", k + 2, lora_name="after_interrupt_reference"), timeout=600)
    _assert_same_adapters(_saved(resumed), _saved(reference))
    print(f"interrupted after step {k}; resumed {k} + 2 steps == {k + 2} uninterrupted steps")


def test_corrupted_checkpoint_is_refused_over_history(pair):
    srv = pair.server()
    srv.run(prompt("intact", 1))
    (good,) = (pair.runs / "intact" / "checkpoints").glob("step_*.safetensors")
    bad_dir = pair.runs / "corrupt" / "checkpoints"
    bad_dir.mkdir(parents=True)
    data = bytearray(good.read_bytes())
    data[8 + int.from_bytes(data[:8], "little") + 101] ^= 0x10  # one bit in the tensor data
    (bad_dir / good.name).write_bytes(bytes(data))
    entry = srv.wait(srv.queue(prompt("corrupt", 1, resume="latest")))
    assert entry["status"]["status_str"] == "error"
    msg = _error(entry)
    assert "step_0000001.safetensors" in msg and "is damaged" in msg and "digest" in msg, msg
    assert (bad_dir / good.name).read_bytes() == bytes(data)  # left as it was, nothing trained on it


def test_resume_outside_runs_folder_refused_with_one_message_over_history(pair, tmp_path):
    """The server reads no path a caller sends outside the runs folder, and its answer is the same whether or not
    the target exists."""
    srv = pair.server()
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"x" * 64)
    pair.runs.mkdir(parents=True, exist_ok=True)
    (pair.runs / "sneaky").symlink_to(outside)
    (pair.runs / "dangling").symlink_to(tmp_path / "missing.safetensors")
    for exists, missing in (("/etc/shadow", "/etc/no_such_file_here"), ("../../../../etc/passwd", "../../../../etc/nothing"),
                            ("~/.bashrc", "~/nothing"), ("sneaky", "dangling")):
        msgs = []
        for value in (exists, missing):
            entry = srv.wait(srv.queue(prompt("guarded", 1, resume=value)))
            assert entry["status"]["status_str"] == "error"
            msgs.append(re.sub(r"^resume .* is refused", "resume <value> is refused", _error(entry), flags=re.S))
        assert msgs[0] == msgs[1] and "is refused" in msgs[0], msgs
    assert not (pair.runs / "guarded").exists()


def test_saving_under_an_existing_name_keeps_the_old_file(pair):
    """Save LoRA under a taken name (the default if_exists) keeps the old file byte for byte."""
    srv = pair.server()
    first = Path(_saved(srv.run(prompt("named", 1, lora_name="taken"))))
    before = hashlib.sha256(first.read_bytes()).hexdigest()
    second = Path(_saved(srv.run(prompt("named", 2, lora_name="taken", seed=6))))
    assert first.name == "taken.safetensors" and second.name == "taken_2.safetensors"
    assert hashlib.sha256(first.read_bytes()).hexdigest() == before
    # the second prompt's Train Init (another seed: a new run) reused the run name: its run went to 'named_2'
    # and the first run's checkpoints are kept
    assert [p.name for p in (pair.runs / "named" / "checkpoints").glob("step_*")] == ["step_0000001.safetensors"]
    assert [p.name for p in (pair.runs / "named_2" / "checkpoints").glob("step_*")] == ["step_0000002.safetensors"]


def test_memory_plan_over_budget_refused_through_the_server(pair):
    """Train Init, run by the server, refuses a plan over the memory budget before anything is written: the
    history's error names the budget and lists settings that would fit."""
    srv = pair.server()
    p = prompt("too_big", 1)
    p["8"]["inputs"]["memory_budget_gb"] = 0.01
    entry = srv.wait(srv.queue(p))
    assert entry["status"]["status_str"] == "error"
    msg = _error(entry)
    assert "0.010 GiB is available" in msg and "does NOT fit" in msg and "Settings that would fit:" in msg, msg
    assert not (pair.runs / "too_big").exists()
