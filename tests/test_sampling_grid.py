"""Checkpoint Grid: kohya LoRA files and training checkpoints x prompts, rows by step, cells equal stock
LoraLoader + KSampler renders; Loss Graph from a real training run."""
from __future__ import annotations

import json

import pytest
import torch
from support.factories.lora import cell, kohya_lora, stock_render, write_lora

P = "AlignedTrainer_"
KW = dict(seed=7, seed_mode="fixed", steps=2, cfg=2.0, guidance=3.5, sampler_name="euler", scheduler="normal",
          width=64, height=64)


def test_kohya_files_rows_sorted_by_step_and_equal_stock(comfy, sd15, comfy_dirs):
    model, clip, vae = sd15
    ck, render = comfy.engine("sampling.checkpoints"), comfy.engine("sampling.render")
    folder = comfy_dirs["models"] / "loras" / "ckgrid"
    write_lora(folder / "mylora-000004.safetensors", kohya_lora(model, seed=5))
    write_lora(folder / "mylora-late.safetensors", kohya_lora(model, seed=4), {"ss_steps": "2"})  # step from metadata
    files = ck.resolve("ckgrid")  # a sub-folder of models/loras
    assert [f.name for f in files] == ["mylora-000004.safetensors", "mylora-late.safetensors"]
    assert ck.resolve("ckgrid/mylora-late.safetensors") == [files[1]]
    with pytest.raises(ValueError, match="no_such_folder"):
        ck.resolve("no_such_folder")
    s = render.SampleSettings(steps=2, cfg=2.0, width=64, height=64, seed=7)
    g, labels, geo = ck.checkpoint_grid(model, clip, vae, files, ["ohwx"], "", s)
    assert labels == ["step 2 (mylora-late.safetensors)", "step 4 (mylora-000004.safetensors)"]
    assert len(geo["cell_boxes"]) == 2 and geo["col_labels"] == ["ohwx"]
    cells = []
    for i, name in enumerate(["ckgrid/mylora-late.safetensors", "ckgrid/mylora-000004.safetensors"]):
        (m,) = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)
        ref = stock_render(comfy.nodes, m, clip, vae, "ohwx", "", 7)
        assert (cell(g, geo, i, 0) - ref[0]).abs().max() <= 1 / 255 + 1e-6, name
        cells.append(cell(g, geo, i, 0))
    assert not torch.equal(cells[0], cells[1])


def test_training_checkpoints_grid_and_loss_graph_of_run(comfy, sd15, sd15_training_set):
    model, clip, vae = sd15
    C, st, loop = comfy.engine("train.config"), comfy.engine("train.state"), comfy.engine("train.loop")
    run = loop.init_run(model, sd15_training_set, C.LoraConfig(rank=4, alpha=4), C.TimestepConfig(),
                        C.OptimizerConfig(lr=5e-2), st.RunSettings(run_name="ckgrid_run"))  # output/aligned_trainer/runs
    out = loop.train_steps(run, 2, checkpoint_every=1, keep_last=5, val_every=1)
    folder = loop.default_runs_root() / "ckgrid_run" / "checkpoints"
    grid, rows = comfy.call(P + "CheckpointGrid", model=model, clip=clip, vae=vae, folder=str(folder),
                            prompts="ohwx", negative="", strength=1.0, **KW)
    assert [lab.split(" (")[0] for lab in json.loads(rows)] == ["step 1", "step 2"]
    assert grid.shape[1] > 2 * 64 and grid.shape[2] > 64
    plot_img, summary = comfy.call(P + "LossGraph", run=out, smoothing=0.5)
    s = json.loads(summary)
    assert s["steps"] == 2 and [v[0] for v in s["val"]] == [1, 2] and s["best_val_step"] in (1, 2)
    img2, _ = comfy.call(P + "LossGraph", history_json=json.dumps(list(out.history)), smoothing=0.5)
    assert torch.equal(plot_img, img2)
