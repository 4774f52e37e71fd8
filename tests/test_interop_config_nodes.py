"""Import Training Config and Export Training Config through the real server (#17): a kohya TOML written from
kohya's documented argument names is imported into the settings Train Init uses (checked field by field), the
run's settings are exported as kohya TOML and ai-toolkit YAML into the output folder, and both files re-import to
the same settings. Paths outside the input folder are refused."""
from __future__ import annotations

import json
import shutil

import pytest

from support.api_nodes import execution_error, node
from support.factories.dataset import make_dataset
from test_interop_configs import KOHYA_TOML

P = "AlignedTrainer_"
RUN = "cfg_roundtrip"


def _summary(entry: dict, node_id: str) -> dict:
    return json.loads(entry["outputs"][node_id]["text"][0])


@pytest.fixture(scope="module")
def imported(server):
    """One run of: Import (kohya TOML) -> Train Init (widgets set to other values) -> Export."""
    # Train Init builds the run's optimizer (its memory plan), and AdamW8bit needs bitsandbytes, which a CPU
    # machine lacks: the server run uses AdamW (the AdamW8bit mapping is checked in test_interop_configs.py)
    toml = KOHYA_TOML.replace('"my_lora"', f'"{RUN}"').replace('"AdamW8bit"', '"AdamW"')
    assert toml.count('optimizer_type = "AdamW"') == 1
    (server.input_dir / "kohya_cfg.toml").write_text(toml)
    make_dataset(server.input_dir / "cfg_ds", n=2, sizes=((64, 64),))
    prompt = {
        "1": node(server, P + "ImportTrainingConfig", config_file="kohya_cfg.toml"),
        "2": node(server, "CheckpointLoaderSimple", ckpt_name="tiny-sd15.safetensors"),
        "3": node(server, P + "Dataset", folder="cfg_ds", resolution=64, min_side=64, max_side=64),
        "4": node(server, P + "CacheLatents", dataset=["3", 0], vae=["2", 2]),
        "5": node(server, P + "CacheTextEmbeddings", latents=["4", 0], clip=["2", 1]),
        "6": node(server, P + "TrainInit", model=["2", 0], training_set=["5", 0], lora_config=["1", 0],
                  timesteps=["1", 1], optimizer=["1", 2], run_settings=["1", 3], seed=7, batch_size=1,
                  precision="fp32", run_name="widget_name", ema_decay=0.5),
        "7": node(server, P + "ExportTrainingConfig", run=["6", 0], name=""),
    }
    entry = server.run(prompt)
    return entry, _summary(entry, "1"), entry["outputs"]["7"]["text"]


@pytest.mark.server
def test_kohya_toml_imports_field_by_field_through_the_server(imported):
    _, s, _ = imported
    lora, opt, ts, run = s["lora"], s["optimizer"], s["timesteps"], s["settings"]
    assert s["file"] == "kohya_cfg.toml"
    # network_module networks.lora + network_args conv_dim -> LoCon on linear+conv layers
    assert (lora["algorithm"], lora["rank"], lora["alpha"], lora["preset"]) == ("locon", 32, 16.0, "all-linear+conv")
    assert (lora["network_dropout"], lora["rank_dropout"], lora["module_dropout"], lora["max_norm"]) == \
        (0.1, 0.1, 0.05, 1.0)
    # unet_lr (2e-4) wins over learning_rate (1e-4), as in kohya
    assert (opt["name"], opt["lr"], opt["weight_decay"], opt["scheduler"]) == \
        ("adamw", 2e-4, 0.05, "cosine_with_restarts")
    assert (opt["warmup_steps"], opt["num_cycles"], opt["total_steps"], opt["grad_clip"]) == (50, 3, 1600, 0.5)
    assert (ts["weighting"], ts["min_snr_gamma"], ts["noise_offset"]) == ("min_snr", 5.0, 0.05)
    assert (ts["multires_iterations"], ts["multires_discount"], ts["min_timestep"], ts["max_timestep"]) == \
        (6, 0.3, 100, 900)
    # only what the file sets: kohya has no EMA, so ema_decay stays Train Init's widget
    assert run == {"seed": 42, "batch_size": 2, "grad_accum": 4, "precision": "bf16", "gradient_checkpointing": True,
                   "run_name": RUN}
    assert any("min_snr_gamma" in n for n in s["notes"])


@pytest.mark.server
def test_exported_run_settings_reimport_to_the_same_settings(server, imported):
    """Train Init took the file's settings over its widgets (seed 7 -> 42, run name, batch size, precision) and kept
    the widget where the file says nothing (ema_decay 0.5): the exported files carry exactly that, and re-import to
    the same settings (the kohya TOML completely, the ai-toolkit YAML on every field ai-toolkit has)."""
    _, first, paths = imported
    toml_path, yaml_path = map(lambda p: server.output_dir.joinpath(*p.split("/")[-3:]), paths)
    assert toml_path.parent == server.output_dir / "aligned_trainer" / "configs"
    assert (toml_path.name, yaml_path.name) == (f"{RUN}.toml", f"{RUN}.yaml")
    for p in (toml_path, yaml_path):
        shutil.copy(p, server.input_dir / p.name)
    entry = server.run({"1": node(server, P + "ImportTrainingConfig", config_file=toml_path.name),
                        "2": node(server, P + "ImportTrainingConfig", config_file=yaml_path.name)})
    again, yaml_s = _summary(entry, "1"), _summary(entry, "2")
    for section in ("lora", "optimizer", "timesteps"):
        assert again[section] == first[section], section
    # every setting kohya has is written, so guidance (Train Init's widget, 1.0) appears; kohya has no EMA
    assert again["settings"] == {**first["settings"], "guidance": 1.0}
    assert yaml_s["settings"]["ema_decay"] == 0.5 and "seed" not in yaml_s["settings"]
    assert {k: v for k, v in yaml_s["settings"].items() if k != "ema_decay"} == \
        {k: v for k, v in first["settings"].items() if k != "seed"}
    assert (yaml_s["lora"]["rank"], yaml_s["lora"]["alpha"], yaml_s["lora"]["algorithm"]) == (32, 16.0, "locon")
    assert (yaml_s["optimizer"]["name"], yaml_s["optimizer"]["lr"], yaml_s["optimizer"]["total_steps"]) == \
        ("adamw", 2e-4, 1600)


@pytest.mark.server
@pytest.mark.parametrize("config_file", ["../kohya_cfg.toml", "/etc/hostname.toml", "~/x.toml"])
def test_config_files_outside_the_input_folder_are_refused(server, imported, config_file):
    err = execution_error(server, {"1": node(server, P + "ImportTrainingConfig", config_file=config_file)})
    assert err["node_type"] == P + "ImportTrainingConfig"
    assert "is not inside a folder this server reads" in err["exception_message"], err["exception_message"]


# (file name, text, words the one error must hold): files a user may be handed, each refused at Import Training
# Config with a message naming the file and what is wrong (before: bare RecursionError / AttributeError /
# OverflowError tracebacks, and out-of-range values that passed and failed later: rank 10**11 as a 128 TB
# allocation at Train Init, a seed past 64 bits as "Overflow when unpacking long long")
HOSTILE_CONFIGS = [
    ("deep.json", "[" * 100_000 + "]" * 100_000, ["deep.json", "nested too deeply"]),
    ("deep.yaml", "config:\n  x: " + "[" * 50_000 + "]" * 50_000 + "\n", ["deep.yaml", "nested too deeply"]),
    ("deep.toml", "a = " + "[" * 50_000 + "]" * 50_000 + "\n", ["deep.toml", "nested too deeply"]),
    ("net_list.yaml", "config:\n  process:\n  - network: [1, 2]\n", ["net_list.yaml", "type or size"]),
    ("inf_steps.yaml", "config:\n  process:\n  - train:\n      steps: .inf\n", ["total_steps", "inf"]),
    ("inf_dim.toml", "network_dim = inf\n", ["rank", "inf"]),
    ("huge_rank.json", '{"network_dim": 99999999999}', ["huge_rank.json", "rank = 99999999999", "LoRA Config"]),
    ("huge_seed.json", '{"seed": 99999999999999999999999}', ["seed = 99999999999999999999999", "Train Init"]),
    ("big_guidance.json", '{"guidance_scale": 1e308}', ["guidance = 1e+308", "Train Init"]),
    ("neg_seed.toml", "seed = -1\n", ["seed = -1", "Train Init"]),
]


@pytest.mark.server
def test_hostile_config_files_are_refused_with_one_clear_error(server):
    for name, text, words in HOSTILE_CONFIGS:
        (server.input_dir / name).write_text(text)
        err = execution_error(server, {"1": node(server, P + "ImportTrainingConfig", config_file=name)})
        assert err["node_type"] == P + "ImportTrainingConfig", (name, err)
        assert err["exception_type"].endswith("ConfigError"), (name, err["exception_type"], err["exception_message"])
        assert all(w in err["exception_message"] for w in words), (name, err["exception_message"][:400])


@pytest.mark.server
def test_an_edited_config_file_is_read_again(server):
    """ComfyUI caches a node's outputs by its inputs; the file name stays the same when the file is edited, so the
    node's fingerprint (the file's content hash) makes the next run read it again."""
    path = server.input_dir / "edited.toml"
    ranks = []
    for dim in (8, 24):
        path.write_text(f"network_dim = {dim}\nnetwork_alpha = 4\n")
        entry = server.run({"1": node(server, P + "ImportTrainingConfig", config_file=path.name)})
        ranks.append(_summary(entry, "1")["lora"]["rank"])
    assert ranks == [8, 24]


def test_export_takes_the_next_free_name_and_writes_atomically(comfy, tmp_path):
    IO = comfy.engine("train.configs_io")
    C, st = comfy.engine("train.config"), comfy.engine("train.state")

    class Run:  # the four settings objects a TrainRun carries
        lora, optimizer, timesteps = C.LoraConfig(rank=8), C.OptimizerConfig(lr=3e-4), C.TimestepConfig()
        settings = st.RunSettings(run_name="n")

    first = IO.export_run(Run, folder=tmp_path)
    second = IO.export_run(Run, folder=tmp_path)
    assert [p.name for p in first + second] == ["n.toml", "n.yaml", "n_2.toml", "n_2.yaml"]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))
    for bad in ("../x", "a/b", ""):
        with pytest.raises(ValueError, match="not allowed"):
            IO.export_run(Run, name=bad if bad else " ", folder=tmp_path)
