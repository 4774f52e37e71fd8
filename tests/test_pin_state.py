"""Run state and the runs folder pinned (issue #26): checkpoints round-trip any nested state exactly (tuples stay
tuples, int keys stay ints), keep exactly the last K, and refuse foreign, older-format-damaged or incomplete files
with a CheckpointError; the digest notices any single changed name, dtype, shape, byte or metadata entry; run
names are refused at their documented limits; ``claim_run_dir`` takes each documented branch."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file


def _run(T, run_dir, state, step=3, **kw):
    return T.st.TrainRun(model=None, training_set=None, lora=T.C.LoraConfig(), timesteps=T.C.TimestepConfig(),
                         optimizer=T.C.OptimizerConfig(), settings=T.st.RunSettings(), run_dir=str(run_dir),
                         step=step, state=state, **kw)


def _state():
    return {"adapters": {"m.lora_up.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
                         "m.alpha": torch.tensor(4.0)},
            "optimizer": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.full((2,), 0.5, dtype=torch.float64)}},
                          "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99), "params": [0], "nesterov": False,
                                            "name": None}]},
            "scheduler": {"last_epoch": 5, "_last_lr": [0.001]},
            "rng": (torch.tensor([1, 2, 3], dtype=torch.uint8), 7, "py"),
            "empty": torch.zeros(0)}


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_checkpoint_round_trips_nested_state_and_history(T, tmp_path):
    state = _state()
    run = _run(T, tmp_path / "r", state, history=({"step": 1, "loss": 0.5},), te_spec={"id": "sd15"},
               meta={"started_at": 1234.5})
    (path,) = T.st.save_checkpoint(run, keep_last=1)
    assert Path(path) == tmp_path / "r" / "checkpoints" / "step_0000003.safetensors"
    ck = T.st.load_checkpoint(path)
    assert _same(ck["state"], state)
    assert ck["state"]["optimizer"]["state"][0]["exp_avg"].dtype == torch.float64
    assert ck["step"] == 3 and ck["history"] == ({"step": 1, "loss": 0.5},) and ck["te_spec"] == {"id": "sd15"}
    assert ck["config"] == json.loads(json.dumps(run.config_json())) and ck["path"] == str(path) and ck["started_at"] == 1234.5
    assert T.st.load_checkpoint(T.st.save_checkpoint(_run(T, tmp_path / "n", _state()), 1)[0])["started_at"] is None
    # a state without tensors still makes a readable file
    (p2,) = T.st.save_checkpoint(_run(T, tmp_path / "plain", {"scheduler": {"last_epoch": 0}}), keep_last=1)
    assert T.st.load_checkpoint(p2)["state"] == {"scheduler": {"last_epoch": 0}}


def test_keep_last_keeps_exactly_the_newest(T, tmp_path):
    run, kept = _run(T, tmp_path / "k", _state(), step=0), ()
    for step in (1, 2, 3, 4):
        kept = T.st.save_checkpoint(run.advanced(step=step, checkpoints=kept), keep_last=2)
    names = [Path(p).name for p in kept]
    assert names == ["step_0000003.safetensors", "step_0000004.safetensors"]
    assert sorted(p.name for p in (tmp_path / "k" / "checkpoints").iterdir()) == names
    assert T.st.latest_checkpoint(tmp_path / "k").name == names[-1]
    assert [p.name for p in T.st.existing_checkpoints(tmp_path / "k")] == names
    # keep_last 0 keeps them all; re-saving a step does not list it twice
    for step in (5, 6, 6):
        kept = T.st.save_checkpoint(run.advanced(step=step, checkpoints=kept), keep_last=0)
    assert [Path(p).name for p in kept] == [f"step_000000{i}.safetensors" for i in (3, 4, 5, 6)]
    assert T.st.latest_checkpoint(tmp_path / "none_here") is None and T.st.latest_in(tmp_path / "x") is None
    # keep_last 1: only the newest; a listed checkpoint the user already deleted is no error
    (tmp_path / "k" / "checkpoints" / "step_0000005.safetensors").unlink()
    kept = T.st.save_checkpoint(run.advanced(step=7, checkpoints=kept), keep_last=1)
    assert [Path(p).name for p in kept] == ["step_0000007.safetensors"]
    assert [p.name for p in T.st.existing_checkpoints(tmp_path / "k")] == ["step_0000007.safetensors"]


def test_digest_notices_each_single_change(T):
    t = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(0)}
    meta = {"step": "3", "history": "[]"}
    d = T.st.digest(t, meta)
    assert d == T.st.digest({"b": t["b"], "a": t["a"].t().contiguous().t()}, dict(reversed(meta.items())))
    assert d == T.st.digest(t, {**meta, "digest": "anything"})  # the stored digest is not part of itself
    changed = [({"a2": t["a"], "b": t["b"]}, meta), ({**t, "a": t["a"].double()}, meta),
               ({**t, "a": t["a"].reshape(3, 2)}, meta), ({**t, "a": t["a"] + torch.eye(2, 3)}, meta),
               ({**t, "b": torch.zeros(1)}, meta), (t, {**meta, "step": "4"}), (t, {**meta, "step2": "3"}),
               (t, {"step": "3"}), (t, {"step": "3", "history": "[] "})]
    digests = [T.st.digest(a, m) for a, m in changed]
    assert d not in digests and len(set(digests)) == len(digests)


def test_foreign_old_and_incomplete_checkpoints(T, tmp_path, caplog):
    ck = tmp_path / "step_0000001.safetensors"
    save_file({"x": torch.ones(2)}, str(ck), metadata={"format": "something.else"})
    with pytest.raises(T.st.CheckpointError, match="is not an Aligned Trainer checkpoint \\(format 'something.else'\\)"):
        T.st.load_checkpoint(ck)
    save_file({"x": torch.ones(2)}, str(ck))
    with pytest.raises(T.st.CheckpointError, match="format None"):
        T.st.load_checkpoint(ck)
    # v1 (no digest): read, with a warning
    meta = {"format": T.st.FORMAT_V1, "step": "2", "state": '{"__dict__": [["w", {"__tensor__": "x"}]]}', "history": "[]", "config": "{}",
            "te_spec": "null"}
    save_file({"x": torch.ones(2)}, str(ck), metadata=meta)
    with caplog.at_level("WARNING", logger="aligned_trainer"):
        got = T.st.load_checkpoint(ck)
    assert got["step"] == 2 and torch.equal(got["state"]["w"], torch.ones(2)) and "has no digest" in caplog.text
    # v2 with a valid digest but a missing entry: incomplete metadata, the earlier checkpoint suggested
    (tmp_path / "step_0000000.safetensors").write_bytes(b"")
    meta2 = {k: v for k, v in {**meta, "format": T.st.FORMAT}.items() if k != "history"}
    meta2["digest"] = T.st.digest({"x": torch.ones(2)}, meta2)
    save_file({"x": torch.ones(2)}, str(ck), metadata=meta2)
    with pytest.raises(T.st.CheckpointError, match="metadata is incomplete.*step_0000000.safetensors"):
        T.st.load_checkpoint(ck)
    (tmp_path / "step_0000000.safetensors").unlink()
    with pytest.raises(T.st.CheckpointError, match="metadata is incomplete.*set resume to 'none'"):
        T.st.load_checkpoint(ck)
    # the earlier checkpoints named are the last three others, oldest first
    for s in (2, 3, 4, 5):
        (tmp_path / f"step_000000{s}.safetensors").write_bytes(b"")
    with pytest.raises(T.st.CheckpointError) as e:
        T.st.load_checkpoint(ck)
    assert "(step_0000003.safetensors, step_0000004.safetensors, step_0000005.safetensors)" in str(e.value)
    # integer weights are not checked for finiteness; a float inf is
    run = _run(T, tmp_path / "r", {"adapters": {"i": torch.arange(3), "f": torch.tensor([1.0, math.inf])}})
    with pytest.raises(T.st.CheckpointError, match="non-finite adapter weights \\(NaN/inf in f\\).*by step 3"):
        T.st.load_checkpoint(T.st.save_checkpoint(run, 1)[0])


def test_run_names_at_their_limits(T):
    ok = ["a", "my lora-1_x.v2", "a" * T.st.RUN_NAME_MAX, "a.b", "nonee", "Latest"]
    for name in ok:
        assert T.st.check_run_name(name) == name
    bad = {"": "it is empty", "   ": "it is empty", "a\x1fb": "control character", "a\x7fb": "control character",
           "a\tb": "control character", "a/b": "path separator", "a\\b": "path separator", "a..b": "'\\.\\.'",
           ".a": "starts with '.'", "~a": "starts with '.' or '~'", " a": "starts/ends with a space",
           "a ": "starts/ends with a space", "a.": "ends with '.'", "none": "resume keywords",
           "latest": "resume keywords", "a" * (T.st.RUN_NAME_MAX + 1): f"{T.st.RUN_NAME_MAX + 1} characters long"}
    for name, why in bad.items():
        with pytest.raises(T.C.ConfigError, match=why) as e:
            T.st.check_run_name(name)
        assert "Use a plain name" in str(e.value), name
    for name, shown in (("/" + "x" * 59, "/" + "x" * 59), ("/" + "x" * 60, "/" + "x" * 56 + "...")):
        with pytest.raises(T.C.ConfigError) as e:  # shown whole up to 60 characters
            T.st.check_run_name(name)
        assert str(e.value).startswith(f"run name '{shown}' is not allowed"), str(e.value)[:100]
    with pytest.raises(T.C.ConfigError) as e:  # a long name is shown cut to 60 characters
        T.st.check_run_name("x" * 200)
    assert "'" + "x" * 57 + "...'" in str(e.value) and "x" * 58 not in str(e.value)


def test_run_settings_refuse_non_finite(T):
    for bad in (math.nan, math.inf):
        with pytest.raises(T.C.ConfigError, match="ema_decay is .*finite"):
            T.st.RunSettings(ema_decay=bad)
    assert T.st.RunSettings(ema_decay=0.5).ema_decay == 0.5


def _ck(root: Path, run: str, step: int) -> Path:
    p = root / run / "checkpoints" / f"step_{step:07d}.safetensors"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


def test_claim_run_dir_branches(T, tmp_path):
    root = tmp_path / "runs"
    claim = T.st.claim_run_dir
    # a new name: its folder, nothing to resume or delete
    assert claim(root, "new", None, "new_name") == (root / "new", None, [])
    old1, old2, old3 = _ck(root, "r", 1), _ck(root, "r", 2), _ck(root, "r", 3)
    # continuing the run's newest checkpoint reuses the folder whatever if_exists says
    for how in T.st.RUN_IF_EXISTS:
        assert claim(root, "r", old3, how) == (root / "r", old3, [])
    # new_name: the first free numbered folder (a numbered folder with checkpoints is taken)
    assert claim(root, "r", None, "new_name") == (root / "r_2", None, [])
    _ck(root, "r_2", 1)
    (root / "r_3" / "checkpoints").mkdir(parents=True)  # a folder without checkpoints is free
    assert claim(root, "r", old2, "new_name") == (root / "r_3", old2, [])
    # resume: continue the newest; refused when resume names another checkpoint
    assert claim(root, "r", None, "resume") == (root / "r", old3, [])
    with pytest.raises(T.C.ConfigError, match="already has checkpoints \\(newest step_0000003.safetensors\\) and "
                                              "resume names another checkpoint \\(step_0000002.safetensors\\)"):
        claim(root, "r", old2, "resume")
    # overwrite: every old checkpoint deleted, except the one being resumed
    assert claim(root, "r", None, "overwrite") == (root / "r", None, [old1, old2, old3])
    assert claim(root, "r", old2, "overwrite") == (root / "r", old2, [old1, old3])
    with pytest.raises(T.C.ConfigError, match="if_exists 'keep' is not one of"):
        claim(root, "r", None, "keep")


def test_resolve_resume_names(T, tmp_path):
    root = tmp_path / "runs"
    a1, a2 = _ck(root, "a", 1), _ck(root, "a", 2)
    res = T.st.resolve_resume
    assert res("none", root, "a") is None and res("", root, "a") is None and res("  none ", root, "a") is None
    assert res("latest", root, "a") == a2 and res(" a ", root, "a").resolve() == a2.resolve()
    assert res(f"a/checkpoints/{a1.name}", root, "x").resolve() == a1.resolve()
    (root / "empty").mkdir()
    with pytest.raises(T.st.CheckpointError, match="no checkpoint to resume in .*empty"):
        res("empty", root, "a")
    with pytest.raises(T.st.CheckpointError, match="run 'b' is neither a run nor a checkpoint"):
        res("latest", root, "b")
    (root / "a" / "notes.txt").write_text("x")
    with pytest.raises(T.st.CheckpointError, match="'a/notes.txt' is neither"):
        res("a/notes.txt", root, "a")
    with pytest.raises(T.st.CheckpointError, match="is refused"):
        res(str(root), root, "a")  # the runs folder itself
    # a runs folder reached through a link: absolute paths by either spelling are inside
    link = tmp_path / "runs_link"
    link.symlink_to(root, target_is_directory=True)
    assert res(str(a2), link, "a").resolve() == a2.resolve()
    assert res(str(link / "a" / "checkpoints" / a1.name), link, "a").resolve() == a1.resolve()
    # a refused value is shown whole up to 80 characters, longer ones cut to 77 + "..."
    for value, shown in (("/" + "x" * 79, "/" + "x" * 79), ("/" + "x" * 80, "/" + "x" * 76 + "...")):
        with pytest.raises(T.st.CheckpointError) as e:
            res(value, root, "a")
        assert str(e.value).startswith(f"resume '{shown}' is refused"), str(e.value)[:120]
