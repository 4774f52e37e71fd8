"""Starting from a LoRA file (train/interop.py, Train Init ``init_lora``) pinned against ComfyUI itself (issue #26):
hand-built files on the tiny SD3 and SD1.5 are read into adapter entries whose merged weights (W + alpha/rank
up @ down, DoRA by hand) equal the weights ComfyUI's own loader patches for the same file (``comfy.lora.load_lora``
with the model's own key map, ``comfy.lora.calculate_weight``): SD3's per-slice to_q/to_k/to_v LoRAs joined into the
fused qkv, the adaLN rows ComfyUI swaps, conv LoRAs (3x3 down, 1x1 up), the file's alpha/rank against the run's,
kohya ``dora_scale`` on both axes, peft ``lora_magnitude_vector`` (per slice, joined), peft names without a prefix;
and the refusals, each with its message."""
from __future__ import annotations

import logging

import pytest
import torch


def _module(key: str) -> str:
    return key[len("diffusion_model."):-len(".weight")]


def comfy_weights(model, sd: dict) -> dict[str, torch.Tensor]:
    """module -> the weight ComfyUI patches for ``sd``: its key map, load_lora, ModelPatcher, calculate_weight."""
    import comfy.lora

    patches = comfy.lora.load_lora(sd, comfy.lora.model_lora_keys_unet(model.model, {}), log_missing=False)
    mp = model.clone()
    mp.add_patches(patches, 1.0)
    state = model.model.state_dict()
    return {_module(k): comfy.lora.calculate_weight(p, state[k].float().clone(), k) for k, p in mp.patches.items()}


def our_weights(model, out: dict) -> dict[str, torch.Tensor]:
    """module -> W + alpha/rank * up @ down (the 2-D matrices the entries hold), DoRA applied by hand: a ``dora_scale``
    (1, in) scales the columns of W + dW to it, a magnitude (out,) the rows."""
    state = model.model.state_dict()
    res = {}
    for key in out:
        if not key.endswith(".lora_up.weight"):
            continue
        m = key[:-len(".lora_up.weight")]
        up, down, alpha = out[key], out[f"{m}.lora_down.weight"], out[f"{m}.alpha"]
        assert up.ndim == 2 and down.ndim == 2 and up.shape[1] == down.shape[0]
        w = state[f"diffusion_model.{m}.weight"].float()
        wc = w + (float(alpha) / down.shape[0] * (up @ down)).reshape(w.shape)
        eps = torch.finfo(torch.float32).eps
        if f"{m}.dora_scale" in out:
            wc = wc * out[f"{m}.dora_scale"] / (wc.norm(dim=0, keepdim=True) + eps)
        if f"{m}.dora_magnitude" in out:
            mag = out[f"{m}.dora_magnitude"]
            assert mag.shape == (w.shape[0],)
            wc = wc * (mag / (wc.reshape(w.shape[0], -1).norm(dim=1) + eps)).reshape(-1, *[1] * (w.ndim - 1))
        res[m] = wc
    return res


def _same(ours: dict, ref: dict, tol=2e-5):
    assert sorted(ours) == sorted(ref)
    for m in ref:
        assert ours[m].shape == ref[m].shape, m
        assert float((ours[m] - ref[m]).abs().max()) < tol, m


def _rand(g, *shape, s=1.0):
    return torch.randn(shape, generator=g) * s


def _sd3_parts(model):
    """ComfyUI's own SD3 key map: (file prefix -> (weight key, offset, fn)) for a block's to_q/to_k/to_v (OneTrainer
    names), the adaLN linear ComfyUI swaps (diffusers names), one plain Linear."""
    import comfy.lora

    km = comfy.lora.model_lora_keys_unet(model.model, {})
    qkv = [f"lora_transformer_transformer_blocks_0_attn_to_{c}" for c in "qkv"]
    assert all(isinstance(km[k], tuple) and km[k][1] is not None for k in qkv)
    swapped = next(k for k, v in km.items() if k.startswith("transformer.") and isinstance(v, tuple) and v[1] is None
                   and len(v) > 2 and v[2] is not None)
    plain = next(k for k, v in km.items() if k.startswith("transformer.") and isinstance(v, str)
                 and v in model.model.state_dict() and model.model.state_dict()[v].ndim == 2)
    return km, qkv, swapped, plain


def _sd3_file(model, g, rank=4, alphas=(2.0, None, 8.0), downs=None):
    km, qkv, swapped, plain = _sd3_parts(model)
    state = model.model.state_dict()
    fused = km[qkv[0]][0]
    down = _rand(g, rank, state[fused].shape[1], s=0.3)
    sd = {}
    for i, (k, a) in enumerate(zip(qkv, alphas)):
        sd[f"{k}.lora_down.weight"] = down.clone() if downs is None else downs[i]
        sd[f"{k}.lora_up.weight"] = _rand(g, km[k][1][2], rank, s=0.3)
        if a is not None:
            sd[f"{k}.alpha"] = torch.tensor(a)
    for k, a in ((swapped, 1.0), (plain, None)):
        o, i = state[km[k][0] if isinstance(km[k], tuple) else km[k]].shape
        sd[f"{k}.lora_A.weight"], sd[f"{k}.lora_B.weight"] = _rand(g, rank, i, s=0.3), _rand(g, o, rank, s=0.3)
        if a is not None:
            sd[f"{k}.alpha"] = torch.tensor(a)
    return sd, _module(fused)


def _cfg(T, **kw):
    kw.setdefault("rank", 4)
    kw.setdefault("alpha", 1)
    return T.C.LoraConfig(**kw)


def _all(model):
    return [n for n, m in model.model.diffusion_model.named_modules() if isinstance(m, (torch.nn.Linear,
                                                                                           torch.nn.Conv2d))]


def test_sd3_slices_join_into_the_fused_weight_comfyui_patches(T, family_bundle):
    """Per-slice LoRAs of qkv (each with its own alpha, one with none), the adaLN rows ComfyUI swaps and a plain
    Linear, under a run alpha/rank unlike the file's: the same merged weights as ComfyUI's loader gives."""
    model = family_bundle("sd3")[0]
    sd, fused = _sd3_file(model, torch.Generator().manual_seed(0))
    out = T.interop.adapters_from_lora(model, sd, _all(model), _cfg(T, alpha=3))
    ref = comfy_weights(model, sd)
    assert fused in ref and len(ref) == 3
    _same(our_weights(model, out), ref)
    assert out[f"{fused}.lora_up.weight"].shape == (model.model.state_dict()[f"diffusion_model.{fused}.weight"]
                                                    .shape[0], 4)
    assert all(float(out[k]) == 3.0 for k in out if k.endswith(".alpha"))
    assert not any("dora" in k for k in out)


def test_sd3_peft_names_without_prefix_and_joined_magnitudes(T, family_bundle):
    """peft's own names (no ``transformer.`` prefix: only the pack's key map has them) read as ComfyUI reads the
    prefixed file; peft DoRA magnitudes of to_q/to_k/to_v joined in row order, a plain module's kept."""
    import comfy.lora

    model = family_bundle("sd3")[0]
    g = torch.Generator().manual_seed(1)
    rank, fused_sd = 4, model.model.state_dict()["diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"]
    down = _rand(g, rank, fused_sd.shape[1], s=0.3)
    sd, mags = {}, {}
    third = fused_sd.shape[0] // 3
    for c in "qkv":
        sd[f"transformer_blocks.0.attn.to_{c}.lora_A.weight"] = down.clone()
        sd[f"transformer_blocks.0.attn.to_{c}.lora_B.weight"] = _rand(g, third, rank, s=0.3)
        mags[c] = torch.rand(third, generator=g) + 0.5
    plain = "transformer_blocks.0.attn.to_out.0"
    o, i = model.model.state_dict()["diffusion_model.joint_blocks.0.x_block.attn.proj.weight"].shape
    sd[f"{plain}.lora_A.weight"], sd[f"{plain}.lora_B.weight"] = _rand(g, rank, i), _rand(g, o, rank, s=0.3)
    # and an adaLN linear whose rows ComfyUI swaps (swap_scale_shift: the two halves exchanged)
    _, _, swapped, _ = _sd3_parts(model)
    target = comfy.lora.model_lora_keys_unet(model.model, {})[swapped]
    rows, i = model.model.state_dict()[target[0]].shape
    bare = swapped[len("transformer."):]
    sd[f"{bare}.lora_A.weight"], sd[f"{bare}.lora_B.weight"] = _rand(g, rank, i), _rand(g, rows, rank, s=0.3)
    out = T.interop.adapters_from_lora(model, sd, _all(model), _cfg(T, alpha=4))
    ref = comfy_weights(model, {"transformer." + k: v for k, v in sd.items()})
    assert len(ref) == 3
    _same(our_weights(model, out), ref)
    # the same file with DoRA magnitudes (ComfyUI does not read them): the joined magnitude, in qkv's row order
    ada = torch.rand(rows, generator=g) + 0.5
    dsd = {**sd, **{f"transformer_blocks.0.attn.to_{c}.lora_magnitude_vector": mags[c] for c in "qkv"},
           f"{plain}.lora_magnitude_vector": torch.rand(o, generator=g) + 0.5, f"{bare}.lora_magnitude_vector": ada}
    dout = T.interop.adapters_from_lora(model, dsd, _all(model), _cfg(T, alpha=4, dora=True, dora_axis="output"))
    assert torch.equal(dout["joint_blocks.0.x_block.attn.qkv.dora_magnitude"], torch.cat([mags[c] for c in "qkv"]))
    assert torch.equal(dout["joint_blocks.0.x_block.attn.proj.dora_magnitude"], dsd[f"{plain}.lora_magnitude_vector"])
    assert torch.equal(dout[f"{_module(target[0])}.dora_magnitude"], torch.cat([ada[rows // 2:], ada[:rows // 2]]))
    assert all(torch.equal(dout[k], out[k]) for k in out)
    with pytest.raises(T.C.ConfigError, match="on the output axis .* set dora_axis to 'output'"):
        T.interop.adapters_from_lora(model, dsd, _all(model), _cfg(T, alpha=4, dora=True, dora_axis="input"))
    with pytest.raises(T.C.ConfigError, match="has DoRA magnitudes .* dora off"):
        T.interop.adapters_from_lora(model, dsd, _all(model), _cfg(T, alpha=4))
    with pytest.raises(T.C.ConfigError, match=r"DoRA magnitude nope\.lora_magnitude_vector matches no module"):
        T.interop.adapters_from_lora(model, {**dsd, "nope.lora_magnitude_vector": torch.ones(3)}, _all(model),
                                     _cfg(T, alpha=4, dora=True, dora_axis="output"))
    # a magnitude whose module has no LoRA pair in the file is refused, not dropped unread
    lone = {k: v for k, v in dsd.items() if k not in (f"{plain}.lora_A.weight", f"{plain}.lora_B.weight")}
    with pytest.raises(T.C.ConfigError, match=r"1 module\(s\) have a DoRA magnitude .* no LoRA pair .*x_block\.attn\.proj"):
        T.interop.adapters_from_lora(model, lone, _all(model), _cfg(T, alpha=4, dora=True, dora_axis="output"))


def test_sd3_slices_that_are_not_one_lora_are_refused(T, family_bundle):
    """Slices join only when their down matrices agree to 1e-6 (absolute, no relative slack); other ranks, and
    mid/DoRA weights on a slice, are refused with their messages."""
    model = family_bundle("sd3")[0]
    _, qkv, _, _ = _sd3_parts(model)
    cols = model.model.state_dict()["diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"].shape[1]
    g = torch.Generator().manual_seed(2)
    base = _rand(g, 4, cols)
    ok = [base, base + 5e-7, base - 5e-7]  # within 1e-6: one LoRA (the first slice's down)
    sd, fused = _sd3_file(model, g, downs=ok)
    out = T.interop.adapters_from_lora(model, sd, _all(model), _cfg(T))
    assert torch.equal(out[f"{fused}.lora_down.weight"], base)
    big = 10 + torch.rand(4, cols, generator=g)
    for bad in ([big, big + 5e-5, big],  # 5e-6 relative to values of 10-11: still refused
                [base, base, base[:2]]):  # another rank
        sd, _ = _sd3_file(model, g, downs=bad)
        with pytest.raises(T.C.ConfigError, match="different down .*ComfyUI still applies it"):
            T.interop.adapters_from_lora(model, sd, _all(model), _cfg(T))
    sd, _ = _sd3_file(model, g)
    for extra in ({f"{qkv[1]}.dora_scale": torch.ones(1, cols)}, {f"{qkv[2]}.lora_mid.weight": torch.ones(4, 4)}):
        with pytest.raises(T.C.ConfigError, match=f"module {fused} is split in the file in a way a fused LoRA"):
            T.interop.adapters_from_lora(model, {**sd, **extra}, _all(model), _cfg(T, dora=True))


def _sd15_convs(model, g, rank, alpha):
    """kohya LoCon entries for two 3x3 convs of the tiny SD1.5 (3x3 down, 1x1 up), from ComfyUI's own key map."""
    import comfy.lora

    km = comfy.lora.model_lora_keys_unet(model.model, {})
    state = model.model.state_dict()
    convs = sorted(k for k, v in km.items() if k.startswith("lora_unet_") and isinstance(v, str)
                   and v in state and state[v].ndim == 4 and state[v].shape[-1] == 3)[:2]
    sd = {}
    for k in convs:
        o, i = state[km[k]].shape[:2]
        sd[f"{k}.lora_down.weight"] = _rand(g, rank, i, 3, 3, s=0.2)
        sd[f"{k}.lora_up.weight"] = _rand(g, o, rank, 1, 1, s=0.2)
        sd[f"{k}.alpha"] = torch.tensor(alpha)
    return sd


def test_sd15_conv_and_linear_kohya_file_equals_comfyui(T, sd15):
    model = sd15[0]
    g = torch.Generator().manual_seed(3)
    sd = {**_sd15_linears(model, n=3, seed=4)[0], **_sd15_convs(model, g, 4, 2.0)}
    sd = {k: (v * 0.25 if k.endswith(".alpha") else v) for k, v in sd.items()}  # file alpha 1 (convs 0.5) of rank 4
    out = T.interop.adapters_from_lora(model, sd, _all(model), _cfg(T, algorithm="locon", alpha=8))
    convs = [k[:-len(".lora_up.weight")] for k in out if k.endswith(".lora_up.weight") and
             model.model.diffusion_model.get_submodule(k[:-len(".lora_up.weight")]).weight.ndim == 4]
    assert len(convs) == 2
    for m in convs:  # the matrices the delta is the product of: (out, r) and (r, in*3*3)
        w = model.model.diffusion_model.get_submodule(m).weight
        assert out[f"{m}.lora_up.weight"].shape == (w.shape[0], 4)
        assert out[f"{m}.lora_down.weight"].shape == (4, w.shape[1] * 9)
    _same(our_weights(model, out), comfy_weights(model, sd))
    # a file without alpha: ComfyUI applies scale 1, so does the run
    noalpha = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    _same(our_weights(model, T.interop.adapters_from_lora(model, noalpha, _all(model), _cfg(T, alpha=2))),
          comfy_weights(model, noalpha))


def _sd15_linears(model, n=2, rank=4, seed=5):
    from support.factories.lora import kohya_lora

    sd = kohya_lora(model, seed=seed, rank=rank, scale=3.0)
    mods = sorted({k.split(".")[0] for k in sd})[:n]
    return {k: v for k, v in sd.items() if k.split(".")[0] in mods}, mods


def test_sd15_kohya_dora_scale_on_both_axes_equals_comfyui(T, sd15):
    """kohya DoRA: an input-axis ``dora_scale`` (1, in) kept as it is; an output-axis one (out, 1), which ComfyUI
    divides by the base weight's row norms, turned into the magnitude that merges to the same weight."""
    import comfy.lora

    model = sd15[0]
    km = comfy.lora.model_lora_keys_unet(model.model, {})
    state = model.model.state_dict()
    sd, mods = _sd15_linears(model)
    g = torch.Generator().manual_seed(6)
    ins = {**sd, **{f"{m}.dora_scale": torch.rand(1, state[km[m]].shape[1], generator=g) + 0.5 for m in mods}}
    out = T.interop.adapters_from_lora(model, ins, _all(model), _cfg(T, alpha=2, dora=True))
    assert sum(k.endswith(".dora_scale") for k in out) == 2 and not any("magnitude" in k for k in out)
    _same(our_weights(model, out), comfy_weights(model, ins))
    outs = {**sd, **{f"{m}.dora_scale": torch.rand(state[km[m]].shape[0], 1, generator=g) + 0.5 for m in mods}}
    out = T.interop.adapters_from_lora(model, outs, _all(model), _cfg(T, alpha=2, dora=True, dora_axis="output"))
    assert sum(k.endswith(".dora_magnitude") for k in out) == 2 and not any(k.endswith("dora_scale") for k in out)
    _same(our_weights(model, out), comfy_weights(model, outs))
    with pytest.raises(T.C.ConfigError, match="on the input axis .* set dora_axis to 'input'"):
        T.interop.adapters_from_lora(model, ins, _all(model), _cfg(T, dora=True, dora_axis="output"))
    with pytest.raises(T.C.ConfigError, match="has DoRA magnitudes .* dora off"):
        T.interop.adapters_from_lora(model, ins, _all(model), _cfg(T))
    with pytest.raises(T.C.ConfigError, match="has no DoRA magnitudes .* dora on"):
        T.interop.adapters_from_lora(model, sd, _all(model), _cfg(T, dora=True))


def test_refusals_name_the_first_three_and_leave_comfyuis_log_alone(T, sd15, caplog):
    model = sd15[0]
    sd, mods = _sd15_linears(model, n=5)
    targets = _all(model)
    out = T.interop.adapters_from_lora(model, sd, targets, _cfg(T))
    trained = sorted(k[:-len(".lora_up.weight")] for k in out if k.endswith(".lora_up.weight"))
    assert len(trained) == 5
    with pytest.raises(T.C.ConfigError) as e:
        T.interop.adapters_from_lora(model, sd, [t for t in targets if t not in trained], _cfg(T))
    assert f"trains 5 module(s) this run does not (e.g. {trained[:3]})" in str(e.value)
    unknown = {f"lora_unet_nowhere_{i}.lora_down.weight": torch.zeros(4, 8) for i in range(5)}
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(T.C.ConfigError) as e:
        T.interop.adapters_from_lora(model, {**sd, **unknown}, targets, _cfg(T))
    assert f"5 key(s) of the file match no module of this model (e.g. {sorted(unknown)[:3]})" in str(e.value)
    assert not any("lora key not loaded" in r.getMessage() for r in caplog.records)  # one message: ours
    with pytest.raises(T.C.ConfigError, match="is not a LoRA pair .*only LoRA/LoCon/DoRA"):
        T.interop.adapters_from_lora(model, {**sd, f"{mods[0]}.diff": torch.zeros(1)}, targets, _cfg(T))
    mid = {**sd, f"{mods[0]}.lora_mid.weight": torch.zeros(4, 4, 1, 1)}
    with pytest.raises(T.C.ConfigError, match="has a Tucker/CP mid weight"):
        T.interop.adapters_from_lora(model, mid, targets, _cfg(T))
    with pytest.raises(T.C.ConfigError, match=r"the file's rank is 4 .* rank is 8; set rank to 4"):
        T.interop.adapters_from_lora(model, sd, targets, _cfg(T, rank=8))
    with pytest.raises(T.C.ConfigError, match="needs algorithm lora or locon .*'loha'"):
        T.interop.adapters_from_lora(model, sd, targets, _cfg(T, algorithm="loha"))


def test_read_takes_only_safetensors(T, sd15, tmp_path):
    from safetensors.torch import load_file

    from support.factories.lora import write_lora

    sd, _ = _sd15_linears(sd15[0])
    path = write_lora(tmp_path / "x.safetensors", sd)
    got = T.interop.read(path)
    ref = load_file(str(path))
    assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    pt = tmp_path / "x.pt"
    torch.save(sd, pt)
    with pytest.raises(T.C.ConfigError, match="not a .safetensors file; only safetensors"):
        T.interop.read(pt)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(T.C.ConfigError, match="cannot be read as safetensors"):
        T.interop.read(bad)


def test_start_from_under_comfyuis_inference_mode_sets_adapters_and_ema(T, sd15, sd15_training_set, tmp_path,
                                                                        comfy_dirs):
    """Train Init runs under ComfyUI's inference mode: the run's adapters (and its EMA, when the run keeps one) start
    at the file's LoRA as ordinary tensors a step can train; a run without EMA gets none."""
    from support.factories.lora import write_lora

    model = sd15[0]
    sd, _ = _sd15_linears(model, n=3, seed=7)
    path = write_lora(comfy_dirs["models"] / "loras" / "pin_interop_start.safetensors", sd)
    lora = T.C.LoraConfig(rank=4, alpha=2, preset="all-linear")
    runs = {}
    # spaces typed around the name or around 'none' are ignored (as resume ignores them)
    for name, ema, init in (("pin_ema", 0.9, f" {path.name} "), ("pin_noema", 0.0, path.name), ("pin_none", 0.0, "none ")):
        with torch.inference_mode():  # as ComfyUI's executor runs the node
            runs[name] = T.loop.init_run(model, sd15_training_set, lora, T.C.TimestepConfig(),
                                         T.C.OptimizerConfig(lr=1e-3), T.st.RunSettings(run_name=name, ema_decay=ema),
                                         runs_root=tmp_path / "runs", init_lora=init)
    want = T.interop.adapters_from_lora(model, sd, _all(model), lora)
    run = runs["pin_ema"]
    assert run.step == 0 and run.meta["init_lora"] == path.name
    for part in ("adapters", "ema_adapters"):
        got = run.state[part]
        assert not any(v.is_inference() for v in got.values()), part
        assert all(torch.equal(got[k].reshape(v.shape), v) for k, v in want.items() if not k.endswith(".alpha")), part
    assert runs["pin_noema"].state["ema"] is None and runs["pin_noema"].state["ema_adapters"] is None
    assert "init_lora" not in runs["pin_none"].meta and runs["pin_none"].state is None
    after = T.loop.train_steps(run, 1)
    assert after.step == 1 and torch.isfinite(torch.tensor(after.history[-1]["loss"]))


def test_flux_peft_names_skip_norm_scales_and_map_every_later_module(T, family_bundle):
    """FLUX's diffusers table also names RMSNorm scales (``attn.norm_q.weight`` -> ``...query_norm.scale``), which
    are no LoRA target: the pack's own names for them are left out of the key map (ComfyUI's own map keeps its
    ``transformer.`` ones), and every module after them is still mapped. A peft file
    with diffusers' names and no prefix (every Linear of the tiny FLUX, fused slices sharing their down) gives the
    weights ComfyUI patches for the same file under its ``transformer.`` prefix."""
    import comfy.lora

    model = family_bundle("flux1-dev")[0]
    km = T.interop.key_map(model)
    assert "transformer_blocks.0.attn.norm_q" not in km and "unet.transformer_blocks.0.attn.norm_q" not in km
    state = model.model.state_dict()
    g = torch.Generator().manual_seed(8)
    downs, sd = {}, {}
    for k, v in comfy.lora.model_lora_keys_unet(model.model, {}).items():
        key = v if isinstance(v, str) else v[0]
        if not k.startswith("transformer.") or key not in state or state[key].ndim != 2:
            continue
        rows = v[1][2] if isinstance(v, tuple) and v[1] is not None else state[key].shape[0]
        down = downs.setdefault(key, _rand(g, 4, state[key].shape[1], s=0.3))
        bare = k[len("transformer."):]
        sd[f"{bare}.lora_A.weight"], sd[f"{bare}.lora_B.weight"] = down, _rand(g, rows, 4, s=0.3)
    assert len(downs) > 10
    out = T.interop.adapters_from_lora(model, sd, _all(model), _cfg(T, alpha=4))
    _same(our_weights(model, out), comfy_weights(model, {"transformer." + k: v for k, v in sd.items()}))
