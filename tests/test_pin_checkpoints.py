"""Checkpoint Grid inputs pinned (issue #26): a training checkpoint written by Train Steps is read as the LoRA it
holds (kohya keys ComfyUI's stock loader maps completely, the adapter values unchanged, the step from the file), a
kohya file is read as it is with its step, and ``resolve`` finds files by name in the loras folders and in a run's
checkpoints folder. In-process, no sampling (the sampled grid is compared with the stock KSampler in
test_sampling_grid.py)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def ck(comfy):
    return comfy.engine("sampling.checkpoints")


def _adapters(sd15, rank=2):
    dm = sd15[0].model.diffusion_model
    g = torch.Generator().manual_seed(11)
    out = {}
    for name in [n for n, _ in dm.named_modules() if n.endswith(("attn1.to_q", "attn2.to_k"))][:2]:
        w = dm.get_submodule(name).weight
        out[f"{name}.lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g)
        out[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g)
        out[f"{name}.alpha"] = torch.tensor(1.0)
    return out


def test_training_checkpoint_is_read_as_its_lora(comfy, T, ck, sd15, tmp_path):
    adapters = _adapters(sd15)
    run = T.st.TrainRun(model=None, training_set=None, lora=T.C.LoraConfig(rank=2, alpha=1.0),
                        timesteps=T.C.TimestepConfig(), optimizer=T.C.OptimizerConfig(), settings=T.st.RunSettings(),
                        run_dir=str(tmp_path / "run"), step=5,
                        state={"adapters": adapters, "optimizer": {"state": {}, "param_groups": []}})
    (path,) = T.st.save_checkpoint(run, keep_last=1)
    lora, step = ck.read_lora(path)
    assert step == 5
    assert T.export.unmapped_keys(sd15[0], lora) == []  # every key a LoRA part ComfyUI's loader maps
    assert len(lora) == len(adapters) and all(k.startswith("lora_unet_") for k in lora)
    for key, t in adapters.items():
        module, param = T.export._split(key)
        assert torch.equal(lora[f"lora_unet_{module.replace('.', '_')}.{param}"], t.float()), key


def test_kohya_file_is_read_as_it_is(ck, tmp_path):
    t = {"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.alpha": torch.tensor(2.0)}
    save_file(t, str(tmp_path / "my-000012.safetensors"), metadata={"ss_steps": "40"})
    lora, step = ck.read_lora(tmp_path / "my-000012.safetensors")
    assert step == 40 and lora.keys() == t.keys() and all(torch.equal(lora[k], t[k]) for k in t)
    save_file(t, str(tmp_path / "plain-000012.safetensors"))
    assert ck.read_lora(tmp_path / "plain-000012.safetensors")[1] == 12


def test_resolve_finds_names_in_the_loras_and_runs_folders(comfy, ck, comfy_dirs):
    import folder_paths

    loras = comfy_dirs["models"] / "loras" / "pin_ck"
    loras.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.zeros(1)}, str(loras / "one.safetensors"))
    runs = comfy_dirs["output"] / "aligned_trainer" / "runs" / "pin_ck_run" / "checkpoints"
    runs.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.zeros(1)}, str(runs / "step_0000001.safetensors"))
    assert ck.resolve("pin_ck/one.safetensors") == [loras / "one.safetensors"]  # by name, in a loras folder
    assert ck.resolve(str(loras)) == [loras / "one.safetensors"]  # absolute, inside
    assert ck.resolve(str(runs)) == [runs / "step_0000001.safetensors"]  # a run's checkpoints folder
    assert folder_paths.get_output_directory() == str(comfy_dirs["output"])
    for bad in ("~/pin_ck", "pin_ck/../../x.safetensors"):
        with pytest.raises(ValueError, match="LoRA path"):
            ck.resolve(bad)


def test_resolve_relative_names_in_any_root_first_wins_and_no_subfolders(ck, comfy_dirs):
    loras = comfy_dirs["models"] / "loras" / "pin_dup"
    runs = comfy_dirs["output"] / "aligned_trainer" / "runs" / "pin_dup"
    for folder in (loras, runs):
        (folder / "sub").mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.zeros(1)}, str(folder / "x.safetensors"))
        save_file({"w": torch.zeros(1)}, str(folder / "sub" / "deeper.safetensors"))
    save_file({"w": torch.zeros(1)}, str(runs / "only_in_runs.safetensors"))
    assert ck.resolve("pin_dup/x.safetensors") == [loras / "x.safetensors"]  # the loras folder comes first
    assert ck.resolve("pin_dup/only_in_runs.safetensors") == [runs / "only_in_runs.safetensors"]  # relative, runs
    assert ck.resolve("pin_dup") == [loras / "x.safetensors"]  # a folder: its own files, not its sub-folders'



def test_grid_rows_ordered_by_step_with_labels_and_progress(comfy, ck, sd15, comfy_dirs):
    """Rows by step (files without one last, by name), labels and progress per row; each row renders its own
    LoRA (one 1-step 64 px sample per row)."""
    from support.factories.lora import kohya_lora, write_lora

    model, clip, vae = sd15
    render = comfy.engine("sampling.render")
    folder = comfy_dirs["models"] / "loras" / "pin_order"
    files = [write_lora(folder / "b-final.safetensors", kohya_lora(model, seed=1)),
             write_lora(folder / "a-000004.safetensors", kohya_lora(model, seed=2)),
             write_lora(folder / "c.safetensors", kohya_lora(model, seed=3), {"ss_steps": "2"})]
    s = render.SampleSettings(steps=1, cfg=1.0, width=64, height=64, seed=3)
    seen = []
    g, labels, geo = ck.checkpoint_grid(model, clip, vae, files, ["ohwx"], "", s, strength=1.0,
                                        progress=lambda k, msg: seen.append((k, msg)))
    assert labels == ["step 2 (c.safetensors)", "step 4 (a-000004.safetensors)", "b-final.safetensors"]
    assert seen == [(1, "checkpoint 1/3: c.safetensors"), (2, "checkpoint 2/3: a-000004.safetensors"),
                    (3, "checkpoint 3/3: b-final.safetensors")]
    assert geo["cell_labels"] == [["seed 3"]] * 3 and len(geo["cell_boxes"]) == 3
    cells = [g[0, y0:y1, x0:x1] for ((x0, y0, x1, y1),) in geo["cell_boxes"]]
    assert all(not torch.equal(cells[i], cells[j]) for i in range(3) for j in range(i + 1, 3))


def test_grid_leaves_no_lora_patched_model_loaded(comfy, ck, sd15, comfy_dirs):
    """After the grid, no LoRA-patched clone of the base stays in ComfyUI's loaded set (its patches would stay merged
    into the weights the base shares until something else loads)."""
    import comfy.model_management as mm
    from support.factories.lora import kohya_lora, write_lora

    model, clip, vae = sd15
    render = comfy.engine("sampling.render")
    f = write_lora(comfy_dirs["models"] / "loras" / "pin_release" / "r-000002.safetensors", kohya_lora(model, seed=4))
    mm.load_models_gpu([model])
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    ck.checkpoint_grid(model, clip, vae, [f], ["ohwx"], "", render.SampleSettings(steps=1, cfg=1.0, width=64, height=64))
    live = [lm.model for lm in mm.current_loaded_models if lm.model is not None]
    assert not any(p.patches for p in live if p.model is model.model)
    assert all(torch.equal(v, before[k]) for k, v in model.model.diffusion_model.state_dict().items())
