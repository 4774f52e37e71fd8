"""The README's main job: the shipped demo workflow on a generated tiny SD1.5 and dataset, through the
real ComfyUI server's HTTP API. Used by scripts/demo.py and by the tests."""
from __future__ import annotations

from pathlib import Path

from .boot import make_importable
from .factories import sd15
from .factories.dataset import make_dataset
from .paths import REPO
from .headless import module
from .server import ComfyServer
from .workflow import load, validate

_run = module("run")

DEMO_WORKFLOW = REPO / "workflows" / "demo_train_tiny.json"
DEMO_VAE = "tiny-sd15-vae.safetensors"  # what the tiny-SD1.5 workflows' Load VAE node names


def prepare_inputs(input_dir: Path, checkpoints_dir: Path, vae_dir: Path | None = None) -> None:
    """The tiny checkpoint, its VAE (the workflows' Load VAE node names ``tiny-sd15-vae.safetensors``; ``vae_dir``
    defaults to the ``vae`` folder beside ``checkpoints_dir``) and the captioned dataset the demo workflows name."""
    make_importable()  # the checkpoint is built from ComfyUI's own classes (a fresh clone has no cached file)
    vae_dir = Path(vae_dir) if vae_dir is not None else Path(checkpoints_dir).parent / "vae"
    for folder, name, make in ((checkpoints_dir, "tiny-sd15.safetensors", sd15.checkpoint),
                               (vae_dir, DEMO_VAE, sd15.vae_file)):
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / name
        if not link.exists():
            link.symlink_to(make())
    if not (input_dir / "demo_dataset").exists():
        make_dataset(input_dir / "demo_dataset", n=6, trigger="ohwx", repeats=2)


def run_workflow(server: ComfyServer, path: Path, timeout: float = 900, stream=None,
                 sets: list[str] = ()) -> tuple[dict, float]:
    """Run a shipped workflow the way the headless command does (aligned_trainer/headless/run.py), after
    checking it against the live schemas; ``stream`` shows progress and loss; ``sets`` are the command's
    ``--set NODE.INPUT=VALUE`` overrides."""
    wf = load(path)
    prompt, info, labels = _run.prepare(server, wf, list(sets))
    problems = validate(wf, info)
    if problems:
        raise RuntimeError(f"{path.name} is not valid for this ComfyUI: {problems}")
    res = _run.run_prompt(server, prompt, labels, stream=stream, timeout=timeout)
    return res.entry, res.seconds


def output_files(entry: dict, output_dir: Path) -> list[Path]:
    files = []
    for out in entry.get("outputs", {}).values():
        for img in out.get("images", []):
            if img.get("type") == "output":
                files.append(output_dir / img.get("subfolder", "") / img["filename"])
    return files


def run_demo(base: Path, stream=None) -> dict:
    base = Path(base)
    ckpt_dir = base / "models" / "checkpoints"
    vae_dir = base / "models" / "vae"
    lora_dir = base / "output" / "demo"
    for d in (lora_dir, ckpt_dir, vae_dir):
        d.mkdir(parents=True, exist_ok=True)
    server = ComfyServer(base, model_folders={"checkpoints": ckpt_dir, "vae": vae_dir, "loras": lora_dir}).launch()
    try:
        prepare_inputs(server.input_dir, ckpt_dir, vae_dir)  # generates the tiny model (fresh clone) while ComfyUI boots
        server.wait_ready()
        entry, seconds = run_workflow(server, DEMO_WORKFLOW, stream=stream)
        images = output_files(entry, server.output_dir)
    finally:
        server.stop()
    loras = sorted(lora_dir.glob("*.safetensors"))
    return {"folder": lora_dir, "lora": loras, "images": images, "seconds": seconds, "log": server.log_path}
