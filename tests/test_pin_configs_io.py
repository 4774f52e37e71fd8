"""train/configs_io.py pinned (issue #26): the parts of config import/export that test_interop_configs.py's whole-file
round trips do not reach, each on a small config written here: how kohya's string values are read (booleans, numbers,
``k = v`` arguments with spaces), what has no equivalent (noted, and the default kept), LyCORIS algorithms, the
ai-toolkit keys that depend on others (EMA, DOP, warmup, rank, conv, LoKr), what the writers emit for settings the
other tool lacks, the file guards (size, kind, parse errors) and how imported settings replace Train Init's widgets.
Run time: well under 1 s in all."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="module")
def IO(comfy):
    return comfy.engine("train.configs_io")


def _kohya(IO, tmp_path, text: str):
    p = tmp_path / "k.toml"
    p.write_text(text)
    return IO.read(p)


def _ait(IO, tmp_path, process: dict, name: str = "job"):
    p = tmp_path / "j.yaml"
    p.write_text(yaml.safe_dump({"job": "extension", "config": {"name": name, "process": [process]}}))
    return IO.read(p)


def test_kohya_strings_are_read_as_sd_scripts_reads_them(IO, tmp_path):
    (lora, opt, ts, s), notes = _kohya(IO, tmp_path, 'network_dim = "32"\ngradient_checkpointing = "yes"\n'
                                                     'optimizer_args = [" weight_decay = 0.02 "]\n'
                                                     'network_args = [" rank_dropout = 0.2 ", "module_dropout=0.1"]\n'
                                                     'lr_warmup_steps = 0.25\nmax_train_steps = 400\n')
    assert (lora.rank, s.gradient_checkpointing, opt.weight_decay) == (32, True, 0.02)
    assert (lora.rank_dropout, lora.module_dropout, opt.warmup_steps) == (0.2, 0.1, 100)
    for spelling, value in (('"1"', True), ('"true"', True), ('"no"', False), ("false", False), ("true", True)):
        (_, _, _, s), _ = _kohya(IO, tmp_path, f"gradient_checkpointing = {spelling}\n")
        assert s.gradient_checkpointing is value, spelling
    with pytest.raises(IO.ConfigError, match="network_alpha|alpha = 'many' is not a number"):
        _kohya(IO, tmp_path, 'network_alpha = "many"\n')
    with pytest.raises(IO.ConfigError, match="is not a number"):
        _kohya(IO, tmp_path, 'train_batch_size = "two"\n')
    # warmup: an int or a float of 1 or more is steps; a float below 1 or "N%" a ratio of max_train_steps (1600 when
    # the file leaves it out, as sd-scripts)
    for given, steps in (('"10%"', 160), ("0.999", 1598), ("1.0", 1), ("5.0", 5), ("30", 30)):
        (_, opt, _, _), _ = _kohya(IO, tmp_path, f"lr_warmup_steps = {given}\n")
        assert opt.warmup_steps == steps, given
    values, _ = IO.read_values(tmp_path / "k.toml")
    assert values["timesteps"]["weighting"] == "none"  # sd-scripts weights no loss unless the file says so


def test_kohya_values_without_an_equivalent_are_noted_and_the_default_kept(IO, tmp_path):
    (lora, opt, ts, _), notes = _kohya(IO, tmp_path, 'optimizer_type = "SGDNesterov"\nweighting_scheme = "shifted"\n'
                                                     'lr_scheduler = "inverse_sqrt"\nnetwork_module = "lycoris.kohya"\n'
                                                     'network_args = ["algo=ia3"]\n')
    assert (opt.name, ts.density, opt.scheduler, lora.algorithm) == ("adamw", "uniform", "constant", "lora")
    for word in ("SGDNesterov", "weighting_scheme 'shifted'", "inverse_sqrt", "algo 'ia3'"):
        assert sum(word in n for n in notes) == 1, (word, notes)
    (_, opt, _, _), _ = _kohya(IO, tmp_path, "use_lion_optimizer = true\n")
    assert opt.name == "lion"
    (_, _, ts, _), _ = _kohya(IO, tmp_path, "debiased_estimation_loss = true\nmin_snr_gamma = 5\n")
    assert ts.weighting == "debiased"
    (_, _, ts, _), _ = _kohya(IO, tmp_path, 'weighting_scheme = "none"\n')
    assert (ts.density, ts.weighting) == ("uniform", "none")


@pytest.mark.parametrize("algo,expect", [("loha", "loha"), ("lokr", "lokr"), ("locon", "locon"), (None, "locon")])
def test_lycoris_algorithms(IO, tmp_path, algo, expect):
    args = f'network_args = ["algo={algo}", "conv_dim=4"]\n' if algo else ""  # conv_dim: LoHa's convs stay LoHa
    (lora, _, _, _), notes = _kohya(IO, tmp_path, f'network_module = "lycoris.kohya"\n{args}')
    assert lora.algorithm == expect and (lora.preset == "all-linear+conv") == (expect == "locon"), lora
    assert not notes or not any("algo" in n for n in notes)
    (lora, _, _, _), _ = _kohya(IO, tmp_path, 'network_args = ["dora_wd=true"]\nnetwork_module = "lycoris.kohya"\n')
    assert lora.dora and lora.dora_axis == "input"


def test_ai_toolkit_keys_that_depend_on_others(IO, tmp_path):
    base = {"type": "sd_trainer", "network": {"type": "lokr", "rank": 12, "alpha": 6},
            "train": {"optimizer": "SGD", "dtype": "int8", "lr_scheduler": "cosine",
                      "lr_scheduler_params": {"num_warmup_steps": 30}, "timestep_type": "weighted",
                      "ema_config": {"use_ema": False, "ema_decay": 0.9}, "diff_output_preservation": False,
                      "diff_output_preservation_multiplier": 2.0, "gradient_accumulation": 1,
                      "gradient_accumulation_steps": 5, "min_snr_gamma": 3.0}}
    (lora, opt, ts, s), notes = _ait(IO, tmp_path, base)
    assert (lora.algorithm, lora.rank, lora.alpha) == ("lokr", 12, 6.0)  # rank: the older spelling; alpha: network.alpha
    assert (opt.name, s.precision, opt.warmup_steps) == ("adamw", "fp32", 0)
    assert (ts.density, ts.weighting, ts.min_snr_gamma) == ("linear", "min_snr", 3.0)
    assert (s.ema_decay, s.dop_weight, s.grad_accum) == (type(s)().ema_decay, type(s)().dop_weight, 5)
    for word in ("optimizer 'SGD'", "train.dtype 'int8'", "num_warmup_steps ignored"):
        assert sum(word in n for n in notes) == 1, (word, notes)
    assert len(notes) == 5, notes  # and the two approximations: timestep_type, min_snr_gamma
    on = json.loads(json.dumps(base))
    on["network"] = {"type": "LoRA", "linear": 8, "conv": 4}
    on["train"].update({"ema_config": {"use_ema": True, "ema_decay": 0.9}, "diff_output_preservation": True,
                        "gradient_accumulation": 2, "timestep_type": "lognorm_blend", "optimizer": "AdamW8Bit",
                        "lr_scheduler": "linear", "steps": 700})
    (lora, opt, ts, s), notes = _ait(IO, tmp_path, on)
    assert (lora.algorithm, lora.preset, lora.rank, lora.alpha) == ("locon", "all-linear+conv", 8, 1.0)
    assert (s.ema_decay, s.dop_weight, s.grad_accum, ts.density) == (0.9, 2.0, 2, "logit_normal")
    assert (opt.name, opt.scheduler, opt.total_steps) == ("adamw8bit", "constant", 700)  # read on after 'linear'
    assert sum("train.lr_scheduler: ai-toolkit's linear" in n for n in notes) == 1, notes


def test_writers_emit_only_what_the_other_tool_has(IO, tmp_path):
    C = IO.SECTIONS
    lora = C["lora"](algorithm="lokr", rank=8, alpha=4, rank_dropout=0.1)
    opt = C["optimizer"](scheduler="cosine", warmup_steps=10, lr=1e-4)
    ts = C["timesteps"](weighting="debiased")
    s = C["settings"](ema_decay=0.0, dop_weight=0.0, run_name="w")
    k = IO.to_kohya(lora, opt, ts, s)
    assert k["network_module"] == "lycoris.kohya" and k["network_args"] == ["algo=lokr", "rank_dropout=0.1"]
    assert k["debiased_estimation_loss"] is True and "min_snr_gamma" not in k and k["lr_scheduler"] == "cosine"
    a = IO.to_ai_toolkit(lora, opt, ts, s)
    proc = a["config"]["process"][0]
    assert a["config"]["name"] == "w" and proc["network"]["type"] == "lokr"
    assert "lr_scheduler" not in proc["train"]  # cosine with warmup has no ai-toolkit equivalent: its default applies
    assert "lr_scheduler_params" not in proc["train"] and "ema_config" not in proc["train"]
    assert "diff_output_preservation" not in proc["train"]
    lora = C["lora"](algorithm="locon", rank=8, alpha=4, preset="all-linear+conv")
    opt = C["optimizer"](scheduler="constant", warmup_steps=10)
    s = C["settings"](ema_decay=0.99, dop_weight=1.5)
    proc = IO.to_ai_toolkit(lora, opt, C["timesteps"](), s)["config"]["process"][0]
    assert proc["network"]["type"] == "lora" and proc["network"]["conv"] == 8
    assert proc["train"]["lr_scheduler"] == "constant_with_warmup"
    assert proc["train"]["lr_scheduler_params"] == {"num_warmup_steps": 10}
    assert proc["train"]["ema_config"] == {"use_ema": True, "ema_decay": 0.99}
    assert proc["train"]["diff_output_preservation"] is True
    k = IO.to_kohya(lora, opt, C["timesteps"](), s)
    assert k["lr_scheduler"] == "constant_with_warmup" and k["network_module"] == "networks.lora"
    assert k["network_args"][:2] == ["conv_dim=8", f"conv_alpha={lora.scale_alpha}"]
    # sd-scripts' spellings: its optimizer and precision names, its weighting_scheme, alpha None written as the rank
    lora = C["lora"](rank=6, alpha=None)
    opt = C["optimizer"](name="adamw8bit")
    for prec, theirs in (("fp32", "no"), ("bf16", "bf16")):
        k = IO.to_kohya(lora, opt, C["timesteps"](density="logit_normal"), C["settings"](precision=prec))
        assert (k["optimizer_type"], k["mixed_precision"], k["weighting_scheme"]) == ("AdamW8bit", theirs,
                                                                                      "logit_normal")
        assert k["network_alpha"] == 6.0 and k["network_dim"] == 6
    k = IO.to_kohya(C["lora"](), C["optimizer"](), C["timesteps"](density="sigmoid"), C["settings"]())
    assert k["weighting_scheme"] == "uniform"  # ai-toolkit's sigmoid has no kohya name
    dora = C["lora"](algorithm="locon", preset="all-linear+conv", rank=8, alpha=4, dora=True)
    assert IO.to_kohya(dora, C["optimizer"](), C["timesteps"](), C["settings"]())["network_args"][:3] == \
        ["algo=lora", "conv_dim=8", "conv_alpha=4.0"]  # LyCORIS's LoCon with DoRA
    # ai-toolkit: alpha None written as the rank, logit-normal as lognorm_blend, the schedules it has
    proc = IO.to_ai_toolkit(lora, C["optimizer"](scheduler="cosine_with_restarts", num_cycles=1),
                            C["timesteps"](density="logit_normal"), C["settings"]())["config"]["process"][0]
    assert (proc["network"]["linear_alpha"], proc["train"]["timestep_type"], proc["train"]["lr_scheduler"]) == \
        (6.0, "lognorm_blend", "cosine")
    for sched, cycles in (("cosine_with_restarts", 2), ("polynomial", 1), ("linear", 1)):
        proc = IO.to_ai_toolkit(lora, C["optimizer"](scheduler=sched, num_cycles=cycles), C["timesteps"](),
                                C["settings"]())["config"]["process"][0]
        assert "lr_scheduler" not in proc["train"], sched
    proc = IO.to_ai_toolkit(lora, C["optimizer"](), C["timesteps"](weighting="weighted"), C["settings"]())
    assert proc["config"]["process"][0]["train"]["timestep_type"] == "weighted"
    text = IO.toml_text({"a": True, "b": 3, "c": 0.5, "d": ["x=1", 2], "e": 'q"t'})
    assert text == 'a = true\nb = 3\nc = 0.5\nd = ["x=1", 2]\ne = "q\\"t"\n'


def test_file_guards(IO, tmp_path):
    big = tmp_path / "big.toml"
    big.write_text("# x\n" * (IO.MAX_BYTES // 4 + 1))
    with pytest.raises(IO.ConfigError, match="larger than"):
        IO.read(big)
    with pytest.raises(IO.ConfigError, match="does not exist"):
        IO.read(tmp_path / "none.toml")
    arr = tmp_path / "a.json"
    arr.write_text("[1, 2]")
    with pytest.raises(IO.ConfigError, match="not a JSON object"):
        IO.read(arr)
    lst = tmp_path / "l.yml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(IO.ConfigError, match="not an ai-toolkit job"):
        IO.read(lst)
    bad = tmp_path / "b.yaml"
    bad.write_text("config: [unclosed\n")
    with pytest.raises(IO.ConfigError, match="cannot be parsed"):
        IO.read(bad)
    ait = tmp_path / "j.json"  # an ai-toolkit job written as JSON is read as one
    ait.write_text(json.dumps({"config": {"name": "n", "process": [{"network": {"linear": 6}}]}}))
    (lora, _, _, s), _ = IO.read(ait)
    assert (lora.rank, s.run_name) == (6, "n")
    with pytest.raises(IO.ConfigError, match="use .toml"):
        IO.write(tmp_path / "x.cfg", *IO.read(ait)[0])
    out = IO.write(tmp_path / "x.json", *IO.read(ait)[0])
    assert json.loads(out.read_text())["network_dim"] == 6


def test_imported_settings_replace_only_those_the_file_sets(IO):
    widgets = IO.SECTIONS["settings"](seed=1, batch_size=2, run_name="w")
    assert IO.apply_settings(widgets, None) is widgets and IO.apply_settings(widgets, {}) is widgets
    got = IO.apply_settings(widgets, {"batch_size": 4, "not_a_setting": 1})
    assert (got.seed, got.batch_size, got.run_name) == (1, 4, "w")


def test_write_overwrites_and_export_run_places_and_names_files(IO, comfy, tmp_path):
    import folder_paths

    C = IO.SECTIONS
    objs = (C["lora"](rank=8), C["optimizer"](), C["timesteps"](), C["settings"](run_name="r"))
    first = IO.write(str(tmp_path / "w.toml"), *objs)  # a str path; written again over itself
    again = IO.write(str(tmp_path / "w.toml"), *(objs[0].__class__(rank=9), *objs[1:]))
    assert first == again and IO.read(str(again))[0][0].rank == 9
    odd = tmp_path / "odd.toml"  # a byte that is not UTF-8 (in a comment) does not stop the import
    odd.write_bytes(b"# caf\xe9\nnetwork_dim = 12\n")
    assert IO.read(odd)[0][0].rank == 12
    edge = tmp_path / "edge.toml"  # exactly the size limit: still read
    edge.write_bytes(b"network_dim = 12\n" + b"#" * (IO.MAX_BYTES - 18) + b"\n")
    assert edge.stat().st_size == IO.MAX_BYTES and IO.read(edge)[0][0].rank == 12

    class Run:
        lora, optimizer, timesteps, settings = objs

    toml, yml = IO.export_run(Run, name="x" * 100, folder=tmp_path / "out")
    assert toml.parent == tmp_path / "out" and toml.name == "x" * 100 + ".toml" and yml.suffix == ".yaml"
    with pytest.raises(IO.ConfigError, match="not allowed"):
        IO.export_run(Run, name="x" * 101, folder=tmp_path / "out")
    toml, _ = IO.export_run(Run)  # ComfyUI's output folder, aligned_trainer/configs, under the run's name
    assert toml.parent == Path(folder_paths.get_output_directory()) / "aligned_trainer" / "configs"
    assert toml.stem.startswith("r")


def test_import_node_validates_and_fingerprints_the_file_in_the_input_folder(IO, comfy):
    import folder_paths

    inp = Path(folder_paths.get_input_directory())
    inp.mkdir(parents=True, exist_ok=True)
    good, bad = inp / "pin_cfg_good.toml", inp / "pin_cfg_bad.toml"
    good.write_text("network_dim = 12\ntrain_batch_size = 3\n")
    lora, _, _, settings, summary = IO.import_config(good.name)
    assert lora.rank == 12 and settings["batch_size"] == 3 and summary["file"] == good.name
    bad.write_text("network_dim = -4\n")  # a rank LoRA Config refuses
    with pytest.raises(IO.ConfigError):
        IO.import_config(bad.name)
    bad.write_text("seed = 1\nguidance_scale = nan\n")  # Train Init's checks: a finite guidance
    with pytest.raises(ValueError):
        IO.import_config(bad.name)
    first = IO.config_fingerprint(good.name)
    assert first == hashlib.sha256(good.read_bytes()).hexdigest()
    assert IO.config_fingerprint("pin_cfg_missing.toml").startswith("missing or too large")
    good.write_bytes(b"#" * (IO.MAX_BYTES + 1))
    assert IO.config_fingerprint(good.name).startswith("missing or too large")
    good.write_bytes(b"#" * IO.MAX_BYTES)
    assert not IO.config_fingerprint(good.name).startswith("missing")
    good.unlink()
    bad.unlink()
