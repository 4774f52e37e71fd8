"""Data-parallel training's pure parts pinned in process (issue #26; the multi-process runs are in
test_distributed.py): the sharded trainer's two ranks together equal one process with twice the accumulation
(each rank simulated on a one-process gloo group, where all_reduce adds nothing), the gradient reduction's
packing, the stop flag, the worker's rebuilt run and report lines, and the launcher's torchrun command, failure
parsing and messages, job file and result."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

P = "AlignedTrainer_"


@pytest.fixture(scope="module")
def DP(comfy):
    return comfy.engine("train.distributed")


@pytest.fixture(scope="module")
def L(comfy):
    return comfy.engine("train.launch")


@contextlib.contextmanager
def one_process_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _run(T, sd15, tset, root, **settings):
    return T.loop.init_run(sd15[0], tset, T.C.LoraConfig(rank=4, alpha=4, preset="attention"), T.C.TimestepConfig(),
                           T.C.OptimizerConfig(lr=1e-3), T.st.RunSettings(run_name="pin_ddp", seed=6, **settings),
                           runs_root=root)


def test_shard_splits_every_micro_batch_once(DP):
    assert [DP.shard(7, r, 3) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert DP.shard(2, 1, 2) == [1] and DP.shard(3, 0, 1) == [0, 1, 2] and DP.shard(1, 1, 2) == []


def test_two_ranks_sum_to_one_process_with_double_accumulation(T, DP, sd15, sd15_training_set, tmp_path):
    """Rank 0 and rank 1 of 2 (grad_accum 2: four micro-batches, each loss / 4) draw the same stream and compute
    micro-batches 0, 2 and 1, 3: their losses and gradients add up to one process's with grad_accum 4."""
    def backward(cls, run, rank=None):
        with torch.inference_mode(False), torch.enable_grad():
            tr = cls(run)
            if rank is not None:
                tr.rank, tr.world = rank, 2
            tr.load()
            try:
                loss = tr.backward()
                return loss, [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in tr.params], \
                    tr.gen.get_state()
            finally:
                tr.release()

    with one_process_group():
        sharded = DP.trainer_class()
        assert issubclass(sharded, T.loop.Trainer)
        ranks = [backward(sharded, _run(T, sd15, sd15_training_set, tmp_path, grad_accum=2), r) for r in (0, 1)]
    with torch.inference_mode(False), torch.enable_grad():  # one process, its four micro-batches one by one
        tr = T.loop.Trainer(_run(T, sd15, sd15_training_set, tmp_path, grad_accum=4))
        tr.load()
        try:
            with tr.hooked():
                per = [tr.run_micro_batch(tr.draw_micro_batch(), 4) for _ in range(4)]
            one = sum(per), [p.grad.clone() for p in tr.params], tr.gen.get_state()
        finally:
            tr.release()
    assert ranks[0][0] > 0 and ranks[1][0] > 0 and ranks[0][0] != ranks[1][0]
    assert ranks[0][0] == pytest.approx(per[0] + per[2], rel=1e-12)  # rank r computes micro-batches r, r + 2
    assert ranks[1][0] == pytest.approx(per[1] + per[3], rel=1e-12)
    assert ranks[0][0] + ranks[1][0] == pytest.approx(one[0], rel=1e-12)
    for a, b, c in zip(ranks[0][1], ranks[1][1], one[1]):
        torch.testing.assert_close(a + b, c, rtol=1e-5, atol=1e-9)
    assert torch.equal(ranks[0][2], one[2]) and torch.equal(ranks[1][2], one[2])  # every rank drew all four


def test_reduce_gradients_keeps_values_dtypes_and_missing_gradients(DP):
    """One flat buffer per dtype, unpacked back in place: values and shapes as they were (a one-process sum),
    a parameter without gradient keeps None, and each gradient is its own tensor (not a view of the buffer)."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s, dtype=d)) for s, d in
              (((2, 3), torch.float32), ((4,), torch.float64), ((3, 1), torch.float32), ((5,), torch.float32),
               ((2, 2), torch.float64))]
    want = []
    for i, p in enumerate(params):
        p.grad = None if i == 3 else torch.randn(p.shape, generator=g, dtype=p.dtype)
        want.append(None if p.grad is None else p.grad.clone())
    with one_process_group():
        DP.reduce_gradients(params)
        DP.reduce_gradients([])
    for p, w in zip(params, want):
        if w is None:
            assert p.grad is None
        else:
            assert p.grad.dtype == w.dtype and torch.equal(p.grad, w)
    assert params[0].grad.data_ptr() != params[2].grad.data_ptr()
    params[0].grad.add_(1.0)
    assert torch.equal(params[2].grad, want[2])


def test_stop_flag_and_report_lines(DP, tmp_path, capsys, monkeypatch):
    stop = tmp_path / "stop"
    with one_process_group():
        assert DP._stop_requested(stop, torch.device("cpu")) is False
        stop.touch()
        assert DP._stop_requested(stop, torch.device("cpu")) is True
    DP.emit("step", step=3, loss=0.5)
    out = capsys.readouterr().out
    assert out == DP.PREFIX + json.dumps({"event": "step", "step": 3, "loss": 0.5}) + "\n"
    monkeypatch.setattr(sys, "argv", ["distributed.py", "missing-job.json"])
    assert DP.main(["a", "b"]) == 2 and "usage: torchrun" in capsys.readouterr().err  # the arguments given win
    monkeypatch.setattr(sys, "argv", ["distributed.py", "a", "b"])
    assert DP.main() == 2 and "usage: torchrun" in capsys.readouterr().err  # else the command line's, after argv[0]
    with pytest.raises(DP.WorkerError):
        raise DP.WorkerError("x")


def test_launcher_gone_follows_the_comfyui_process(DP, tmp_path, monkeypatch):
    """The worker's check that the ComfyUI process which launched the run is still there: alive (this process) or on
    another machine (not visible: only that machine's rank 0 can tell) is not gone; a dead launcher is gone, already
    while it is an unreaped zombie; and rank 0's stop flag is raised for it as for the stop file."""
    host = socket.gethostname()
    assert DP.launcher_gone({"pid": os.getpid(), "host": host}) is False
    assert DP.launcher_gone(None) is False
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert DP.launcher_gone({"pid": child.pid, "host": host}) is False
        child.kill()
        deadline = time.time() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z":
            assert time.time() < deadline, "the killed child never became a zombie"
        assert DP.launcher_gone({"pid": child.pid, "host": host}) is True  # dead, not yet reaped
        assert DP.launcher_gone({"pid": child.pid, "host": host + "-elsewhere"}) is False
    finally:
        child.kill()
        child.wait()
    assert DP.launcher_gone({"pid": child.pid, "host": host}) is True  # reaped
    with one_process_group():
        stop = tmp_path / "no_stop_file"
        assert DP._stop_requested(stop, torch.device("cpu"), {"pid": os.getpid(), "host": host}) is False
        assert DP._stop_requested(stop, torch.device("cpu"), {"pid": child.pid, "host": host}) is True


def test_report_line_on_a_closed_pipe_marks_the_launcher_gone(DP, monkeypatch):
    """When the ComfyUI process dies, rank 0's stdout (its pipe) is closed: the next report line raises nothing,
    the worker counts the launcher as gone (so it checkpoints and stops after this step) and prints nothing more."""
    monkeypatch.setitem(DP._PIPE, "broken", False)
    r, w = os.pipe()
    os.close(r)
    out = os.fdopen(w, "w", encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", out)
    old = signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as in any Python process: EPIPE, not a signal
    try:
        DP.emit("step", step=1, loss=0.5)
        assert DP._PIPE["broken"] is True and DP.launcher_gone(None) is True
        assert sys.stdout is not out  # later output goes to the null device
        DP.emit("interrupted", checkpoint="x")
    finally:
        signal.signal(signal.SIGPIPE, old)
        with contextlib.suppress(OSError):
            out.close()


def test_worker_rebuilds_the_handed_over_run(T, DP, sd15, sd15_training_set, tmp_path):
    """build_run: settings, run folder, checkpoints, te_spec and meta from the job; step, state and history from the
    handoff checkpoint; the preservation prompt only with dop_weight > 0."""
    run = T.loop.train_steps(_run(T, sd15, sd15_training_set, tmp_path), 1, 0)
    run = run.advanced(settings=dataclasses.replace(run.settings, dop_weight=0.5))
    handoff = T.st.save_checkpoint(run.advanced(run_dir=str(tmp_path / "in"), checkpoints=()), 0)[-1]
    job = {"settings": dataclasses.asdict(run.settings), "checkpoint": handoff, "run_dir": run.run_dir,
           "checkpoints": ["a.safetensors"], "te_spec": {"id": "sd15"}, "meta": {"dataset_hash": "h"}}
    inputs = {"model": sd15[0], "training_set": sd15_training_set, "lora_config": run.lora, "timesteps": run.timesteps,
              "optimizer": run.optimizer, "preservation_prompt": "PRES"}
    got = DP.build_run(job, inputs)
    assert got.step == 1 and got.run_dir == run.run_dir and got.checkpoints == ("a.safetensors",)
    assert got.settings == run.settings and got.te_spec == {"id": "sd15"} and got.meta == {"dataset_hash": "h"}
    assert got.preservation == "PRES" and got.lora == run.lora and got.model is sd15[0]
    assert [h["loss"] for h in got.history] == [h["loss"] for h in run.history]
    for k, v in run.state["adapters"].items():
        assert torch.equal(got.state["adapters"][k], v), k
    job["settings"]["dop_weight"] = 0.0
    assert DP.build_run(job, inputs).preservation is None
    job.pop("te_spec"), job.pop("meta")
    bare = DP.build_run(job, inputs)
    assert bare.te_spec is None and bare.meta == {}


# -- the launcher ----------------------------------------------------------------------------------------------
def test_graph_follows_train_steps_chain_to_train_init(L, T):
    prompt = {"9": {"class_type": P + "TrainSteps", "inputs": {"run": ["8", 0]}},
              "8": {"class_type": P + "TrainSteps", "inputs": {"run": [7, 0]}},
              "7": {"class_type": P + "TrainInit", "inputs": {}},
              "5": {"class_type": "Other", "inputs": {"run": ["7", 0]}},
              "4": {"class_type": P + "TrainSteps", "inputs": {"run": ["4", 0]}},
              "3": {"class_type": P + "TrainSteps", "inputs": {"run": "7"}}}
    g = lambda nid: L.Graph(prompt, nid, P + "TrainInit", P + "TrainSteps")  # noqa: E731
    assert g("9").train_init() == "7" and g("7").train_init() == "7"
    for nid in ("5", "4", "3", "99"):
        with pytest.raises(T.C.ConfigError, match="needs Train Steps' run to come from Train Init"):
            g(nid).train_init()


def test_train_steps_refusals_before_any_worker(L, T):
    run = T.st.TrainRun(model=None, training_set=None, lora=T.C.LoraConfig(), timesteps=T.C.TimestepConfig(),
                        optimizer=T.C.OptimizerConfig(), settings=T.st.RunSettings(processes=2), run_dir="unused")
    graph = L.Graph({}, "1", "I", "S")
    with pytest.raises(T.C.ConfigError, match="steps must be >= 1"):
        L.train_steps(run, 0, 0, 3, 0, None, graph=graph)
    with pytest.raises(T.C.ConfigError, match="previews are not rendered while 2 processes train"):
        L.train_steps(run, 1, 0, 3, 0, None, preview=lambda t, s: None, preview_every=1, graph=graph)
    with pytest.raises(T.C.ConfigError, match="hidden PROMPT"):
        L.train_steps(run, 1, 0, 3, 0, None, preview=lambda t, s: None, preview_every=0)


def test_torchrun_command_and_node_count(L, T):
    job = Path("job.json")
    assert L.torchrun_command(3, job, {}) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", "--max-restarts", "0",
        "--monitor-interval", "0.5", "-m", "aligned_trainer.train.distributed", "job.json"]
    cmd = L.torchrun_command(6, job, {L.ARGS_ENV: "--nnodes=3 --rdzv-endpoint 'h:1'"})
    assert cmd[3:7] == ["--nnodes=3", "--rdzv-endpoint", "h:1", "--nproc-per-node"] and cmd[7] == "2"
    assert L._nnodes(["--nnodes", "2"]) == 2 and L._nnodes(["--nnodes=1:4"]) == 4 and L._nnodes(["--nnodes"]) == 1
    assert L._nnodes(["--x", "--nnodes", "5", "--nnodes", "7"]) == 5 and L._nnodes([]) == 1
    with pytest.raises(T.C.ConfigError, match=r"--nnodes 'two' is not a number of nodes"):
        L._nnodes(["--nnodes=two"])
    with pytest.raises(T.C.ConfigError, match=r"--nnodes '1=2' is not a number of nodes"):
        L._nnodes(["--nnodes=1=2"])
    with pytest.raises(T.C.ConfigError, match="processes 5 cannot be split evenly over the 2 nodes"):
        L.torchrun_command(5, job, {L.ARGS_ENV: "--nnodes 2"})
    os.environ.pop(L.ARGS_ENV, None)
    assert "--standalone" in L.torchrun_command(1, job)


SUMMARY = """[rank1]: Traceback (most recent call last):
[rank1]: ValueError: an earlier error
[rank1]: RuntimeError: the worker broke
Failures:
[1]:
  time      : 2026-12-01_00:00:00
  host      : h
  rank      : 3 (local_rank: 1)
  exitcode  : 2 (pid: 11)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-01_00:00:00
  host      : h
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 10)
"""


def test_failed_rank_reads_the_root_cause_and_exit_texts(L):
    assert L.failed_rank(SUMMARY) == (1, -9)
    assert L.failed_rank(SUMMARY.split("Root Cause")[0]) == (3, 2)
    assert L.failed_rank("nothing here") is None
    assert L._exit_text(-9) == "-9 (killed by SIGKILL)" and L._exit_text(-int(signal.SIGTERM)) == "-15 (killed by SIGTERM)"
    assert L._exit_text(-999) == "-999 (a signal)" and L._exit_text(3) == "3" and L._exit_text(0) == "0"


def test_job_failure_message_result_and_job_file(L, T, sd15, sd15_training_set, tmp_path):
    """The failure text names the failed rank, its exit code, its own last exception, the step, the last checkpoint
    (or how to keep one) and the log; the job file carries what a worker needs; a done line becomes the run."""
    run = _run(T, sd15, sd15_training_set, tmp_path, processes=2)
    run = T.loop.train_steps(dataclasses.replace(run, settings=dataclasses.replace(run.settings, processes=1)), 1, 0)
    run = run.advanced(settings=dataclasses.replace(run.settings, processes=2))
    prompt = {"9": {"class_type": P + "TrainSteps", "inputs": {"run": ["7", 0]}},
              "7": {"class_type": P + "TrainInit", "inputs": {}}}
    import shutil

    import folder_paths

    graph = L.Graph(prompt, "9", P + "TrainInit", P + "TrainSteps")
    output = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path / "fresh_output"))  # a ComfyUI output folder without our folders
    try:
        first, second = L._Job(run, 3, 1, 2, 0, graph), L._Job(run, 3, 1, 2, 0, graph)  # made, then found
        assert first.log_path.parent == tmp_path / "fresh_output" / "aligned_trainer" / "logs"
        assert second.log_path.parent.is_dir() and first.log_path != second.log_path
    finally:
        folder_paths.set_output_directory(output)
    del shutil
    job = L._Job(run, 3, 1, 2, 0, graph)
    job.log_path.write_bytes(b"\xff\xfe not UTF-8\n" + SUMMARY.encode())  # a worker's stray bytes do not hide it
    msg = job._failure(1, 4)
    assert msg.startswith("data-parallel training stopped: worker rank 1 of 2 exited with code -9 (killed by SIGKILL) "
                          "after step 4 ([rank1]: RuntimeError: the worker broke); no checkpoint was written"), msg
    assert msg.endswith(f"The workers' log: {job.log_path}")
    long = "[rank1]: RuntimeError: " + "x" * 400
    job.log_path.write_text(SUMMARY.replace("[rank1]: RuntimeError: the worker broke", long))
    assert f"({long[:300]});" in job._failure(1, 4)  # the exception line quoted up to 300 characters
    job.log_path.write_text("[rank0]: KeyError: 'x'\nsomething else\n")
    msg = job._failure(7, 0)
    assert "the workers' launcher (torchrun) exited with code 7 after step 0 ([rank0]: KeyError: 'x');" in msg, msg
    saved = T.st.save_checkpoint(run, 3)[-1]
    assert f"the last checkpoint, {saved}, is intact: resume it" in job._failure(1, 1)
    job.dir.mkdir(parents=True)
    path = job._write()
    data = json.loads(path.read_text())
    assert data["train_init"] == "7" and data["prompt"] == prompt and data["settings"]["processes"] == 2
    assert (data["steps"], data["checkpoint_every"], data["keep_last"], data["val_every"]) == (3, 1, 2, 0)
    assert data["run_dir"] == run.run_dir and data["stop_file"] == str(job.dir / "stop")
    assert data["launcher"] == {"pid": os.getpid(), "host": socket.gethostname()}
    assert data["meta"] == {k: run.meta[k] for k in ("started_at", "dataset_hash")} and data["result_dir"] == str(job.dir / "out")
    assert data["checkpoint"].startswith(str(job.dir / "in")) and Path(saved).is_file()  # the run's own folder untouched
    assert data["checkpoints"] == list(run.checkpoints)
    assert data["folders"]["paths"]["loras"][0] == list(folder_paths.folder_names_and_paths["loras"][0])
    ck = T.st.load_checkpoint(data["checkpoint"])
    assert ck["step"] == 1 and all(torch.equal(ck["state"]["adapters"][k], v) for k, v in run.state["adapters"].items())
    done = run.advanced(run_dir=str(job.dir / "out"), step=5, history=run.history * 2, checkpoints=(),
                        state={**run.state, "adapters": {k: v + 1 for k, v in run.state["adapters"].items()}})
    res = job._result({"result": T.st.save_checkpoint(done, 0)[-1], "checkpoints": ["c1"]})
    assert res.step == 5 and res.checkpoints == ("c1",) and res.run_dir == run.run_dir
    assert len(res.history) == 2 and all(torch.equal(res.state["adapters"][k], v + 1)
                                         for k, v in run.state["adapters"].items())


_RANK = r'''
import json, marshal, sys, types
import torch, torch.distributed as dist
from safetensors.torch import save_file
code, rank, store, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
fn = types.FunctionType(marshal.loads(open(code, "rb").read()), {"torch": torch, "__builtins__": __builtins__})
dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
g = torch.Generator().manual_seed(rank)
shapes = [((2, 3), torch.float32), ((4,), torch.float64), ((3,), torch.float32), ((5,), torch.float32), ((2,), torch.float64)]
params = [torch.nn.Parameter(torch.zeros(s, dtype=d)) for s, d in shapes]
for i, p in enumerate(params):  # param 2: a gradient on rank 1 only; param 3: on no rank
    if not (i == 3 or (i == 2 and rank == 0)):
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
before = {str(i): p.grad.clone() for i, p in enumerate(params) if p.grad is not None}
fn(params)
dist.destroy_process_group()
save_file({**{"before" + k: v for k, v in before.items()},
           **{"after" + str(i): p.grad for i, p in enumerate(params) if p.grad is not None}}, out)
'''


def test_reduce_gradients_sums_over_two_real_ranks(DP, tmp_path):
    """The function as loaded (its code object) runs in two gloo processes: every gradient becomes the sum of the
    ranks' gradients, a parameter with a gradient on one rank only gets that one, one without on every rank keeps
    None, dtypes kept."""
    import marshal
    import subprocess

    from safetensors.torch import load_file

    with one_process_group():  # (the same function in this process too: the mutation runner's coverage sees it)
        q = torch.nn.Parameter(torch.zeros(2))
        q.grad = torch.ones(2)
        DP.reduce_gradients([q])
    assert torch.equal(q.grad, torch.ones(2))
    code = tmp_path / "reduce.code"
    code.write_bytes(marshal.dumps(DP.reduce_gradients.__code__))
    script = tmp_path / "rank.py"
    script.write_text(_RANK)
    outs = [tmp_path / f"r{r}.safetensors" for r in (0, 1)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(code), str(r), str(tmp_path / "store"), str(outs[r])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
    logs = [p.communicate(timeout=120)[0].decode(errors="replace")[-2000:] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    r0, r1 = (load_file(str(o)) for o in outs)
    for i in range(5):
        a, b = r0.get(f"before{i}"), r1.get(f"before{i}")
        if a is None and b is None:
            assert f"after{i}" not in r0 and f"after{i}" not in r1, i
            continue
        want = (a if a is not None else 0) + (b if b is not None else 0)
        for r in (r0, r1):
            assert r[f"after{i}"].dtype == want.dtype and torch.equal(r[f"after{i}"], want), i
