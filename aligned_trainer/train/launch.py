"""Train Steps' side of data-parallel training: with Train Init ``processes`` = 1 the steps run here, in
ComfyUI's process (``loop.train_steps``); with N > 1 this module starts N workers with torch's launcher
(``python -m torch.distributed.run`` = ``torchrun``), each ``-m aligned_trainer.train.distributed``
(``train/distributed.py``), feeds rank 0's step lines to the same ``on_step`` callback (the UI's live chart,
progress bar, ETA), turns ComfyUI's interrupt into a stop after the current step (rank 0 checkpoints it), and
turns a worker that dies into one error naming its rank and exit code.

What goes to the workers (a job file in ComfyUI's temp folder, removed afterwards): the workflow (the node's
hidden PROMPT) and Train Init's node id, ComfyUI's folders (so the workers load the same model files and read
the same caches), the run's settings and folder, and its state as a checkpoint file. What comes back: rank 0's
step lines and a checkpoint of the trained state, which becomes the returned run. Nothing is shared in
memory: each worker loads its own copy of the model."""
from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import files
from . import state as st
from .config import ConfigError

PACK = Path(__file__).resolve().parents[2]
JOBS = "aligned_trainer_ddp"          # under ComfyUI's temp folder
ARGS_ENV = "ALIGNED_TRAINER_TORCHRUN_ARGS"  # rendezvous arguments for torchrun (multi-node); default --standalone
STOP_GRACE_S = 300.0                  # how long an interrupted run may take to finish its step and checkpoint


class DistributedError(RuntimeError):
    """The workers failed: the message names the rank, its exit code, the last checkpoint and the log."""


@dataclass(frozen=True)
class Graph:
    """Where Train Steps sits in the workflow: the API prompt (hidden PROMPT), this node's id, and the node
    types of Train Init and Train Steps (the chain from this node's ``run`` input back to Train Init)."""
    prompt: dict
    node_id: str
    init_type: str
    steps_type: str

    def train_init(self) -> str:
        nid, seen = self.node_id, set()
        while nid in self.prompt and nid not in seen:
            seen.add(nid)
            node = self.prompt[nid]
            if node.get("class_type") == self.init_type:
                return nid
            link = node.get("inputs", {}).get("run") if node.get("class_type") == self.steps_type else None
            if not (isinstance(link, list) and len(link) == 2):
                break
            nid = str(link[0])
        raise ConfigError("processes > 1 needs Train Steps' run to come from Train Init (directly or through other "
                          "Train Steps nodes): the workers rebuild the model from the nodes upstream of Train Init")


def train_steps(run: st.TrainRun, steps: int, checkpoint_every: int, keep_last: int, val_every: int, on_step,
                preview=None, preview_every: int = 0, graph: Graph | None = None) -> st.TrainRun:
    """``loop.train_steps`` in this process (processes = 1) or on ``run.settings.processes`` workers."""
    from . import loop

    n = run.settings.processes
    if n <= 1:
        return loop.train_steps(run, steps, checkpoint_every, keep_last, val_every, on_step, preview, preview_every)
    if steps < 1:
        raise ConfigError("steps must be >= 1")
    if preview is not None and preview_every:
        raise ConfigError(f"previews are not rendered while {n} processes train: disconnect preview_plan from Train "
                          "Steps (render samples after it from its model output), or set Train Init processes to 1")
    if graph is None:
        raise ConfigError("processes > 1 needs the workflow (Train Steps' hidden PROMPT input); run it from ComfyUI")
    return _Job(run, steps, checkpoint_every, keep_last, val_every, graph).execute(on_step)


def _folders() -> dict:
    import folder_paths

    return {"output": folder_paths.get_output_directory(), "input": folder_paths.get_input_directory(),
            "temp": folder_paths.get_temp_directory(),
            "paths": {k: [list(v[0]), sorted(v[1])] for k, v in folder_paths.folder_names_and_paths.items()}}


def _nnodes(args: list[str]) -> int:
    """The node count in torchrun arguments (``--nnodes 2``, ``--nnodes=2``; elastic ``1:2`` -> 2), 1 if absent."""
    for i, a in enumerate(args):
        value = a.split("=", 1)[1] if a.startswith("--nnodes=") else (args[i + 1] if a == "--nnodes" and
                                                                       i + 1 < len(args) else None)
        if value is not None:
            try:
                return int(value.split(":")[-1])
            except ValueError:
                raise ConfigError(f"{ARGS_ENV}: --nnodes {value!r} is not a number of nodes") from None
    return 1


def torchrun_command(n: int, job_file: Path, env: dict | None = None) -> list[str]:
    """torch's launcher for ``n`` processes in all: one node (``--standalone``: a rendezvous on a free local
    port) unless $ALIGNED_TRAINER_TORCHRUN_ARGS gives rendezvous arguments (multi-node, docs/headless.md); then
    this node starts ``n / nnodes`` of them."""
    rdzv = shlex.split((os.environ if env is None else env).get(ARGS_ENV, "")) or ["--standalone"]
    nodes = _nnodes(rdzv)
    if n % nodes:
        raise ConfigError(f"processes {n} cannot be split evenly over the {nodes} nodes of {ARGS_ENV}: set Train "
                          f"Init processes to a multiple of {nodes} (the total over all nodes)")
    return [sys.executable, "-m", "torch.distributed.run", *rdzv, "--nproc-per-node", str(n // nodes),
            "--max-restarts", "0", "--monitor-interval", "0.5", "-m", "aligned_trainer.train.distributed",
            str(job_file)]


_FAILURE = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


def failed_rank(log: str) -> tuple[int, int] | None:
    """(rank, exit code) of the first failure torchrun reports in its summary ('Root Cause'), if any."""
    root = log[log.rfind("Root Cause"):] if "Root Cause" in log else log
    m = _FAILURE.search(root)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"{code} (killed by {signal.Signals(-code).name})"
        except ValueError:
            return f"{code} (a signal)"
    return str(code)


class _Job:
    def __init__(self, run, steps, checkpoint_every, keep_last, val_every, graph: Graph):
        import folder_paths

        self.run, self.steps, self.graph = run, steps, graph
        self.dir = Path(folder_paths.get_temp_directory()) / JOBS / f"{Path(run.run_dir).name}-{uuid.uuid4().hex[:8]}"
        logs = Path(folder_paths.get_output_directory()) / "aligned_trainer" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"ddp-{Path(run.run_dir).name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}.log"
        self.params = {"steps": steps, "checkpoint_every": checkpoint_every, "keep_last": keep_last,
                       "val_every": val_every}

    def _write(self) -> Path:
        from comfy.cli_args import args

        handoff = st.save_checkpoint(self.run.advanced(run_dir=str(self.dir / "in"), checkpoints=()), 0)[-1]
        job = {"comfyui": str(Path(sys.modules["folder_paths"].__file__).resolve().parent), "cpu": bool(args.cpu),
               "folders": _folders(), "prompt": self.graph.prompt, "train_init": self.graph.train_init(),
               "settings": dataclasses.asdict(self.run.settings), "run_dir": self.run.run_dir,
               "checkpoints": list(self.run.checkpoints), "te_spec": self.run.te_spec,
               "meta": {k: v for k, v in self.run.meta.items() if k == "started_at" or k == "dataset_hash"},
               "checkpoint": handoff, "result_dir": str(self.dir / "out"), "stop_file": str(self.dir / "stop"),
               "launcher": {"pid": os.getpid(), "host": socket.gethostname()},
               **self.params}
        path = self.dir / "job.json"
        files.write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(job), encoding="utf-8"))
        return path

    def execute(self, on_step) -> st.TrainRun:
        import comfy.model_management as mm

        from .loop import StepResult

        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            job_file = self._write()
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            cmd = torchrun_command(self.run.settings.processes, job_file)
            with open(self.log_path, "w", encoding="utf-8") as log:
                log.write(f"[launch] in {PACK}: {shlex.join(cmd)}\n")  # the job file other nodes need
                log.flush()
                proc = subprocess.Popen(cmd, cwd=str(PACK),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                        start_new_session=True)
                lines: queue.Queue = queue.Queue()
                threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout] + [lines.put(None)],
                                 daemon=True).start()
                done, stopping, last_step, interrupted = None, None, self.run.step, False
                try:
                    while True:
                        try:
                            line = lines.get(timeout=0.2)
                        except queue.Empty:
                            line = ""
                        if line is None:
                            break
                        if line.startswith(_prefix()):
                            ev = json.loads(line[len(_prefix()):])
                            kind = ev.pop("event")
                            if kind == "step":
                                last_step = ev["step"]
                                try:
                                    on_step(StepResult(**ev), None)
                                except mm.InterruptProcessingException:  # ComfyUI's progress hook saw Cancel
                                    interrupted = True
                            elif kind == "done":
                                done = ev
                            elif kind == "ready":
                                log.write(f"[launch] rank 0 ready to train after {ev['seconds']} s (ComfyUI "
                                          "import, custom nodes, the workflow upstream of Train Init)\n")
                        elif line:
                            log.write(line)
                            log.flush()
                        if stopping is None and (interrupted or mm.processing_interrupted()):
                            (self.dir / "stop").touch()  # every rank stops after this step; rank 0 checkpoints it
                            stopping = time.monotonic()
                        if stopping is not None and time.monotonic() - stopping > STOP_GRACE_S:
                            _kill(proc)
                    code = proc.wait()
                except BaseException:
                    _kill(proc)
                    raise
            if stopping is not None:
                raise mm.InterruptProcessingException()
            if code != 0 or done is None:
                raise DistributedError(self._failure(code, last_step))
            return self._result(done)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _failure(self, code: int, last_step: int) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        found = failed_rank(text)
        who = (f"worker rank {found[0]} of {self.run.settings.processes} exited with code {_exit_text(found[1])}"
               if found else f"the workers' launcher (torchrun) exited with code {_exit_text(code)}")
        rank = rf"\[rank{found[0]}\]:\s*" if found else r"(\[rank\d+\]:\s*)?"
        errs = [ln.strip() for ln in text.splitlines() if re.match(rf"^\s*{rank}\w*(Error|Exception):", ln)]
        why = f" ({errs[-1][:300]})" if errs else ""  # the failed rank's own exception, if it raised one
        last = st.latest_checkpoint(self.run.run_dir)
        where = (f"the last checkpoint, {last}, is intact: resume it with Train Init resume 'latest'" if last
                 else "no checkpoint was written (set checkpoint_every to keep partial progress)")
        return (f"data-parallel training stopped: {who} after step {last_step}{why}; {where}. The workers' log: "
                f"{self.log_path}")

    def _result(self, done: dict) -> st.TrainRun:
        ck = st.load_checkpoint(done["result"])
        return self.run.advanced(step=ck["step"], state=ck["state"], history=ck["history"],
                                 checkpoints=tuple(done["checkpoints"]))


def _prefix() -> str:
    from .distributed import PREFIX

    return PREFIX


def _kill(proc: subprocess.Popen) -> None:
    """Stop torchrun and its workers (their own process group)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
