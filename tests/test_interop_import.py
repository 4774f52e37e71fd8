"""Starting a run from LoRA files written by other trainers (#17): a file in kohya sd-scripts' SD1.5 layout and
one written by diffusers' own ``save_lora_weights`` from a peft adapter start a run whose model, before the
first step, gives the same output as ComfyUI's stock loader with that file; training then continues."""
from __future__ import annotations

import pytest
import torch

from support.factories import diffusers_ref as R
from support.factories.lora import kohya_lora, write_lora
from test_interop_diffusers import _inputs, comfy_unet_out


def _init(T, sd15, tset, tmp_path, lora, init_lora, name, **settings):
    return T.loop.init_run(sd15[0], tset, lora, T.C.TimestepConfig(), T.C.OptimizerConfig(lr=1e-3),
                           T.st.RunSettings(run_name=name, **settings), runs_root=tmp_path / "runs",
                           init_lora=str(init_lora))


def _run_output(T, run):
    """The diffusion model's output with the run's adapters as the trainer runs them (activation hooks)."""
    with torch.inference_mode(False):
        trainer = T.loop.Trainer(run)
        for a in trainer.adapters.values():
            a.eval()
        x, t, ctx = _inputs()
        with trainer.hooked(), torch.no_grad():
            return trainer.patcher.model.diffusion_model(x, timesteps=t, context=ctx).float()


def _check_start_and_continue(T, sd15, run, ref, tol, visible=1e-2):
    """``ref``: the output of the file's LoRA as its own loader applies it."""
    assert run.step == 0 and run.state is not None
    ours = _run_output(T, run)
    base = comfy_unet_out(T, sd15[0], {})
    assert (ref - base).abs().max() > visible, "the imported LoRA must visibly change the output"
    assert float((ours - ref).abs().max()) < tol
    after = T.loop.train_steps(run, 1)
    assert torch.isfinite(torch.tensor(after.history[-1]["loss"]))
    assert any(not torch.equal(after.state["adapters"][k], v) for k, v in run.state["adapters"].items())


@pytest.fixture
def loras(comfy_dirs):
    """ComfyUI's loras folder (init_lora reads only there and in the runs folder)."""
    return comfy_dirs["models"] / "loras"


def test_kohya_sd15_file_starts_a_run(T, sd15, sd15_training_set, tmp_path, loras):
    sd = kohya_lora(sd15[0], seed=11, rank=4, scale=2.0)  # kohya's SD1.5 names: lora_unet_down_blocks_...
    assert any(k.startswith("lora_unet_down_blocks_") for k in sd)
    sd = {k: (v * 0.5 if k.endswith(".alpha") else v) for k, v in sd.items()}  # alpha 2 of rank 4
    path = write_lora(loras / "imp_kohya_sd15.safetensors", sd, {"ss_network_module": "networks.lora"})
    lora = T.C.LoraConfig(rank=4, alpha=4, preset="all-linear")  # another alpha than the file's: folded in
    run = _init(T, sd15, sd15_training_set, tmp_path, lora, path.name, "imp_kohya")  # a name in models/loras
    assert run.meta["init_lora"] == path.name
    _check_start_and_continue(T, sd15, run, comfy_unet_out(T, sd15[0], sd), 1e-5)


def test_peft_diffusers_file_starts_a_run(T, sd15, sd15_checkpoint, sd15_training_set, tmp_path, loras):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = R.sd15_unet(sd15_checkpoint.resolve())
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    StableDiffusionPipeline.save_lora_weights(loras / "imp_peft", unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)
    path = loras / "imp_peft" / "pytorch_lora_weights.safetensors"
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(path))
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in sd)
    x, t, ctx = _inputs()
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx).sample  # the LoRA as diffusers/peft apply it
    # ComfyUI 0.3.75's stock loader maps none of these keys (it knows diffusers' attention-processor names,
    # ``attn1.processor.to_q``, not peft's ``attn1.to_q``): the import does not depend on it
    assert torch.equal(comfy_unet_out(T, sd15[0], sd), comfy_unet_out(T, sd15[0], {}))
    lora = T.C.LoraConfig(rank=4, alpha=4, preset="attention")
    run = _init(T, sd15, sd15_training_set, tmp_path, lora, path, "imp_peft")
    _check_start_and_continue(T, sd15, run, ref, 1e-4, visible=1e-3)


def test_bad_init_lora_files_are_refused(T, sd15, sd15_training_set, tmp_path, loras):
    sd = kohya_lora(sd15[0], seed=11, rank=4)
    path = write_lora(loras / "imp_r4.safetensors", sd)
    with pytest.raises(T.C.ConfigError, match="rank is 4 .* set rank to 4"):
        _init(T, sd15, sd15_training_set, tmp_path, T.C.LoraConfig(rank=8, alpha=8, preset="all-linear"), path, "b1")
    with pytest.raises(T.C.ConfigError, match="does not .*widen"):
        _init(T, sd15, sd15_training_set, tmp_path, T.C.LoraConfig(rank=4, alpha=4, preset="attention"), path, "b2")
    bogus = write_lora(loras / "imp_bogus.safetensors", {"lora_te_text_model_x.lora_down.weight": torch.zeros(4, 8)})
    with pytest.raises(T.C.ConfigError, match="match no module"):
        _init(T, sd15, sd15_training_set, tmp_path, T.C.LoraConfig(rank=4, alpha=4), bogus, "b3")
    with pytest.raises(T.C.ConfigError, match="not a LoRA file in ComfyUI's loras folder"):
        _init(T, sd15, sd15_training_set, tmp_path, T.C.LoraConfig(rank=4, alpha=4), "nope.safetensors", "b4")


def test_init_lora_reads_only_the_loras_folders(T, comfy, sd15, sd15_training_set, tmp_path, loras):
    """A path outside the loras/runs folders is refused with one message whether or not the file exists (a real
    LoRA outside, a missing one, ``..``, ``~``, a link out of the loras folder)."""
    outside = write_lora(tmp_path / "outside.safetensors", kohya_lora(sd15[0], seed=11, rank=4))
    (loras / "imp_link_out.safetensors").unlink(missing_ok=True)
    (loras / "imp_link_out.safetensors").symlink_to(outside)
    guard = comfy.engine("paths")
    msgs = set()
    for bad in (str(outside), str(tmp_path / "missing.safetensors"), "../../outside.safetensors",
                "../../missing.safetensors", "~/outside.safetensors", "imp_link_out.safetensors"):
        with pytest.raises(guard.PathRefused) as e:
            _init(T, sd15, sd15_training_set, tmp_path, T.C.LoraConfig(rank=4, alpha=4, preset="all-linear"), bad,
                  "b5")
        msgs.add(str(e.value).replace(repr(bad), "<value>"))
    assert len(msgs) == 1, msgs
