"""The headless command (``python -m aligned_trainer.cli run``) as a user runs it: a subprocess that starts its
own ComfyUI (main.py, the pack loaded by ComfyUI's loader) on folders shared with a running ComfyUI server.

* the shipped demo workflow (UI format; its LoRA and loss plot) runs to the end, streams loss with a progress
  bar and ETA, and the printed LoRA and image paths exist where the server writes them;
* the headless run's checkpoint is resumed through the server, and the adapters equal an uninterrupted run's;
* bad arguments (missing file, unknown node, unknown input, bad value) and a failing node (an API-format file,
  the user-saved kind) each give one clear message and a non-zero exit code; these use the module's server
  (``--server``) for the node schemas instead of starting a ComfyUI each.

One ComfyUI start by the command plus one server for the module (it boots while the command runs)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support.demo import DEMO_WORKFLOW as DEMO
from support.demo import prepare_inputs
from support.headless import module
from support.paths import REPO
from support.server import ComfyServer

RUN, WF = module("run"), module("workflow")

pytestmark = pytest.mark.server


class Place:
    """One set of ComfyUI folders, used by the module's server and by every headless run."""

    def __init__(self, base: Path, checkpoints: Path):
        self.base = base
        self.loras = base / "models" / "loras"
        self.loras.mkdir(parents=True)
        self.vae = checkpoints.parent / "vae"  # where prepare_inputs puts the demo's VAE file
        self.vae.mkdir(parents=True, exist_ok=True)
        self.server = ComfyServer(base, model_folders={"checkpoints": checkpoints, "vae": self.vae,
                                                       "loras": self.loras})
        self.server.launch()  # boots while the first headless run works
        self.yaml = base / "extra_model_paths.yaml"

    def ready(self) -> ComfyServer:
        return self.server.wait_ready()

    def headless_args(self) -> list[str]:
        # the command's own temp folder: ComfyUI empties its temp folder when it starts and when it stops
        return ["--cpu", "--output", str(self.base / "output"), "--input", str(self.base / "input"),
                "--user", str(self.base / "user"), "--temp", str(self.base / "temp_headless"),
                "--extra-model-paths-config", str(self.yaml)]

    @property
    def runs(self) -> Path:
        return self.base / "output" / "aligned_trainer" / "runs"


@pytest.fixture(scope="module")
def place(tmp_path_factory, sd15_checkpoint):
    p = Place(tmp_path_factory.mktemp("headless"), sd15_checkpoint.parent)
    try:
        prepare_inputs(p.base / "input", sd15_checkpoint.parent)
        yield p
    finally:
        p.server.stop()


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m aligned_trainer.cli`` from the repository root, as the README says."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "aligned_trainer.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo_run(place):
    """The shipped demo workflow, headless, cut on the command line to 1 training step, the LoRA and the loss
    plot (``--only``: its sample grid and A/B grid take about half the demo's time; tests/test_main_command.py
    runs the whole demo through the same run module)."""
    return cli("run", "workflows/demo_train_tiny.json", "--set", "Train Steps.steps=1", "--set", "13.val_every=0",
               "--only", "Save LoRA", "--only", "18", *place.headless_args())


def test_demo_workflow_runs_headless_and_prints_its_outputs(place, demo_run):
    out = demo_run.stdout
    assert demo_run.returncode == 0, out[-3000:] + demo_run.stderr[-3000:]
    # progress: a bar, the loss and an ETA per reported step, ending at 1/1
    bars = re.findall(r"\[[#.]{24}\] (\d+)/(\d+)\s+step (\d+)\s+loss (\d+\.\d+).*ETA (\d\d:\d\d)", out)
    assert bars and bars[-1][:3] == ("1", "1", "1"), out[-3000:]
    assert "node 11 'Train Init'" in out and "node 13 'Train Steps'" in out
    assert "'Sample Preview'" not in out and "'A/B Compare'" not in out  # --only
    loras = re.findall(r"\[run\] LoRA: +(.+)", out)
    images = [Path(p) for p in re.findall(r"\[run\] image: +(.+)", out)]
    assert loras == [str(place.loras / "demo_lora.safetensors")], out[-2000:]
    sd = load_file(loras[0])
    assert any(k.endswith("lora_up.weight") and sd[k].abs().sum() > 0 for k in sd)  # trained, not the zero init
    assert [p.name.rsplit("_", 2)[0] for p in images] == ["loss_plot"], out[-2000:]
    for p in images:  # where the server writes SaveImage files: <output>/demo/...
        assert p.parent == place.base / "output" / "demo" and p.stat().st_size > 1000, p
    # the run's checkpoint sits where a server run's would, and the ComfyUI log in the output folder
    assert (place.runs / "demo" / "checkpoints" / "step_0000001.safetensors").is_file()
    assert list((place.base / "output" / "aligned_trainer" / "logs").glob("headless-*.log"))


def _train(srv: ComfyServer, sets: list[str]) -> dict[str, torch.Tensor]:
    """The demo workflow through the server, only what Save LoRA needs (ComfyUI's partial execution)."""
    prompt, info, labels = RUN.prepare(srv, WF.read(DEMO), ["Train Steps.val_every=0", "Save LoRA.dtype=fp32", *sets])
    res = RUN.run_prompt(srv, prompt, labels, timeout=600, targets=WF.output_targets(prompt, info, ["Save LoRA"]))
    assert not any("images" in o for o in res.entry["outputs"].values())  # no previews or samples ran
    (path,) = res.loras
    return load_file(path)


def test_headless_checkpoint_resumes_through_the_server(place, demo_run):
    """The demo's headless step, then 1 more resumed through the server == 2 uninterrupted steps on the
    server (saved fp32 LoRA tensors compared exactly; optimizer state and RNG streams carry over)."""
    assert demo_run.returncode == 0, demo_run.stderr[-3000:]
    srv = place.ready()
    resumed = _train(srv, ["Train Init.resume=latest", "Train Steps.steps=1", "Save LoRA.name=resumed"])
    straight = _train(srv, ["Train Init.run_name=straight", "Train Steps.steps=2", "Save LoRA.name=straight"])
    assert resumed.keys() == straight.keys() and resumed
    for k in resumed:
        assert torch.equal(resumed[k], straight[k]), k
    assert any(v.abs().sum() > 0 for k, v in resumed.items() if k.endswith("lora_up.weight"))
    assert (place.runs / "demo" / "checkpoints" / "step_0000002.safetensors").is_file()


def _one_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_bad_arguments_give_one_clear_message(place, tmp_path):
    missing = _one_error(cli("run", str(tmp_path / "nope.json")))
    assert "nope.json" in missing and "does not exist" in missing
    notjson = tmp_path / "notes.json"
    notjson.write_text("{ not json")
    assert "is not JSON" in _one_error(cli("run", str(notjson)))
    assert "is not NODE.INPUT=VALUE" in _one_error(cli("run", "workflows/demo_train_tiny.json", "--set", "steps20"))

    srv = place.ready()  # the remaining checks need the live node schemas: use the running server
    demo = ["run", "workflows/demo_train_tiny.json", "--server", srv.url]
    node = _one_error(cli(*demo, "--set", "Train Stepz.steps=3"))
    assert "no node 'Train Stepz'" in node and "13 'Train Steps'" in node and "11 'Train Init'" in node, node
    inp = _one_error(cli(*demo, "--set", "Train Steps.stepz=3"))
    assert "has no input 'stepz'" in inp and "steps (INT 1..1000000)" in inp and "checkpoint_every" in inp, inp
    rng = _one_error(cli(*demo, "--set", "Train Steps.steps=0"))
    assert "input 'steps' of node 13 'Train Steps'" in rng and "outside its range 1..1000000" in rng, rng
    word = _one_error(cli(*demo, "--set", "Train Steps.steps=many"))
    assert "'many' is not an integer" in word, word
    combo = _one_error(cli(*demo, "--set", "Train Init.precision=fp7"))
    assert "'fp7' is not one of the choices: fp32, " in combo and "bf16" in combo, combo
    linked = _one_error(cli(*demo, "--set", "Train Steps.run=x"))
    assert "is connected to node 11 'Train Init'" in linked, linked
    dup = _one_error(cli(*demo, "--set", "Save Image.filename_prefix=x"))
    assert "names 3 nodes" in dup and "Use the node id" in dup, dup


def test_a_failing_node_is_named_with_its_message(place, demo_run, tmp_path):
    """An API-format file (what the frontend's Export (API) writes) whose Train Init refuses its resume value."""
    srv = place.ready()
    flow = tmp_path / "demo_api.json"
    flow.write_text(json.dumps(WF.ui_to_api(WF.read(DEMO), srv.get("/object_info"))))
    proc = cli("run", str(flow), "--server", srv.url, "--only", "Save LoRA", "--set", "Train Init.resume=/etc/passwd")
    msg = _one_error(proc, code=1)
    assert msg.startswith("error: node 11 'Train Init' failed: CheckpointError: ") and "is refused" in msg, msg
    assert "node 15 'Sample Preview'" not in proc.stdout  # --only: the previews were not run
    only = _one_error(cli("run", str(flow), "--server", srv.url, "--only", "Train Steps"))
    assert "node 13 'Train Steps' is not an output node" in only and "14 'Save LoRA'" in only, only
