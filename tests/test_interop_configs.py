"""Run settings from and to kohya sd-scripts TOML and ai-toolkit YAML configs (#17): configs written here from
the tools' documented argument names import field by field, and an exported file re-imports to the same
settings."""
from __future__ import annotations

import pytest

KOHYA_TOML = '''
pretrained_model_name_or_path = "sd15.safetensors"
output_name = "my_lora"
network_module = "networks.lora"
network_dim = 32
network_alpha = 16
network_dropout = 0.1
network_args = ["conv_dim=32", "conv_alpha=16", "rank_dropout=0.1", "module_dropout=0.05"]
learning_rate = 1e-4
unet_lr = 2e-4
optimizer_type = "AdamW8bit"
optimizer_args = ["weight_decay=0.05"]
lr_scheduler = "cosine_with_restarts"
lr_warmup_steps = 50
lr_scheduler_num_cycles = 3
max_train_steps = 1600
max_grad_norm = 0.5
seed = 42
train_batch_size = 2
gradient_accumulation_steps = 4
mixed_precision = "bf16"
gradient_checkpointing = true
min_snr_gamma = 5.0
noise_offset = 0.05
multires_noise_iterations = 6
multires_noise_discount = 0.3
scale_weight_norms = 1.0
min_timestep = 100
max_timestep = 900
'''

AI_TOOLKIT_YAML = '''
job: extension
config:
  name: flux_lora
  process:
    - type: sd_trainer
      training_folder: output
      device: cuda:0
      network:
        type: lora
        linear: 16
        linear_alpha: 8
      save:
        dtype: float16
        save_every: 250
      datasets:
        - folder_path: /data/images
          caption_ext: txt
          resolution: [512, 768]
      train:
        batch_size: 1
        steps: 2000
        gradient_accumulation_steps: 2
        train_unet: true
        gradient_checkpointing: true
        noise_scheduler: flowmatch
        optimizer: adamw8bit
        lr: 1e-4
        optimizer_params:
          weight_decay: 0.0001
        lr_scheduler: cosine
        timestep_type: sigmoid
        dtype: bf16
        max_grad_norm: 1.0
        ema_config:
          use_ema: true
          ema_decay: 0.99
        diff_output_preservation: true
        diff_output_preservation_multiplier: 1.5
      model:
        name_or_path: black-forest-labs/FLUX.1-dev
        is_flux: true
'''


@pytest.fixture(scope="module")
def IO(comfy):
    return comfy.engine("train.configs_io")


def test_kohya_toml_imports_field_by_field(IO, tmp_path):
    path = tmp_path / "kohya.toml"
    path.write_text(KOHYA_TOML)
    (lora, opt, ts, s), notes = IO.read(path)
    assert (lora.algorithm, lora.rank, lora.alpha, lora.preset) == ("locon", 32, 16.0, "all-linear+conv")
    assert (lora.network_dropout, lora.rank_dropout, lora.module_dropout, lora.max_norm) == (0.1, 0.1, 0.05, 1.0)
    assert (opt.name, opt.lr, opt.weight_decay, opt.scheduler) == ("adamw8bit", 2e-4, 0.05, "cosine_with_restarts")
    assert (opt.warmup_steps, opt.num_cycles, opt.total_steps, opt.grad_clip) == (50, 3, 1600, 0.5)
    assert (s.seed, s.batch_size, s.grad_accum, s.precision, s.gradient_checkpointing, s.run_name) == \
        (42, 2, 4, "bf16", True, "my_lora")
    assert (ts.weighting, ts.min_snr_gamma, ts.noise_offset) == ("min_snr", 5.0, 0.05)
    assert (ts.multires_iterations, ts.multires_discount, ts.min_timestep, ts.max_timestep) == (6, 0.3, 100, 900)
    for cfg in (lora, opt, ts):
        cfg.validate()
    assert any("min_snr_gamma" in n for n in notes)


def test_ai_toolkit_yaml_imports_field_by_field(IO, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(AI_TOOLKIT_YAML)
    (lora, opt, ts, s), notes = IO.read(path)
    assert (lora.algorithm, lora.rank, lora.alpha) == ("lora", 16, 8.0)
    assert (opt.name, opt.lr, opt.weight_decay, opt.scheduler, opt.total_steps, opt.grad_clip) == \
        ("adamw8bit", 1e-4, 0.0001, "cosine", 2000, 1.0)
    assert (s.batch_size, s.grad_accum, s.precision, s.gradient_checkpointing, s.ema_decay, s.dop_weight,
            s.run_name) == (1, 2, "bf16", True, 0.99, 1.5, "flux_lora")
    assert ts.density == "sigmoid"
    assert any("diff_output_preservation" in n for n in notes)


@pytest.mark.parametrize("source,target", [("kohya.toml", "out.toml"), ("kohya.toml", "out.json"),
                                           ("kohya.toml", "out.yaml"), ("job.yaml", "out.yaml"),
                                           ("job.yaml", "out.toml")])
def test_export_reimports_to_the_same_settings(IO, tmp_path, source, target):
    src = tmp_path / source
    src.write_text(KOHYA_TOML if source.endswith(".toml") else AI_TOOLKIT_YAML)
    objs, _ = IO.read(src)
    if source.endswith(".toml") and target.endswith(".yaml") or source.endswith(".yaml") and target.endswith(".toml"):
        # across tools only what both sides have survives: compare the fields both map
        both = [(sec, name) for sec, name, k, a, _, _ in IO.FIELDS if k and a]
        out = IO.write(tmp_path / target, *objs)
        again, _ = IO.read(out)
        index = {"lora": 0, "optimizer": 1, "timesteps": 2, "settings": 3}
        for sec, name in both:
            if (sec, name) in (("timesteps", "density"), ("timesteps", "min_snr_gamma"), ("settings", "dop_weight"),
                               ("optimizer", "scheduler"), ("optimizer", "warmup_steps")):
                continue  # approximate across tools (tested on their own below)
            assert getattr(again[index[sec]], name) == getattr(objs[index[sec]], name), (sec, name)
        return
    out = IO.write(tmp_path / target, *objs)
    again, _ = IO.read(out)
    assert again == objs


AI_TOOLKIT_SPELLINGS = '''
job: extension
config:
  name: spellings
  process:
    - type: sd_trainer
      network:
        type: lora
        linear: 8
      train:
        steps: 100
        lr: 1e-4
        dtype: bfloat16
        lr_scheduler: constant_with_warmup
        lr_scheduler_params:
          num_warmup_steps: 20
        gradient_accumulation: 3
'''


def test_ai_toolkit_spellings_as_its_source_reads_them(IO, tmp_path):
    """ai-toolkit's own readings (toolkit/config_modules.py NetworkConfig/TrainConfig, toolkit/train_tools.py
    get_torch_dtype, toolkit/scheduler.py get_lr_scheduler): linear_alpha defaults to network.alpha (1.0), dtype
    'bfloat16' is bf16, warmup lives in lr_scheduler_params.num_warmup_steps of constant_with_warmup, and
    train.gradient_accumulation is its newer accumulation key. Its 'linear' schedule rises (torch LinearLR) and
    is not imported as our linear decay; its cosine_with_restarts restarts only after train.steps."""
    path = tmp_path / "ait.yaml"
    path.write_text(AI_TOOLKIT_SPELLINGS)
    (lora, opt, ts, s), notes = IO.read(path)
    assert (lora.rank, lora.alpha) == (8, 1.0)
    assert (s.precision, s.grad_accum, opt.scheduler, opt.warmup_steps) == ("bf16", 3, "constant", 20)
    out = IO.write(tmp_path / "again.yaml", lora, opt, ts, s)
    again, _ = IO.read(out)
    assert again == (lora, opt, ts, s)
    for theirs, ours in (("linear", "constant"), ("cosine_with_restarts", "cosine"), ("cosine", "cosine")):
        path.write_text(AI_TOOLKIT_SPELLINGS.replace("constant_with_warmup", theirs))
        (_, opt, _, _), notes = IO.read(path)
        assert opt.scheduler == ours and (opt.warmup_steps == 0), (theirs, opt)
        assert theirs == "cosine" or any("lr_scheduler" in n for n in notes), notes


def test_bad_config_files_are_refused(IO, tmp_path):
    bad = tmp_path / "x.ini"
    bad.write_text("a=1")
    with pytest.raises(ValueError, match="toml"):
        IO.read(bad)
    broken = tmp_path / "b.toml"
    broken.write_text("network_dim = = 3")
    with pytest.raises(ValueError, match="cannot be parsed"):
        IO.read(broken)
    empty = tmp_path / "e.yaml"
    empty.write_text("job: extension\n")
    with pytest.raises(ValueError, match="process"):
        IO.read(empty)


KOHYA_SEMANTICS = '''
network_module = "{module}"
network_dim = 8
network_args = ["dora_wd=True"{extra}]
lr_scheduler = "{scheduler}"
lr_warmup_steps = {warmup}
max_train_steps = 500
weighting_scheme = "{scheme}"
'''


@pytest.mark.parametrize("module,scheduler,warmup,scheme,expect", [
    # (imported dora, scheduler, warmup steps, density, weighting)
    ("lycoris.kohya", "constant_with_warmup", "0.1", "uniform", (True, "constant", 50, "uniform", "none")),
    ("networks.lora", "cosine", '"5%"', "cosmap", (False, "cosine", 25, "uniform", "sd3_cosmap")),
    ("networks.lora", "adafactor", "30", "sigma_sqrt", (False, "constant", 30, "uniform", "sd3_sigma_sqrt")),
    ("lycoris.kohya", "polynomial", "0", "logit_normal", (True, "polynomial", 0, "logit_normal", "none")),
    ("lycoris.kohya+wd_on_out", "cosine", "0", "uniform", (True, "cosine", 0, "uniform", "none")),
])
def test_kohya_values_read_and_written_as_sd_scripts_reads_them(IO, tmp_path, module, scheduler, warmup, scheme,
                                                                 expect):
    """kohya sd-scripts' own meanings (checked against its source, docs/interop.md): ``lr_warmup_steps`` below 1 or
    'N%' is a ratio of ``max_train_steps``; its ``constant`` refuses warmup steps (``get_scheduler_fix``), so constant
    with warmup is written ``constant_with_warmup``; ``weighting_scheme`` sigma_sqrt/cosmap are loss weightings,
    uniform/none neither; ``dora_wd`` is LyCORIS's (``networks.lora`` ignores it), so DoRA is written with
    ``lycoris.kohya``; schedulers we lack are noted, not passed on. The exported file re-imports to the same
    settings."""
    module, _, wd_on_out = module.partition("+")  # LyCORIS's wd_on_out=True: DoRA magnitudes per output row
    path = tmp_path / "k.toml"
    path.write_text(KOHYA_SEMANTICS.format(module=module, scheduler=scheduler, warmup=warmup, scheme=scheme,
                                           extra=', "wd_on_out=True"' if wd_on_out else ""))
    (lora, opt, ts, s), notes = IO.read(path)
    assert (lora.dora, opt.scheduler, opt.warmup_steps, ts.density, ts.weighting) == expect
    assert lora.dora_axis == ("output" if wd_on_out else "input")
    assert (module == "networks.lora") == any("dora_wd" in n for n in notes)
    assert (scheduler == "adafactor") == any("adafactor" in n for n in notes)
    assert not any("approximated" in n for n in notes)
    out = IO.write(tmp_path / "out.toml", lora, opt, ts, s)
    import tomllib

    written = tomllib.loads(out.read_text())
    if opt.scheduler == "constant" and opt.warmup_steps:
        assert written["lr_scheduler"] == "constant_with_warmup"
    assert (written["network_module"] == "lycoris.kohya") == lora.dora
    assert ("wd_on_out=True" in written["network_args"]) == bool(wd_on_out)
    assert written["weighting_scheme"] == {"sd3_cosmap": "cosmap", "sd3_sigma_sqrt": "sigma_sqrt"}.get(
        ts.weighting, ts.density)
    again, _ = IO.read(out)
    assert again == (lora, opt, ts, s)


@pytest.mark.parametrize("extra,optimizer", [("", "adamw"), ("use_8bit_adam = true", "adamw8bit")])
def test_kohya_keys_left_out_take_sd_scripts_defaults(IO, tmp_path, extra, optimizer):
    """A kohya config describes the run sd-scripts makes of it, so keys it leaves out take sd-scripts' own defaults
    (48d368f: library/train_util.py argparse, train_network.py network_alpha 1, networks/lora.py network_dim
    None -> 4, get_optimizer "" -> AdamW, or AdamW8bit with the older use_8bit_adam flag), not this pack's."""
    path = tmp_path / "min.toml"
    path.write_text(f'network_module = "networks.lora"\n{extra}\n')
    (lora, opt, ts, s), _ = IO.read(path)
    assert (lora.rank, lora.alpha, lora.network_dropout, lora.max_norm) == (4, 1.0, 0.0, 0.0)
    assert (opt.name, opt.lr, opt.scheduler, opt.warmup_steps, opt.total_steps, opt.grad_clip) == \
        (optimizer, 2e-6, "constant", 0, 1600, 1.0)
    assert (s.batch_size, s.grad_accum, s.precision, s.gradient_checkpointing) == (1, 1, "fp32", False)
    assert (ts.weighting, ts.density, ts.noise_offset, ts.multires_iterations, ts.multires_discount) == \
        ("none", "uniform", 0.0, 0, 0.3)
    assert (ts.min_timestep, ts.max_timestep, ts.logit_mean, ts.logit_std, ts.mode_scale) == (0, 1000, 0.0, 1.0, 1.29)
    # keys the file sets still win
    path.write_text('network_dim = 16\nnetwork_alpha = 8\nlearning_rate = 1e-4\nmin_snr_gamma = 5\n')
    (lora, opt, ts, _), _ = IO.read(path)
    assert (lora.rank, lora.alpha, opt.lr, ts.weighting, ts.min_snr_gamma) == (16, 8.0, 1e-4, "min_snr", 5.0)
