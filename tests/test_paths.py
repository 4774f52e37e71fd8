"""Hostile input through the real server (issue #15): path inputs confined to the server's folders with one
refusal message, nothing outside them opened, the allowed-folders settings file, user regexes that cannot
hang the server, and NaN in float inputs refused at their node. Engine-level checks of the path guard and
the bounded walk follow."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from support.api_nodes import node
from support.factories.dataset import make_dataset
from support.server import ComfyServer

P = "AlignedTrainer_"
CANARY_CAPTION = "canary private caption 7f3a"
# catastrophic backtracking on the regex engine too, over ComfyUI module names such as
# "input_blocks.1.1.transformer_blocks.0.attn1.to_q" (about 0.4 s per name on one core; `re` never returns)
EVIL = r"((\w|\.)+(\w|\.)+)+[!#]"

AUDIT_HOOK = '''
import os, sys
_prefix = os.environ["AT_CANARY_DIR"]
_fd = os.open(os.environ["AT_CANARY_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
def _hook(event, args):
    if event in ("open", "os.listdir", "os.scandir") and args:
        p = args[0]
        if isinstance(p, bytes):
            p = p.decode("utf-8", "replace")
        if isinstance(p, os.PathLike):
            p = os.fspath(p)
        if isinstance(p, str) and os.path.abspath(p).startswith(_prefix):
            os.write(_fd, f"{event} {p}\\n".encode())
sys.addaudithook(_hook)
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory, sd15_checkpoint):
    """A server whose every open()/listdir()/scandir() under a canary folder outside its roots is logged by a
    Python audit hook (a sitecustomize on the server's PYTHONPATH), plus the canary and the links into it."""
    base = tmp_path_factory.mktemp("paths")
    outside = base / "outside"                          # not under any root of the server
    canary = make_dataset(outside / "private", n=2).parent     # outside/private (a dataset folder)
    for t in canary.rglob("*.txt"):
        t.write_text(CANARY_CAPTION, encoding="utf-8")
    write_lora_like(outside / "big.safetensors")
    hook_dir = base / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(AUDIT_HOOK)
    log = base / "canary.log"
    log.write_text("")
    loras = base / "loras"
    loras.mkdir()
    srv = ComfyServer(base / "server", model_folders={"checkpoints": sd15_checkpoint.parent, "loras": loras},
                      env={"PYTHONPATH": str(hook_dir), "AT_CANARY_DIR": str(outside), "AT_CANARY_LOG": str(log)})
    srv.input_dir.mkdir(parents=True, exist_ok=True)
    make_dataset(srv.input_dir / "ok_ds", n=2, sizes=((64, 64),))
    for root in (srv.input_dir, loras):
        (root / "link_out").symlink_to(canary, target_is_directory=True)
        (root / "link_missing").symlink_to(outside / "missing", target_is_directory=True)
    (loras / "link_file.safetensors").symlink_to(outside / "big.safetensors")
    srv.start()
    try:
        yield {"srv": srv, "outside": outside, "canary": canary, "log": log, "loras": loras, "base": base}
    finally:
        srv.stop()


def write_lora_like(path: Path) -> None:
    from safetensors.torch import save_file
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(path))


def run_error(srv, prompt: dict, timeout: float = 300) -> dict:
    """Run a prompt that must fail; return ComfyUI's execution_error record (node_type, exception_message); the
    canary caption appears nowhere in its history entry."""
    entry = srv.wait(srv.queue(prompt), timeout)
    errs = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert entry["status"]["status_str"] == "error" and errs, json.dumps(entry["status"])[:2000]
    assert CANARY_CAPTION not in json.dumps(entry)
    return errs[0]


def dataset_prompt(srv, **kw) -> dict:
    ds = node(srv, P + "Dataset", resolution=64, min_side=64, max_side=64, **{"folder": "ok_ds", **kw})
    return {"1": ds, "2": node(srv, "PreviewImage", images=["1", 2])}


def grid_prompt(srv, folder: str) -> dict:
    return {"1": node(srv, "CheckpointLoaderSimple", ckpt_name="tiny-sd15.safetensors"),
            "2": node(srv, P + "CheckpointGrid", model=["1", 0], clip=["1", 1], vae=["1", 2], folder=folder,
                      steps=1, width=64, height=64),
            "3": node(srv, "PreviewImage", images=["2", 0])}


def hostile_values(w, root: Path) -> list[str]:
    """Outside values, each in an existing and a missing flavour: absolute, '..', '~', and a link in ``root``."""
    rel = os.path.relpath(w["canary"], root)
    return [str(w["canary"]), str(w["outside"] / "missing"), rel, rel + "_missing", "~", "~/at_no_such_folder",
            "../" * 12 + "etc", "link_out", "link_missing", "ok_ds/../../outside"]


@pytest.mark.server
def test_every_path_input_refuses_outside_paths_with_one_message(world):
    srv = world["srv"]
    cases = {"Dataset.folder": (lambda v: dataset_prompt(srv, folder=v), srv.input_dir),
             "Dataset.reg_folder": (lambda v: dataset_prompt(srv, reg_folder=v), srv.input_dir),
             "CheckpointGrid.folder": (lambda v: grid_prompt(srv, v), world["loras"]),
             "ImportTrainingConfig.config_file": (lambda v: {"1": node(srv, P + "ImportTrainingConfig",
                                                                        config_file=v)}, srv.input_dir)}
    for label, (make, root) in cases.items():
        values = hostile_values(world, root)
        if label.startswith("CheckpointGrid"):
            values += ["link_file.safetensors", str(world["outside"] / "big.safetensors")]
        messages = {}
        for v in values:
            err = run_error(srv, make(v))
            assert err["node_type"] in (P + "Dataset", P + "CheckpointGrid", P + "ImportTrainingConfig"), err
            messages[v] = err["exception_message"].replace(repr(v), "<value>")
            assert str(world["outside"]) not in messages[v], (label, v, messages[v])
        assert len(set(messages.values())) == 1, (label, json.dumps(messages, indent=1))
        assert "<value>" in next(iter(messages.values()))
    # the good values still work: a dataset in input/ and an absolute path inside it
    ok = srv.wait(srv.queue(dataset_prompt(srv, folder=str(srv.input_dir / "ok_ds"))))
    assert ok["status"]["status_str"] == "success"
    # nothing under the outside folder was opened or listed by the server (audit hook log), during any of it
    assert world["log"].read_text() == ""


@pytest.mark.server
def test_allowed_folders_settings_file_adds_a_root(world):
    srv = world["srv"]
    target = str(world["canary"])
    settings = srv.user_dir / "aligned_trainer_allowed_folders.json"
    err = run_error(srv, dataset_prompt(srv, folder=target))
    assert "aligned_trainer_allowed_folders.json" in err["exception_message"]
    try:
        settings.write_text(json.dumps({"dataset_folders": [str(world["outside"])]}))
        entry = srv.wait(srv.queue(dataset_prompt(srv, folder=target)))
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:2000]
        # the audit hook sees reads there once they are allowed (so its silence in the other test means something)
        assert "open " + str(world["canary"]) in world["log"].read_text()
        settings.write_text("{not json")
        err = run_error(srv, dataset_prompt(srv, folder=target + "/."))
        assert str(settings) in err["exception_message"] and "JSON" in err["exception_message"]
    finally:
        settings.unlink(missing_ok=True)
        world["log"].write_text("")
    err = run_error(srv, dataset_prompt(srv, folder=target + "//"))
    assert "not inside a folder this server reads" in err["exception_message"]


@pytest.mark.server
def test_video_frame_folder_reads_no_linked_frames_from_outside(world):
    """A frame folder (kind video) holding one real frame and links to frames outside the server's folders: the
    links are skipped and noted, not read (before: the folder was listed again without the link check and the
    outside frames were decoded into the clip)."""
    from support.factories import clips

    srv = world["srv"]
    frames = clips.write_clip(world["outside"] / "frames", 5, 16, size=(64, 64), caption=None)
    shot = srv.input_dir / "linked_frames" / "shot"
    shot.mkdir(parents=True)
    (shot.parent / "shot.txt").write_text("ohwx turning", encoding="utf-8")
    for f in sorted(frames.glob("*.png")):                      # 0000-0004: links out, sorted first
        (shot / f.name).symlink_to(f)
    Image.new("RGB", (64, 64), (9, 99, 199)).save(shot / "0005.png")    # one frame of its own
    # buckets of 5 and 1 frames: the clip takes the longest it covers, so its count tells which frames it holds
    prompt = {"1": node(srv, P + "Dataset", folder="linked_frames", kind="video", frame_buckets="1, 5",
                        resolution=64, min_side=64, max_side=64),
              "2": node(srv, "PreviewAny", source=["1", 1])}
    try:
        entry = srv.run(prompt)
        report = json.loads(entry["outputs"]["2"]["text"][0])
        assert report["clips"] == 1 and report["per_frame_count"] == {"1": 1}, report
        skipped = [n for n in report["notes"] if "link that leads outside" in n]
        assert len(skipped) == 5 and all(str(shot) in n for n in skipped), report["notes"]
        assert world["log"].read_text() == ""     # nothing under the outside folder was opened by its own path
    finally:
        world["log"].write_text("")


def slowdown() -> float:
    """How much longer than its CPU time a call may take on this machine now (1 when it is not overloaded):
    the regex engine's timeout counts CPU time, and 2 shared cores at load 10 stretch wall time ~5x."""
    return max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))


def train_prompt(srv, **lora) -> dict:
    return {
        "1": node(srv, "CheckpointLoaderSimple", ckpt_name="tiny-sd15.safetensors"),
        "2": node(srv, P + "Dataset", folder="ok_ds", resolution=64, min_side=64, max_side=64),
        "3": node(srv, P + "CacheLatents", dataset=["2", 0], vae=["1", 2]),
        "4": node(srv, P + "CacheTextEmbeddings", latents=["3", 0], clip=["1", 1]),
        "5": node(srv, P + "LoraConfig", rank=4, alpha=4.0, **lora),
        "6": node(srv, P + "TimestepStrategy"),
        "7": node(srv, P + "Optimizer"),
        "8": node(srv, P + "TrainInit", model=["1", 0], training_set=["4", 0], lora_config=["5", 0],
                  timesteps=["6", 0], optimizer=["7", 0], run_name="paths_regex"),
        "9": node(srv, P + "TrainSteps", run=["8", 0], steps=1),
        "10": node(srv, "PreviewImage", images=["9", 2]),
    }


@pytest.mark.server
def test_catastrophic_exclude_regex_errors_fast_and_server_keeps_answering(world):
    srv = world["srv"]
    warm = srv.wait(srv.queue(train_prompt(srv, exclude="attn2")))   # caches the loader, dataset and caches
    assert warm["status"]["status_str"] == "success", json.dumps(warm["status"])[:3000]
    answered, stop = [], threading.Event()

    def poll():
        while not stop.is_set():
            t = time.monotonic()
            try:
                srv.get("/system_stats", timeout=5)
                srv.get("/queue", timeout=5)
                answered.append(time.monotonic() - t)
            except OSError:            # a frozen server: the request timed out
                answered.append(float("inf"))

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        t0 = time.monotonic()
        err = run_error(srv, train_prompt(srv, exclude=EVIL), timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        th.join(10)
    assert err["node_type"] == P + "TrainInit" and "exclude pattern" in err["exception_message"]
    assert "backtrack" in err["exception_message"] and EVIL in err["exception_message"]
    starts = [m[1]["timestamp"] for m in srv.get("/history")[err["prompt_id"]]["status"]["messages"]
              if m[0] == "execution_start"]
    print(f"regex error after {elapsed:.2f} s wall (queue to error), server {(err['timestamp'] - starts[0]) / 1000:.2f} s;"
          f" {len(answered)} polls, slowest {max(answered):.3f} s; slowdown {slowdown():.1f}")
    # under a second of work: the regex budget plus LoRA Config and Train Init up to its target layers
    assert (err["timestamp"] - starts[0]) / 1000 < 1.0 * slowdown()
    assert elapsed < 10 and answered and max(answered) < 1.0 * slowdown(), (elapsed, answered)


@pytest.mark.server
def test_names_too_long_in_bytes_or_with_line_breaks_are_refused_at_their_node(world):
    """Run and config names are folder and file names: 64 emoji are 64 characters (under the 100 allowed) but 256
    bytes, over the filesystem's 255 (before: a bare OSError 'File name too long' from Train Init / Export Training
    Config); a line break or a leading '.' made odd file names ('a\\nb.toml', '..toml') before."""
    srv = world["srv"]
    emoji = "\U0001F600" * 64
    err = run_error(srv, train_prompt(srv) | {"8": node(srv, P + "TrainInit", **{
        **train_prompt(srv)["8"]["inputs"], "run_name": emoji})})
    assert err["node_type"] == P + "TrainInit", err
    assert "run name" in err["exception_message"] and "256 bytes" in err["exception_message"], err
    configs = srv.output_dir / "aligned_trainer" / "configs"
    for name, why in ((emoji, "256 bytes"), ("a\nb", "control character"), (".", "starts with '.'")):
        prompt = train_prompt(srv)
        prompt["11"] = node(srv, P + "ExportTrainingConfig", run=["9", 0], name=name)
        err = run_error(srv, prompt)
        assert err["node_type"] == P + "ExportTrainingConfig", (name, err)
        assert "config name" in err["exception_message"] and why in err["exception_message"], (name, err)
    assert not configs.exists() or sorted(p.name for p in configs.iterdir()) == []


@pytest.mark.server
def test_too_long_paths_and_damaged_lora_files_get_one_clear_error(world):
    """A path input the filesystem cannot hold (a 300-byte name) and a .safetensors in the loras folder that is not
    one: each refused at its node naming the input (before: bare OSError 'File name too long' from Dataset,
    Checkpoint Grid, Import Training Config and Train Init's init_lora/resume; bare SafetensorError 'header too
    small' from Load LoRA (aligned) and Checkpoint Grid)."""
    srv = world["srv"]
    long = "a" * 300
    cases = {
        "Dataset": dataset_prompt(srv, folder=long),
        "CheckpointGrid": grid_prompt(srv, long),
        "ImportTrainingConfig": {"1": node(srv, P + "ImportTrainingConfig", config_file=long + ".toml")},
        "TrainInit.init_lora": train_prompt(srv) | {"8": node(srv, P + "TrainInit", **{
            **train_prompt(srv)["8"]["inputs"], "init_lora": long})},
        "TrainInit.resume": train_prompt(srv) | {"8": node(srv, P + "TrainInit", **{
            **train_prompt(srv)["8"]["inputs"], "resume": "paths_regex/" + long})},
    }
    for label, prompt in cases.items():
        err = run_error(srv, prompt)
        assert err["node_type"] == P + label.split(".")[0], (label, err)
        assert "is too long" in err["exception_message"] and "255 bytes" in err["exception_message"], (label, err)
    (world["loras"] / "damaged.safetensors").write_bytes(b"")
    try:
        lora = {"1": node(srv, "CheckpointLoaderSimple", ckpt_name="tiny-sd15.safetensors"),
                "2": node(srv, P + "LoadLoraAligned", model=["1", 0], clip=["1", 1],
                          lora_name="damaged.safetensors"),
                "3": node(srv, "PreviewAny", source=["2", 2])}
        for label, prompt in (("LoadLoraAligned", lora), ("CheckpointGrid", grid_prompt(srv, "damaged.safetensors"))):
            err = run_error(srv, prompt)
            assert err["node_type"] == P + label, (label, err)
            assert "damaged.safetensors cannot be read as safetensors" in err["exception_message"], (label, err)
    finally:
        (world["loras"] / "damaged.safetensors").unlink()


@pytest.mark.server
@pytest.mark.parametrize("class_type,fields", [
    ("LoraConfig", ["alpha", "rank_dropout", "module_dropout", "network_dropout", "max_norm"]),
    ("TimestepStrategy", ["logit_mean", "logit_std", "mode_scale", "shift_value", "bias_strength", "min_snr_gamma",
                          "noise_offset", "multires_discount"]),
    ("Optimizer", ["learning_rate", "weight_decay", "beta1", "beta2", "power", "grad_clip", "d_coef"]),
    ("Dataset", ["tag_dropout", "caption_dropout", "reg_weight"]),
    ("TrainInit", ["ema_decay", "guidance", "reg_weight", "dop_weight"]),
])
def test_nan_in_a_float_input_is_refused_at_its_node_naming_the_field(world, class_type, fields):
    srv = world["srv"]
    key = {"LoraConfig": "5", "TimestepStrategy": "6", "Optimizer": "7", "Dataset": "2", "TrainInit": "8"}[class_type]
    for f in fields:
        prompt = train_prompt(srv)
        prompt[key]["inputs"][f] = float("nan")   # JSON NaN: aiohttp's json.loads accepts it
        if f == "reg_weight" and class_type == "Dataset":
            prompt[key]["inputs"]["reg_folder"] = "ok_ds"
        err = run_error(srv, prompt)
        assert err["node_type"] == P + class_type, (f, err)
        assert f in err["exception_message"] and "nan" in err["exception_message"].lower(), (f, err)


# --- engine: the guard and the walk --------------------------------------------------------------------------
@pytest.fixture
def guard(comfy):
    return comfy.engine("paths")


def test_confine_accepts_inside_and_refuses_outside_alike(guard, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "ds").mkdir(parents=True)
    (outside / "secret").mkdir(parents=True)
    real_root = tmp_path / "disk" / "loras"            # a root that is itself a link (models/loras -> other disk)
    real_root.mkdir(parents=True)
    (tmp_path / "linked_root").symlink_to(real_root, target_is_directory=True)
    (root / "in_link").symlink_to(root / "ds", target_is_directory=True)
    (root / "out_link").symlink_to(outside / "secret", target_is_directory=True)
    (root / "dangling").symlink_to(outside / "nothing", target_is_directory=True)
    roots = guard.Roots("test folder", (root, tmp_path / "linked_root"), root, "FIX")
    assert guard.confine("ds", roots) == (root / "ds").resolve()
    assert guard.confine(str(root / "ds"), roots) == (root / "ds").resolve()
    assert guard.confine("ds/../ds", roots) == (root / "ds").resolve()
    assert guard.confine("in_link", roots) == (root / "ds").resolve()
    assert guard.confine("not_yet", roots) == (root / "not_yet").resolve()    # inside: existence is the caller's
    assert guard.confine(str(tmp_path / "linked_root" / "x"), roots) == (real_root / "x").resolve()
    bad = [str(outside / "secret"), str(outside / "nothing"), "../outside/secret", "../outside/nothing", "~", "~/x",
           "out_link", "dangling", "ds/../../outside/secret", "ds\x00", str(real_root)]
    msgs = set()
    for v in bad:
        with pytest.raises(guard.PathRefused) as e:
            guard.confine(v, roots)
        msgs.add(str(e.value).replace(repr(v), "<v>"))
    assert msgs == {"test folder <v> is not inside a folder this server reads. FIX"}


def test_walk_reads_loops_once_skips_links_out_and_stops_at_limits(guard, D, tmp_path):
    root, outside = tmp_path / "in", tmp_path / "out"
    ds = make_dataset(root / "set", n=2, sizes=((64, 64),)).parent
    make_dataset(outside, n=1)
    (ds / "loop").symlink_to(ds, target_is_directory=True)          # set/loop -> set
    (ds / "1_ohwx" / "back").symlink_to(ds, target_is_directory=True)  # deeper than the layout: never followed
    (ds / "1_again").symlink_to(ds / "1_ohwx", target_is_directory=True)
    (ds / "escape").symlink_to(outside / "1_ohwx", target_is_directory=True)
    roots = guard.Roots("dataset folder", (root,), root, "FIX")
    ds_ = D.dataset.from_folder(ds, D.captions.CaptionConfig(), D.buckets.BucketConfig(64, 64, 64, 64), roots=roots)
    rep = ds_.report()
    assert rep["images"] == 2                                        # not 6: the loop and the second link add nothing
    notes = "\n".join(rep["notes"])
    assert "set/loop is a folder already read" in notes and notes.count("is a folder already read") == 2
    assert "escape is a link that leads outside" in notes
    with pytest.raises(guard.PathRefused, match=r"more than 3 entries.*dataset folder itself"):
        guard.walk(ds, roots, max_entries=3)
    with pytest.raises(guard.PathRefused, match="took more than"):
        guard.walk(ds, roots, max_seconds=-1)


def test_unusable_files_are_reported_and_bombs_name_their_file(D, tmp_path):
    folder = tmp_path / "mixed"
    make_dataset(folder, n=1, sizes=((64, 64),))
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (64, 64), "green").save(folder / "still.gif")
    (folder / "vector.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    (folder / "still.txt").write_text(" ".join(["word"] * 300), encoding="utf-8")
    cc, bc = D.captions.CaptionConfig(), D.buckets.BucketConfig(64, 64, 64, 64)
    rep = D.dataset.from_folder(folder, cc, bc).report()
    notes = "\n".join(rep["notes"])
    assert rep["images"] == 2                                        # the PNG and the still GIF
    assert "anim.gif is an animated GIF (2 frames)" in notes and "vector.svg: SVG (vector) images are not" in notes
    assert "long caption:" in notes and "still.gif has 300 words" in notes
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    Image.new("1", (14000, 14000)).save(bomb / "bomb.png")         # 196 M pixels in a few KB
    with pytest.raises(D.images.DataError, match=r"bomb\.png is too large to open safely"):
        D.dataset.from_folder(bomb, cc, bc)
    (bomb / "bomb.png").unlink()
    (bomb / "only.svg").write_text("<svg/>")
    with pytest.raises(D.images.DataError, match=r"no images.*only\.svg: SVG"):
        D.dataset.from_folder(bomb, cc, bc)


def test_user_regex_times_out_within_a_second_on_real_layers(comfy):
    import comfy.ops as ops
    import torch

    C, ad = comfy.engine("train.config"), comfy.engine("train.adapters")
    net = torch.nn.Module()
    net.add_module("x" * 3000, ops.disable_weight_init.Linear(4, 4))
    net.add_module("attn1", ops.disable_weight_init.Linear(4, 4))
    for pattern in (r"(x+x+)+y", EVIL):
        cfg = C.LoraConfig(preset="all-linear", exclude=pattern)
        cfg.validate()
        t, cpu = time.monotonic(), time.thread_time()
        with pytest.raises(C.ConfigError, match="backtracks catastrophically"):
            ad.target_layers(net, cfg)
        assert time.thread_time() - cpu < 1.0 and time.monotonic() - t < 1.0 * slowdown()
    assert ad.target_layers(net, C.LoraConfig(preset="all-linear", exclude="^x")) == ["attn1"]
    with pytest.raises(C.ConfigError, match="include pattern is 1001 characters"):
        C.LoraConfig(include="a" * 1001).validate()
    with pytest.raises(C.ConfigError, match="learning_rate"):
        C.OptimizerConfig(lr=float("nan")).validate()
    with pytest.raises(C.ConfigError, match=r"beta1/beta2 is \(0.9, inf\)"):
        C.OptimizerConfig(betas=(0.9, float("inf"))).validate()
