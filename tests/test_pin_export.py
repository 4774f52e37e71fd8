"""Save LoRA pinned (issue #26): hand-built adapter tensors go into the file in kohya's layout, and ComfyUI's stock
LoRA loader turns the saved file into exactly the analytic delta ``W + alpha/rank * up @ down`` (convolutions
included); EMA weights are the ones saved when asked, in kohya and in the peft layout; the report describes the
file on disk; names are refused at their documented limits; the kohya metadata carries the run's settings."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open


def _run(T, model, tset, tmp_path, adapters, lora, ema=None, **kw):
    state = {"adapters": adapters, **({"ema_adapters": ema} if ema is not None else {})}
    return T.st.TrainRun(model=model, training_set=tset, lora=lora, timesteps=kw.pop("timesteps", T.C.TimestepConfig()),
                         optimizer=kw.pop("optimizer", T.C.OptimizerConfig()),
                         settings=kw.pop("settings", T.st.RunSettings()), run_dir=str(tmp_path / "run"),
                         state=state, **kw)


def _pair(g, out_f, in_f, rank, scale=0.05):
    return (torch.randn(rank, in_f, generator=g) * scale, torch.randn(out_f, rank, generator=g) * scale)


@pytest.fixture(scope="module")
def sd15_pairs(T, sd15):
    """Seeded LoRA pairs (trainer layout: 2-D down/up) for one attention Linear and one 3x3 conv of the tiny
    SD1.5 UNet, their alpha, and the module names."""
    dm = sd15[0].model.diffusion_model
    lin = next(n for n, m in dm.named_modules() if n.endswith("attn1.to_q"))
    conv = next(n for n, s in T.export.conv_shapes(sd15[0]).items() if len(s) == 4 and s[2] == 3 and s[1] > 1)
    g = torch.Generator().manual_seed(3)
    w_lin, w_conv = dm.get_submodule(lin).weight, dm.get_submodule(conv).weight
    rank = 2
    d1, u1 = _pair(g, w_lin.shape[0], w_lin.shape[1], rank)
    d2, u2 = _pair(g, w_conv.shape[0], w_conv[0].numel(), rank)
    ad = {f"{lin}.lora_down.weight": d1, f"{lin}.lora_up.weight": u1, f"{lin}.alpha": torch.tensor(1.0),
          f"{conv}.lora_down.weight": d2, f"{conv}.lora_up.weight": u2, f"{conv}.alpha": torch.tensor(1.0)}
    return ad, lin, conv, rank


def test_conv_shapes_are_the_convolutions_of_any_rank(T):
    """The conv table lists Conv1d/2d/3d weights by module name and no Linear (a hand-built module tree)."""
    import types

    dm = torch.nn.Module()
    dm.lin = torch.nn.Linear(4, 3)
    dm.c1 = torch.nn.Conv1d(4, 5, 3)
    dm.blk = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.GroupNorm(1, 3))
    dm.c3 = torch.nn.Conv3d(2, 2, (1, 2, 2))
    model = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=dm))
    expect = {n: m.weight.shape for n, m in dm.named_modules() if isinstance(m, torch.nn.modules.conv._ConvNd)}
    assert T.export.conv_shapes(model) == expect and set(expect) == {"c1", "blk.0", "c3"}


def test_kohya_layout_of_hand_built_adapters(T):
    g = torch.Generator().manual_seed(0)
    down2, up2 = torch.randn(2, 3 * 3 * 3, generator=g), torch.randn(4, 2, generator=g)
    down1, up1 = torch.randn(2, 5 * 3, generator=g), torch.randn(6, 2, generator=g)  # a Conv1d (6, 5, 3)
    lin_d, lin_u = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
    already = torch.randn(2, 3, 3, 3, generator=g)
    adapters = {"blk.conv.lora_down.weight": down2, "blk.conv.lora_up.weight": up2, "blk.conv.alpha": torch.tensor(3),
                "c1.lora_down.weight": down1, "c1.lora_up.weight": up1,
                "lin.lora_down.weight": lin_d, "lin.lora_up.weight": lin_u, "lin.alpha": torch.tensor(2.0),
                "k4.lora_down.weight": already, "m.hada_w1_a": lin_d, "m.lora_mid.weight": already}
    conv = {"blk.conv": torch.Size([4, 3, 3, 3]), "c1": torch.Size([6, 5, 3]), "k4": torch.Size([2, 3, 3, 3])}
    out = T.export.kohya_from_adapters(adapters, torch.float16, conv, {"lin": "lora_te1_custom"})
    assert set(out) == {"lora_unet_blk_conv.lora_down.weight", "lora_unet_blk_conv.lora_up.weight",
                        "lora_unet_blk_conv.alpha", "lora_unet_c1.lora_down.weight", "lora_unet_c1.lora_up.weight",
                        "lora_te1_custom.lora_down.weight", "lora_te1_custom.lora_up.weight", "lora_te1_custom.alpha",
                        "lora_unet_k4.lora_down.weight", "lora_unet_m.hada_w1_a", "lora_unet_m.lora_mid.weight"}
    # kohya's conv layout: down (rank, in, kh, kw), up (out, rank, 1, 1); Conv1d: (rank, in, k), (out, rank, 1)
    assert torch.equal(out["lora_unet_blk_conv.lora_down.weight"], down2.half().view(2, 3, 3, 3))
    assert torch.equal(out["lora_unet_blk_conv.lora_up.weight"], up2.half().view(4, 2, 1, 1))
    assert torch.equal(out["lora_unet_c1.lora_down.weight"], down1.half().view(2, 5, 3))
    assert torch.equal(out["lora_unet_c1.lora_up.weight"], up1.half().view(6, 2, 1))
    assert torch.equal(out["lora_unet_k4.lora_down.weight"], already.half())  # already 4-D: kept
    assert torch.equal(out["lora_te1_custom.lora_down.weight"], lin_d.half())  # not a conv: 2-D
    assert torch.equal(out["lora_te1_custom.lora_up.weight"], lin_u.half())
    assert out["lora_unet_blk_conv.alpha"].dtype == torch.float32 and float(out["lora_unet_blk_conv.alpha"]) == 3.0
    assert all(v.dtype == torch.float16 for k, v in out.items() if not k.endswith("alpha"))
    assert all(v.is_contiguous() for v in out.values())
    # without the optional tables: plain kohya names, every tensor as it was (no conv reshape)
    plain = T.export.kohya_from_adapters({"a.b.lora_down.weight": down2}, torch.float32)
    assert list(plain) == ["lora_unet_a_b.lora_down.weight"] and torch.equal(plain["lora_unet_a_b.lora_down.weight"],
                                                                               down2)


def test_saved_file_merges_to_the_analytic_delta(T, sd15, sd15_training_set, sd15_pairs, tmp_path):
    import comfy.lora
    import comfy.utils

    ad, lin, conv, rank = sd15_pairs
    model = sd15[0]
    lora = T.C.LoraConfig(algorithm="locon", rank=rank, alpha=1.0, preset="all-linear+conv")
    run = _run(T, model, sd15_training_set, tmp_path, ad, lora, step=7)
    path, report = T.export.save_lora(run, "pin_merge", folder=str(tmp_path / "new" / "loras"), dtype=torch.float32,
                                      base_model_name="tiny_sd15.safetensors")
    assert path.parent == tmp_path / "new" / "loras"  # a folder given as text, created with its parents
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    assert T.export.unmapped_keys(model, sd) == []
    patched = T.export.model_with_lora(model, sd, strength=0.5)
    base = model.model.diffusion_model
    for name in (lin, conv):
        key = f"diffusion_model.{name}.weight"
        w0 = base.get_submodule(name).weight.detach().float()
        w1 = comfy.lora.calculate_weight(patched.patches[key], w0.clone(), key)
        up, down = ad[f"{name}.lora_up.weight"], ad[f"{name}.lora_down.weight"]
        delta = 0.5 * (1.0 / rank) * (up @ down).reshape(w0.shape)
        assert torch.allclose(w1 - w0, delta, atol=1e-6, rtol=1e-4), name
    # the report describes the file on disk
    raw = path.read_bytes()
    assert report["path"] == str(path) and path.name == "pin_merge.safetensors"
    assert report["tensors"] == len(sd) == 6 and report["unmapped"] == 0 and report["steps"] == 7
    assert report["sha256_16"] == hashlib.sha256(raw).hexdigest()[:16]
    assert report["weights"] == "trained" and report["requested"] == "pin_merge.safetensors"
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
    assert report["sshs_model_hash"] == md["sshs_model_hash"]
    assert md["aligned_trainer.weights"] == "trained" and md["aligned_trainer.steps"] == "7"
    assert md["ss_sd_model_name"] == "tiny_sd15.safetensors"
    # a second save keeps the first file, and 'overwrite' replaces it; an unknown if_exists is refused
    again, _ = T.export.save_lora(run, "pin_merge", folder=path.parent, dtype=torch.float32)
    assert again.name == "pin_merge_2.safetensors" and path.read_bytes() == raw
    over, _ = T.export.save_lora(run, "pin_merge", folder=path.parent, dtype=torch.float16,
                                 if_exists="overwrite")
    assert over == path and path.read_bytes() != raw
    with pytest.raises(T.export.ExportError, match="if_exists 'replace' is not one of"):
        T.export.save_lora(run, "pin_x", folder=tmp_path / "loras", if_exists="replace")
    assert not (tmp_path / "loras" / "pin_x.safetensors").exists()


def test_ema_weights_are_the_ones_saved_when_asked(T, sd15, sd15_training_set, sd15_pairs, tmp_path):
    ad, lin, conv, rank = sd15_pairs
    ema = {k: (v * 3 if k.endswith("weight") else v) for k, v in ad.items()}
    lora = T.C.LoraConfig(algorithm="locon", rank=rank, alpha=1.0, preset="all-linear+conv")
    run = _run(T, sd15[0], sd15_training_set, tmp_path, ad, lora, ema=ema)
    as_ema = _run(T, sd15[0], sd15_training_set, tmp_path, ema, lora)  # a run whose trained weights are the EMA
    for fn in (T.export.kohya_state_dict, T.export.file_state_dict):
        with_ema, without = fn(run, torch.float32), fn(run, torch.float32, ema=False)
        expect_ema, expect_raw = fn(as_ema, torch.float32), fn(_run(T, sd15[0], None, tmp_path, ad, lora), torch.float32)
        assert with_ema.keys() == expect_ema.keys() == without.keys()
        assert all(torch.equal(with_ema[k], expect_ema[k]) and torch.equal(without[k], expect_raw[k]) for k in with_ema)
        assert any(not torch.equal(with_ema[k], without[k]) for k in with_ema)
    path, report = T.export.save_lora(run, "pin_ema", folder=tmp_path / "l")
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["aligned_trainer.weights"] == "ema"
    assert report["weights"] == "ema"
    _, report = T.export.save_lora(run, "pin_raw", folder=tmp_path / "l", ema=False)
    assert report["weights"] == "trained"
    # an empty EMA (ema_decay 0 keeps none) falls back to the trained weights
    no_ema = _run(T, sd15[0], sd15_training_set, tmp_path, ad, lora, ema={})
    assert all(torch.equal(a, b) for a, b in zip(T.export.file_state_dict(no_ema).values(),
                                                 T.export.file_state_dict(run, ema=False).values()))
    _, report = T.export.save_lora(no_ema, "pin_noema", folder=tmp_path / "l")
    assert report["weights"] == "trained"


def test_ema_in_the_peft_layout(T, family_bundle, tmp_path):
    """SD3 files are written in diffusers' peft layout (lora_A/lora_B): the EMA choice reaches that path too."""
    model = family_bundle("sd3")[0]
    dm = model.model.diffusion_model
    name = next(n for n, m in dm.named_modules() if n.endswith("attn.proj") and isinstance(m, torch.nn.Linear))
    w = dm.get_submodule(name).weight
    g = torch.Generator().manual_seed(1)
    d, u = _pair(g, w.shape[0], w.shape[1], 2)
    raw = {f"{name}.lora_down.weight": d, f"{name}.lora_up.weight": u, f"{name}.alpha": torch.tensor(2.0)}
    ema = {f"{name}.lora_down.weight": d * 2, f"{name}.lora_up.weight": u * 2, f"{name}.alpha": torch.tensor(2.0)}
    lora = T.C.LoraConfig(rank=2, alpha=2.0)
    run = _run(T, model, None, tmp_path, raw, lora, ema=ema)
    f_ema, f_raw = T.export.file_state_dict(run, torch.float32), T.export.file_state_dict(run, torch.float32, False)
    assert all(".lora_A." in k or ".lora_B." in k for k in f_ema), list(f_ema)
    # peft folds alpha/rank (here 1) into B: lora_B = up, lora_A = down, of the weights asked for
    a_key = next(k for k in f_ema if k.endswith("lora_A.weight"))
    b_key = next(k for k in f_ema if k.endswith("lora_B.weight"))
    assert torch.equal(f_ema[a_key], d * 2) and torch.equal(f_ema[b_key], u * 2)
    assert torch.equal(f_raw[a_key], d) and torch.equal(f_raw[b_key], u)


def test_lora_names_at_their_limits(T):
    assert T.export.check_name("my lora-v1.2_x") == "my lora-v1.2_x.safetensors"
    assert T.export.check_name("a.safetensors") == "a.safetensors"
    edge = "a" * T.export.NAME_MAX
    assert T.export.check_name(edge) == edge + ".safetensors"
    assert T.export.check_name(edge + ".safetensors") == edge + ".safetensors"
    with pytest.raises(T.export.ExportError, match=f"is {T.export.NAME_MAX + 1} characters long; use at most"):
        T.export.check_name(edge + "a")
    for bad in ("", "a/b", "a\\b", "a..b", "..", "-lead", " lead", "a\x00b", "a:b", "ü"):
        with pytest.raises(T.export.ExportError, match="is not allowed: use letters"):
            T.export.check_name(bad)
    # the refused name is shown whole up to 60 characters, longer ones cut to 57 + "..."
    name = "a/" + "b" * 58
    with pytest.raises(T.export.ExportError, match=f"LoRA name '{name}' is not allowed"):
        T.export.check_name(name)
    name = "a/" + "b" * 59
    with pytest.raises(T.export.ExportError, match=f"LoRA name '{name[:57]}\\.\\.\\.' is not allowed"):
        T.export.check_name(name)


@pytest.mark.parametrize("algorithm,module", [("lora", "networks.lora"), ("locon", "networks.lora"),
                                              ("loha", "lycoris.kohya"), ("lokr", "lycoris.kohya")])
def test_kohya_metadata_carries_the_run_settings(T, sd15, sd15_training_set, tmp_path, algorithm, module):
    lora = T.C.LoraConfig(algorithm=algorithm, rank=6, alpha=3.0)
    snr = "min_snr" if algorithm == "lora" else "none"
    run = _run(T, sd15[0], sd15_training_set, tmp_path, {}, lora, step=11,
               timesteps=T.C.TimestepConfig(weighting=snr, min_snr_gamma=4.5, noise_offset=0.05,
                                            multires_iterations=3, multires_discount=0.25),
               optimizer=T.C.OptimizerConfig(name="lion", lr=2e-4, scheduler="cosine"),
               settings=T.st.RunSettings(seed=9, batch_size=2, grad_accum=3, precision="bf16"),
               te_spec={"id": "sd15"}, meta={"dataset_hash": "abc123"})
    md = T.export.metadata(run)
    assert md["ss_network_module"] == module
    assert (md["ss_network_dim"], md["ss_network_alpha"], md["ss_learning_rate"], md["ss_optimizer"],
            md["ss_lr_scheduler"]) == ("6", "3.0", "0.0002", "lion", "cosine")
    assert (md["ss_steps"], md["ss_max_train_steps"], md["aligned_trainer.steps"]) == ("11", "11", "11")
    assert (md["ss_seed"], md["ss_batch_size_per_device"], md["ss_gradient_accumulation_steps"],
            md["ss_mixed_precision"]) == ("9", "2", "3", "bf16")
    assert md["ss_min_snr_gamma"] == ("4.5" if snr == "min_snr" else "")
    assert (md["ss_noise_offset"], md["ss_multires_noise_iterations"], md["ss_multires_noise_discount"]) == \
        ("0.05", "3", "0.25")
    assert md["ss_dataset_hash"] == md["aligned_trainer.dataset_hash"] == "abc123"
    assert md["ss_num_train_images"] == str(len(sd15_training_set)) == "4"
    assert md["ss_training_comment"].endswith("te_spec sd15")
    assert json.loads(md["aligned_trainer.te_spec"]) == {"id": "sd15"}
    assert json.loads(md["aligned_trainer.config"])["lora"]["rank"] == 6
    assert md["aligned_trainer.base_model"] == type(sd15[0].model.model_config).__name__
    assert md["aligned_trainer.prompt_syntax"] == str(sd15_training_set.meta.get("prompt_syntax", ""))


def test_no_trained_weights_is_a_clear_error(T, sd15, sd15_training_set, tmp_path):
    run = _run(T, sd15[0], sd15_training_set, tmp_path, {}, T.C.LoraConfig()).advanced(state=None)
    for fn in (T.export.kohya_state_dict, T.export.file_state_dict):
        with pytest.raises(T.export.ExportError, match="no trained weights yet; run Train Steps first"):
            fn(run)


def test_default_folder_and_unmapped_keys_refused(T, sd15, sd15_training_set, sd15_pairs, tmp_path):
    import ast

    import folder_paths

    ad, lin, conv, rank = sd15_pairs
    lora = T.C.LoraConfig(algorithm="locon", rank=rank, alpha=1.0, preset="all-linear+conv")
    path, _ = T.export.save_lora(_run(T, sd15[0], sd15_training_set, tmp_path, ad, lora), "pin_default")
    try:
        assert path.parent == Path(folder_paths.get_folder_paths("loras")[0])  # ComfyUI's first loras folder
    finally:
        path.unlink()
    # tensors ComfyUI's loader has no use for (not a LoRA part): it would skip their keys, so nothing is written
    ghost = {f"{lin}.junk{i}": torch.ones(2) for i in range(4)}
    with pytest.raises(T.export.ExportError, match="would not map 4 keys") as e:
        T.export.save_lora(_run(T, sd15[0], sd15_training_set, tmp_path, {**ad, **ghost}, lora), "pin_ghost",
                           folder=tmp_path / "g")
    shown = ast.literal_eval(str(e.value).split("(e.g. ")[1].split(")")[0])
    assert len(shown) == 3 and all(".junk" in k for k in shown)
    assert not (tmp_path / "g" / "pin_ghost.safetensors").exists()
