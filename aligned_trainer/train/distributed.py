"""Data-parallel training on ``torch.distributed``: the worker side (docs/headless.md, "Data-parallel training").

Every rank holds the same model and adapters and draws the whole step from the run's one seeded stream
(samples, captions, noise, timesteps, dropout seeds: cheap), but runs forward and backward only for its own
micro-batches: rank ``r`` of ``N`` takes micro-batches ``r, r + N, ...`` of the step's ``grad_accum x N``, each
loss divided by ``grad_accum x N``. One ``all_reduce(SUM)`` of the adapters' gradients (one flat buffer per
dtype) then gives every rank the gradient a 1-process run with ``grad_accum x N`` accumulates, and clipping, the
optimizer, the scheduler, max-norm and EMA run identically on every rank: the replicas stay equal without any
broadcast of weights. Rank 0 alone writes checkpoints and reports each step as one JSON line on its stdout.

Run by ``train/launch.py`` as ``torchrun ... -m aligned_trainer.train.distributed JOB.json`` from the pack's
folder. As ``__main__`` this module only hands over to the worker's ComfyUI host, ``nodes/worker_host.py``
(loaded by file path: the engine never imports ComfyUI's node API, executor or server), which imports ComfyUI
in-process (no server, no port), loads the custom nodes with ComfyUI's own loader and calls :func:`worker` of
the copy of this module that ComfyUI's loader imported with the pack (so the nodes' objects and the engine's
classes are the same), with a function that runs the workflow upstream of Train Init in ComfyUI's executor
(models are loaded per worker; the latent and text caches are read from the output folder). At the top this
module imports only the standard library and torch: as ``__main__`` it runs before ComfyUI is importable."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch

STARTED = time.perf_counter()  # when this copy of the module was imported (as __main__: the worker's start)
PREFIX = "@aligned_trainer "  # rank 0's report lines on stdout (anything else there is ComfyUI's own output)
PACK = Path(__file__).resolve().parents[2]


class WorkerError(RuntimeError):
    """A worker cannot build or train the run (the workflow upstream of Train Init failed, wrong world size)."""


def shard(n_micro: int, rank: int, world: int) -> list[int]:
    """The micro-batches of a step that ``rank`` of ``world`` computes: ``rank, rank + world, ...``."""
    return list(range(rank, n_micro, world))


def reduce_gradients(params: list[torch.Tensor]) -> None:
    """Sum the parameters' gradients over all ranks in place: one ``all_reduce`` per dtype of one flat buffer,
    plus one of which parameters have a gradient at all (a parameter no rank touched keeps ``grad = None``, as in
    one process: the optimizer then skips it)."""
    import torch.distributed as dist

    if not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(has)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    index = {id(p): i for i, p in enumerate(params)}
    for group in by_dtype.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
        dist.all_reduce(flat)
        at = 0
        for p in group:
            n = p.numel()
            p.grad = flat[at:at + n].view_as(p).clone() if has[index[id(p)]] > 0 else None
            at += n


@functools.cache
def trainer_class():
    """``loop.Trainer`` sharded over the process group (built on first use: see the module docstring)."""
    import torch.distributed as dist

    from . import loop

    class ShardedTrainer(loop.Trainer):
        """A trainer whose step draws ``grad_accum x world`` micro-batches, computes its rank's share and
        all-reduces the gradients; the loss is the 1-process sum of every micro-batch's loss, in order."""

        def __init__(self, run, activation_side: bool = True):
            super().__init__(run, activation_side)
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

        def _backward(self) -> list[float]:
            n = self.run.settings.grad_accum * self.world
            mine = set(shard(n, self.rank, self.world))
            losses = [0.0] * n
            for i in range(n):
                mb = self.draw_micro_batch()  # every rank draws every micro-batch: one stream, the same state
                if i in mine:
                    losses[i] = self.run_micro_batch(mb, n)
            return losses

        def backward(self) -> float:
            losses = torch.tensor(super().backward(), dtype=torch.float64, device=self._reduce_device())
            reduce_gradients(self.params)
            dist.all_reduce(losses)  # each entry comes from one rank (the others add 0.0): exact
            total = 0.0
            for v in losses.tolist():  # summed in micro-batch order, as one process sums them
                total += v
            return total

        def _reduce_device(self):
            return self.params[0].device if self.params else torch.device("cpu")

    return ShardedTrainer


# -- the worker process ---------------------------------------------------------------------------------------

_PIPE = {"broken": False}  # rank 0's stdout (the launcher's pipe) was closed: the ComfyUI process is gone


def emit(event: str, **data) -> None:
    """One report line for the launcher. If its pipe is closed (the ComfyUI process died), nothing is raised: the
    worker notes it, so :func:`launcher_gone` stops the run after a checkpoint instead of crashing mid-step."""
    if _PIPE["broken"]:
        return
    try:
        print(PREFIX + json.dumps({"event": event, **data}), flush=True)
    except (BrokenPipeError, ValueError, OSError):  # ValueError: stdout already closed
        _PIPE["broken"] = True
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w", encoding="utf-8")  # later prints (ComfyUI's own) go nowhere


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: the signal check above is all there is
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def launcher_gone(launcher: dict | None) -> bool:
    """Whether the ComfyUI process that started this run has died (``launcher``: its pid and host, from the job;
    a worker on another machine of a multi-node run cannot see it and relies on its rank 0's check)."""
    if _PIPE["broken"]:
        return True
    if not launcher or launcher.get("host") != socket.gethostname():
        return False
    return not _alive(int(launcher["pid"]))


def build_run(job: dict, inputs: dict):
    """The run Train Steps received, rebuilt in this worker: model, training set and configs from Train Init's
    inputs (computed by ComfyUI's executor in this worker), settings, run folder and state (the handoff
    checkpoint) from the job."""
    from . import state as st

    settings = st.RunSettings(**job["settings"])
    ck = st.load_checkpoint(job["checkpoint"])
    return st.TrainRun(model=inputs["model"], training_set=inputs["training_set"], lora=inputs["lora_config"],
                       timesteps=inputs["timesteps"], optimizer=inputs["optimizer"], settings=settings,
                       run_dir=job["run_dir"], step=ck["step"], state=ck["state"], history=ck["history"],
                       checkpoints=tuple(job["checkpoints"]), te_spec=job.get("te_spec"), meta=job.get("meta") or {},
                       preservation=inputs.get("preservation_prompt") if settings.dop_weight > 0 else None)


def _stop_requested(stop_file: Path, device, launcher: dict | None = None) -> bool:
    """Rank 0 looks for the stop file (Train Steps' interrupt) and whether the ComfyUI process that launched the run
    is still there (``launcher``), and tells every rank, so all stop after the same step (rank 0 checkpoints it)."""
    import torch.distributed as dist

    stop = dist.get_rank() == 0 and (stop_file.exists() or launcher_gone(launcher))
    flag = torch.tensor([1.0 if stop else 0.0], device=device)
    dist.broadcast(flag, 0)
    return bool(flag.item() > 0)


def worker(job: dict, train_init_inputs) -> int:
    """One rank of a data-parallel run (ComfyUI and the pack are loaded); ``train_init_inputs()`` runs the
    workflow upstream of Train Init in ComfyUI's executor and returns {input name: value} of its linked inputs."""
    import comfy.model_management as mm
    import torch.distributed as dist

    from . import loop
    from . import state as st

    device = mm.get_torch_device()
    distinct_gpus = device.type == "cuda" and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    dist.init_process_group("nccl" if distinct_gpus else "gloo")  # nccl needs one GPU per rank; gloo takes CUDA too
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        run = build_run(job, train_init_inputs())
        if rank == 0:  # how long a worker took to import ComfyUI, load the nodes and build the model (the log)
            emit("ready", seconds=round(time.perf_counter() - job.get("started", STARTED), 2))
        if world != run.settings.processes:
            raise WorkerError(f"the launcher started {world} processes, Train Init's processes is "
                              f"{run.settings.processes}")
        stop_file = Path(job["stop_file"])
        sync_device = device if dist.get_backend() == "nccl" else torch.device("cpu")

        def on_step(r, trainer):
            if rank == 0:
                emit("step", step=r.step, loss=r.loss, lr=r.lr, val_loss=r.val_loss, seconds=r.seconds)
            if _stop_requested(stop_file, sync_device, job.get("launcher")):
                mm.interrupt_current_processing(True)  # the loop stops before the next step, on every rank

        def save(snapshot, keep_last):
            return st.save_checkpoint(snapshot, keep_last) if rank == 0 else snapshot.checkpoints

        try:
            new = loop.train_steps(run, job["steps"], job["checkpoint_every"], job["keep_last"], job["val_every"],
                                   on_step, trainer_cls=trainer_class(), save=save)
        except mm.InterruptProcessingException:
            if rank == 0:
                emit("interrupted", checkpoint=str(st.latest_checkpoint(run.run_dir) or ""))
            return 0
        if rank == 0:
            kept = new.checkpoints
            result = st.save_checkpoint(new.advanced(run_dir=job["result_dir"], checkpoints=()), 0)
            emit("done", result=result[-1], checkpoints=list(kept))
        return 0
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: torchrun --nproc-per-node N -m aligned_trainer.train.distributed JOB.json (written by Train "
              "Steps; see docs/headless.md)", file=sys.stderr)
        return 2
    job = {**json.loads(Path(argv[0]).read_text(encoding="utf-8")), "started": STARTED}
    here = {str(PACK), os.getcwd(), ""}  # the pack's folder on sys.path would shadow ComfyUI's ``nodes`` module
    sys.path[:] = [p for p in sys.path if p not in here and os.path.realpath(p or ".") != str(PACK)]
    import importlib.util

    spec = importlib.util.spec_from_file_location("aligned_trainer_worker_host", PACK / "nodes" / "worker_host.py")
    host = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host)
    return host.run(job)


if __name__ == "__main__":
    sys.exit(main())
