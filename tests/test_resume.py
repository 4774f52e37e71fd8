"""Resume in ComfyUI's execution context (inference mode), checkpoint digests, the runs-folder guard for
``resume``, nothing overwritten silently (Save LoRA, run names), clear errors for bad names and foreign
checkpoints, and output file modes. The same through the real server: tests/test_resume_server.py."""
from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

import pytest
import torch

P = "AlignedTrainer_"


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _init(T, sd15, tset, root, name, resume="none", if_exists="new_name", lora=None, opt=None, **settings):
    return T.loop.init_run(sd15[0], tset, lora or T.C.LoraConfig(rank=4, alpha=4, preset="attention"),
                           T.C.TimestepConfig(), opt or T.C.OptimizerConfig(lr=1e-3),
                           T.st.RunSettings(run_name=name, **settings), resume=resume, runs_root=root,
                           if_exists=if_exists)


@pytest.fixture(scope="module")
def trained(T, sd15, sd15_training_set, tmp_path_factory):
    """A runs folder with run 'base' trained 2 steps (checkpoints at 1 and 2)."""
    root = tmp_path_factory.mktemp("runs")
    run = T.loop.train_steps(_init(T, sd15, sd15_training_set, root, "base"), 2, checkpoint_every=1)
    return root, run


# -- resume under inference mode (how ComfyUI's executor runs every node) ---------------------------------

def test_resume_through_nodes_under_inference_mode_equals_uninterrupted(comfy, T, sd15, sd15_training_set,
                                                                         tmp_path, monkeypatch):
    """Train Init + Train Steps called as ComfyUI runs them (inside torch.inference_mode()), resumed from the
    checkpoint the first Train Steps wrote: 2 + 2 steps equal 4 uninterrupted steps exactly (this failed with
    'Inplace update to inference tensor outside InferenceMode' before)."""
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    lcfg, tcfg = T.C.LoraConfig(rank=4, alpha=4, preset="attention"), T.C.TimestepConfig()
    ocfg = T.C.OptimizerConfig(lr=1e-3, scheduler="cosine", warmup_steps=1, total_steps=4)

    def init(name, resume):
        return comfy.call(P + "TrainInit", model=sd15[0], training_set=sd15_training_set, lora_config=lcfg,
                          timesteps=tcfg, optimizer=ocfg, seed=3, batch_size=1, grad_accum=1, precision="fp32",
                          gradient_checkpointing=False, ema_decay=0.5, guidance=1.0, val_count=0, run_name=name,
                          resume=resume)[0]

    def steps(run, k):
        return comfy.call(P + "TrainSteps", run=run, steps=k, checkpoint_every=0, keep_last=3, val_every=0)[0]

    with torch.inference_mode():
        full = steps(init("full", "none"), 4)
        half = steps(init("half", "none"), 2)
        resumed = init("half", "latest")
        assert resumed.step == 2 and resumed.run_dir == half.run_dir
        done = steps(resumed, 2)
        again = steps(done, 1)  # a chained Train Steps after a resumed one trains on too
    assert done.step == 4 and again.step == 5
    for k, v in full.state["adapters"].items():
        assert torch.equal(v, done.state["adapters"][k]), k
        assert torch.equal(full.state["ema_adapters"][k], done.state["ema_adapters"][k]), k
    assert [h["loss"] for h in full.history] == [h["loss"] for h in done.history]


def test_interrupt_inside_a_forward_pass_checkpoints_a_resumable_state(T, sd15, sd15_training_set, tmp_path):
    """ComfyUI's ops raise the interrupt (POST /interrupt, Cancel) inside the forward pass of the step in
    progress, after it drew its batch, noise and timesteps. The checkpoint holds the last completed step with the
    random state from before the interrupted one: resumed, it continues exactly like an uninterrupted run."""
    import comfy.model_management as mm

    root = tmp_path / "runs"
    done = []
    dm = sd15[0].model.diffusion_model
    hook = dm.input_blocks[1][0].register_forward_hook(
        lambda *a: mm.interrupt_current_processing(True) if len(done) == 2 else None)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            T.loop.train_steps(_init(T, sd15, sd15_training_set, root, "cut"), 10,
                               on_step=lambda r, tr: done.append(r.step))
    finally:
        hook.remove()
        mm.interrupt_current_processing(False)
    assert done == [1, 2]
    (kept,) = T.st.existing_checkpoints(root / "cut")
    resumed = _init(T, sd15, sd15_training_set, root, "cut", resume="latest")
    assert kept.name == "step_0000002.safetensors" and resumed.step == 2
    after = T.loop.train_steps(resumed, 1)
    full = T.loop.train_steps(_init(T, sd15, sd15_training_set, root, "cut_ref"), 3)
    for k, v in full.state["adapters"].items():
        assert torch.equal(v, after.state["adapters"][k]), k
    assert [h["loss"] for h in full.history] == [h["loss"] for h in after.history]


# -- checkpoint digest --------------------------------------------------------------------------------------

def _fake_run(T, run_dir, step=3, lora=None):
    state = {"adapters": {"m.lora_up.weight": torch.arange(64, dtype=torch.float32).reshape(8, 8)},
             "optimizer": {"state": {0: {"exp_avg": torch.ones(8)}}, "param_groups": [{"lr": 1e-3}]}}
    return T.st.TrainRun(model=None, training_set=None, lora=lora or T.C.LoraConfig(), timesteps=T.C.TimestepConfig(),
                         optimizer=T.C.OptimizerConfig(), settings=T.st.RunSettings(), run_dir=str(run_dir),
                         step=step, state=state)


def _data_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_checkpoint_digest_refuses_flipped_bytes_and_nan(T, tmp_path):
    (path,) = T.st.save_checkpoint(_fake_run(T, tmp_path / "r"), keep_last=1)
    path = Path(path)
    ck = T.st.load_checkpoint(path)
    assert ck["step"] == 3 and torch.equal(ck["state"]["adapters"]["m.lora_up.weight"],
                                           torch.arange(64, dtype=torch.float32).reshape(8, 8))
    assert not ck["state"]["adapters"]["m.lora_up.weight"].is_inference()
    good = path.read_bytes()
    start = _data_start(path)
    cases = {"bit flip in the tensor data": (start + 37, lambda b: b ^ 0x01),
             "NaN bytes in the tensor data": (start + 8, None),
             "bit flip in the metadata (history)": (good.index(b'"history"') + 12, lambda b: b ^ 0x04)}
    for what, (at, flip) in cases.items():
        data = bytearray(good)
        if flip is None:
            data[at:at + 4] = torch.tensor([float("nan")]).numpy().tobytes()
        else:
            data[at] = flip(data[at])
        path.write_bytes(bytes(data))
        with pytest.raises(T.st.CheckpointError, match="is damaged") as e:
            T.st.load_checkpoint(path)
        assert path.name in str(e.value) and "resume" in str(e.value), what
    path.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(T.st.CheckpointError, match="is damaged"):
        T.st.load_checkpoint(path)


def test_checkpoint_with_nan_weights_is_refused_even_with_a_valid_digest(T, tmp_path):
    run = _fake_run(T, tmp_path / "r")
    run.state["adapters"]["m.lora_up.weight"][2, 2] = float("nan")
    (path,) = T.st.save_checkpoint(run, keep_last=1)
    with pytest.raises(T.st.CheckpointError, match="non-finite adapter weights"):
        T.st.load_checkpoint(path)


def test_outputs_are_written_with_comfyui_file_mode(T, trained, tmp_path):
    """Checkpoints and LoRAs get 0666 & ~umask (0644 under umask 022), like ComfyUI's saved images; not the
    0600 a temporary file has."""
    import folder_paths

    _, run = trained
    old = os.umask(0o022)
    try:
        ck = Path(T.st.save_checkpoint(_fake_run(T, tmp_path / "m"), keep_last=1)[0])
        lora, _ = T.export.save_lora(run, "mode_check", folder=tmp_path / "loras")
    finally:
        os.umask(old)
    for f in (ck, lora, Path(run.checkpoints[-1])):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert folder_paths  # ComfyUI's own outputs use plain open(): 0666 & ~umask


# -- the resume guard ---------------------------------------------------------------------------------------

def test_resume_guard_refuses_paths_outside_runs_folder_with_one_message(T, trained, tmp_path):
    """Absolute paths, '..', '~', NUL and symlinks leading out of the runs folder: the same message whether or
    not the target exists, and nothing outside is opened."""
    root, run = trained
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.safetensors"
    secret.write_bytes(Path(run.checkpoints[-1]).read_bytes())  # a valid checkpoint, but outside
    (root / "link_out").symlink_to(secret)
    (root / "link_dangling").symlink_to(outside / "missing.safetensors")
    (root / "dir_out").symlink_to(outside, target_is_directory=True)
    pairs = [  # (target exists, target does not exist)
        (str(secret), str(outside / "missing.safetensors")),
        ("/etc/shadow", "/etc/no_such_file_here"),
        (f"../{outside.name}/secret.safetensors", f"../{outside.name}/missing.safetensors"),
        (f"base/../../{outside.name}/secret.safetensors", f"base/../../{outside.name}/missing.safetensors"),
        ("~/.bashrc", "~/no_such_file_here"),
        ("~root/.profile", "~nobody_here/x"),
        ("link_out", "link_dangling"),
        ("dir_out/secret.safetensors", "dir_out/missing.safetensors"),
        ("base/checkpoints/\x00../../etc/shadow", "base\x00"),
    ]
    for exists, missing in pairs:
        msgs = []
        for value in (exists, missing):
            with pytest.raises(T.st.CheckpointError) as e:
                T.st.resolve_resume(value, root, "base")
            msgs.append(re.sub(r"^resume .* is refused", "resume <value> is refused", str(e.value), flags=re.S))
        assert msgs[0] == msgs[1], (exists, missing, msgs)
        assert "is refused" in msgs[0] and "inside the runs folder" in msgs[0]
    # what is allowed: keywords, run names, checkpoint files inside (relative or absolute), symlinks staying inside
    (root / "link_in").symlink_to(root / "base", target_is_directory=True)
    newest = Path(run.checkpoints[-1]).resolve()
    assert T.st.resolve_resume("none", root, "base") is None
    for value in ("latest", "base", "base/checkpoints", f"base/checkpoints/{newest.name}", str(newest), "link_in"):
        assert T.st.resolve_resume(value, root, "base").resolve() == newest, value
    with pytest.raises(T.st.CheckpointError, match="neither a run nor a checkpoint"):
        T.st.resolve_resume("no_such_run", root, "base")


def test_resume_refusal_at_train_init(T, sd15, sd15_training_set, trained):
    root, _ = trained
    for value in ("/etc/shadow", "../x", "~/x"):
        with pytest.raises(T.st.CheckpointError, match="is refused"):
            _init(T, sd15, sd15_training_set, root, "other", resume=value)


# -- nothing overwritten silently ---------------------------------------------------------------------------

def test_save_lora_keeps_existing_file_by_default(comfy, T, trained, comfy_dirs):
    _, run = trained
    loras = comfy_dirs["models"] / "loras"
    first = Path(comfy.call(P + "SaveLora", run=run, name="keep_me", dtype="fp32")[0])
    before = _sha(first)
    second = Path(comfy.call(P + "SaveLora", run=run, name="keep_me", dtype="fp16")[0])
    third = Path(comfy.call(P + "SaveLora", run=run, name="keep_me.safetensors", dtype="fp16")[0])
    assert first == loras / "keep_me.safetensors" and _sha(first) == before
    assert second.name == "keep_me_2.safetensors" and third.name == "keep_me_3.safetensors"
    assert _sha(second) != before
    over = Path(comfy.call(P + "SaveLora", run=run, name="keep_me", dtype="fp16", if_exists="overwrite")[0])
    from safetensors.torch import load_file

    a, b = load_file(first), load_file(second)  # (safetensors orders header metadata freely: compare tensors)
    assert over == first and _sha(first) != before and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(loras.glob("*.tmp")) and not list(loras.glob(".*.tmp"))


def test_reused_run_name_keeps_the_old_run(T, sd15, sd15_training_set, trained):
    root, run = trained
    old = {p: _sha(p) for p in map(Path, run.checkpoints)}
    newest = max(old)
    # default: a new folder, the old run's checkpoints untouched, its 'latest' still its own
    fresh = _init(T, sd15, sd15_training_set, root, "base", seed=7)
    assert Path(fresh.run_dir).name == "base_2" and fresh.step == 0 and fresh.checkpoints == ()
    T.loop.train_steps(fresh, 3, checkpoint_every=3)
    assert {p: _sha(p) for p in old} == old
    assert T.st.latest_checkpoint(root / "base") == newest
    assert T.st.latest_checkpoint(root / "base_2").name == "step_0000003.safetensors"
    # a third run takes base_3; if_exists='resume' continues base's newest checkpoint
    assert Path(_init(T, sd15, sd15_training_set, root, "base").run_dir).name == "base_3"
    cont = _init(T, sd15, sd15_training_set, root, "base", if_exists="resume")
    assert Path(cont.run_dir).name == "base" and cont.step == 2
    # an explicit older checkpoint of the run continues in a new folder (the newer one is not shadowed)
    older = min(old)
    branch = _init(T, sd15, sd15_training_set, root, "base", resume=f"base/checkpoints/{older.name}")
    assert Path(branch.run_dir).name == "base_3" and branch.step == 1
    assert {p: _sha(p) for p in old} == old


def test_overwrite_replaces_the_old_run_only_when_asked(T, sd15, sd15_training_set, tmp_path):
    root = tmp_path / "runs"
    T.loop.train_steps(_init(T, sd15, sd15_training_set, root, "ow"), 2, checkpoint_every=1)
    assert len(T.st.existing_checkpoints(root / "ow")) == 2
    with pytest.raises(T.C.ConfigError, match="rank must be"):  # a failing check deletes nothing
        _init(T, sd15, sd15_training_set, root, "ow", if_exists="overwrite", lora=T.C.LoraConfig(rank=0, alpha=None))
    assert len(T.st.existing_checkpoints(root / "ow")) == 2
    run = _init(T, sd15, sd15_training_set, root, "ow", if_exists="overwrite")
    assert Path(run.run_dir).name == "ow" and T.st.existing_checkpoints(root / "ow") == []
    T.loop.train_steps(run, 1, checkpoint_every=1)
    assert _init(T, sd15, sd15_training_set, root, "ow", resume="latest").step == 1


# -- bad values: one clear error at Train Init / Save LoRA ---------------------------------------------------

@pytest.mark.parametrize("name,why", [
    ("a\x00b", "control character"), ("a/b", "path separator"), ("a\\b", "path separator"), ("..", "path separator"),
    ("x" * 300, "300 characters long"), ("", "empty"), (".hidden", "starts with '.'"), ("latest", "resume keywords"),
])
def test_bad_run_names_fail_at_train_init(comfy, T, sd15, sd15_training_set, tmp_path, name, why):
    with pytest.raises(T.C.ConfigError, match=why) as e:
        _init(T, sd15, sd15_training_set, tmp_path, name)
    assert "plain name" in str(e.value) and len(str(e.value)) < 600
    assert not any(tmp_path.iterdir())  # nothing created


@pytest.mark.parametrize("name,match", [("x" * 300, "300 characters long"), ("a..b", "not allowed"),
                                        ("a\x00b", "not allowed"), ("../up", "not allowed")])
def test_bad_lora_names_fail_at_save_lora(comfy, T, trained, comfy_dirs, name, match):
    _, run = trained
    before = sorted(p.name for p in (comfy_dirs["models"] / "loras").iterdir())
    with pytest.raises(T.export.ExportError, match=match):
        comfy.call(P + "SaveLora", run=run, name=name, dtype="fp16")
    assert sorted(p.name for p in (comfy_dirs["models"] / "loras").iterdir()) == before


@pytest.mark.parametrize("change,match", [
    (dict(lora=dict(rank=8, alpha=8)), "rank = 4, this run has rank = 8"),
    (dict(lora=dict(algorithm="loha")), "algorithm = 'lora'"),
    (dict(lora=dict(preset="attention+mlp")), "does not fit this run's layers"),
    (dict(lora=dict(exclude="attn1")), "does not fit this run's layers"),
    (dict(opt=dict(name="lion")), "optimizer 'adamw'"),
])
def test_incompatible_checkpoint_fails_at_train_init(T, sd15, sd15_training_set, trained, change, match):
    root, _ = trained
    lora = T.C.LoraConfig(**{"rank": 4, "alpha": 4, "preset": "attention", **change.get("lora", {})})
    opt = T.C.OptimizerConfig(**{"lr": 1e-3, **change.get("opt", {})})
    with pytest.raises(T.st.CheckpointError, match=match) as e:
        _init(T, sd15, sd15_training_set, root, "x", resume="base", lora=lora, opt=opt)
    assert "step_0000002.safetensors" in str(e.value) and "resume" in str(e.value)


def test_checkpoint_of_another_family_fails_at_train_init(T, sd15, sd15_training_set, tmp_path):
    """A FLUX.1 run's checkpoint resumed on SD1.5: refused at Train Init, naming both text-encoder specs or the
    layers that do not match."""
    import dataclasses

    root = tmp_path / "runs"
    lora = T.C.LoraConfig(rank=4, alpha=4, preset="attention")
    flux = dataclasses.replace(_fake_run(T, root / "flux", lora=lora), te_spec={"id": "flux1-dev"},
                               state={"adapters": {"double_blocks.0.img_attn.qkv.lora_up.weight": torch.zeros(4, 4)}})
    T.st.save_checkpoint(flux, keep_last=1)
    tset = dataclasses.replace(sd15_training_set, te_spec_id="sd15")
    with pytest.raises(T.st.CheckpointError, match="'flux1-dev' \\(another model family\\).*'sd15'"):
        _init(T, sd15, tset, root, "x", resume="flux")
    with pytest.raises(T.st.CheckpointError, match="does not fit this run's layers"):
        _init(T, sd15, sd15_training_set, root, "x", resume="flux")
