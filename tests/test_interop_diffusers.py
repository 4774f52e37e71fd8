"""Saved LoRA files load in diffusers (#17): for the tiny SD1.5 and SDXL, the official diffusers UNet is built from
the SAME base weights with diffusers' single-file converters (base outputs checked equal first), the file our Save
LoRA wrote is loaded with the family pipeline's standard ``load_lora_weights(path)``, every module must be loaded,
and the UNet's output must equal ComfyUI's (same LoRA through ComfyUI's stock loader) within 1e-4."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from support.factories import diffusers_ref as R


def _run(T, model, tset, tmp_path, lora, name):
    run = T.loop.init_run(model, tset, lora, T.C.TimestepConfig(), T.C.OptimizerConfig(lr=1e-3),
                          T.st.RunSettings(run_name=name), runs_root=tmp_path / "runs")
    run = T.loop.train_steps(run, 1)
    # one real step leaves the LoRA almost zero; give it seeded, clearly visible weights so that a dropped or
    # misplaced module shows in the outputs
    g = torch.Generator().manual_seed(3)
    adapters = {k: (torch.randn(v.shape, generator=g) * 0.5 if k.endswith("lora_up.weight") else v)
                for k, v in run.state["adapters"].items()}
    return run.advanced(state={**run.state, "adapters": adapters, "ema_adapters": None})


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500.0]), torch.randn(1, 77, 768, generator=g)


def comfy_unet_out(T, model, lora_sd, **forward):
    """ComfyUI's UNet output with the LoRA merged by ComfyUI's own loader and weight calculation, on a copy
    of the (session-shared) diffusion model; ``forward``: the diffusion model's inputs (default: ``_inputs()``)."""
    import comfy.lora

    patched = T.export.model_with_lora(model, lora_sd)
    dm = copy.deepcopy(model.model.diffusion_model)
    params = dict(dm.named_parameters())
    with torch.no_grad():
        for key, patches in patched.patches.items():
            name = key[len("diffusion_model."):]
            params[name].copy_(comfy.lora.calculate_weight(patches, params[name].detach().float().clone(), key))
        if not forward:
            x, t, ctx = _inputs()
            forward = {"x": x, "timesteps": t, "context": ctx}
        return dm(**forward).float()


@dataclass
class Family:
    """One family's pair: ComfyUI's MODEL and training set, the diffusers pipeline around the UNet converted from
    the same weights, and the same inputs spelled for each side."""
    model: object
    training_set: object
    pipeline: object
    diffusers_inputs: dict
    comfy_inputs: dict


def _sd15_family(sd15, sd15_training_set, diffusers_unet) -> Family:
    x, t, ctx = _inputs()
    return Family(sd15[0], sd15_training_set, R.sd_pipeline(diffusers_unet),
                  {"sample": x, "timestep": t, "encoder_hidden_states": ctx},
                  {"x": x, "timesteps": t, "context": ctx})


@pytest.fixture(scope="module")
def diffusers_unet(sd15_checkpoint):
    return R.sd15_unet(sd15_checkpoint.resolve())


@pytest.fixture(scope="module")
def sdxl(comfy, family_bundle):
    """The tiny SDXL: a one-sample training set from its own CLIP, and diffusers' UNet from its weights; inputs with
    SDXL's pooled text and size conditioning (ComfyUI's ``y`` made by ComfyUI's own size embedder)."""
    from support.factories import families

    model, clip, _ = family_bundle("sdxl")
    types = comfy.engine("data.types")
    (cond,) = comfy.nodes.CLIPTextEncode().encode(clip, "ohwx, a red circle")
    lat = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))
    tset = types.TrainingSet((types.Sample("a", lat, (types.CaptionVariant("ohwx", cond),), bucket=(64, 64)),))
    unet = R.sdxl_unet(model.model.diffusion_model.state_dict())
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500.0])
    ctx = torch.randn(1, 77, families.SDXL_UNET["context_dim"], generator=g)
    pooled = torch.randn(1, families.CLIP_G_POOLED, generator=g)
    time_ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]])
    with torch.no_grad():
        y = torch.cat([pooled, model.model.embedder(time_ids.flatten()).reshape(1, -1)], dim=1)
    return Family(model, tset, R.sdxl_pipeline(unet),
                  {"sample": x, "timestep": t, "encoder_hidden_states": ctx,
                   "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}},
                  {"x": x, "timesteps": t, "context": ctx, "y": y})


@pytest.fixture
def family(request, sd15, sd15_training_set):
    if request.param == "sdxl":
        return request.getfixturevalue("sdxl")
    return _sd15_family(sd15, sd15_training_set, request.getfixturevalue("diffusers_unet"))


def assert_loads_completely_and_matches_comfyui(T, fam: Family, path):
    """Load ``path`` with the pipeline's standard ``load_lora_weights``: every module of the file carries an adapter
    in diffusers, the base outputs of both sides agree, and the LoRA's output equals ComfyUI's within 1e-4."""
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(path))
    n_modules = len({k.rsplit(".", 2)[0] for k in sd if k.endswith("lora_down.weight")})
    pipe = fam.pipeline
    pipe.load_lora_weights(str(path), adapter_name="default_0")
    try:
        loaded = R.lora_modules(pipe.unet)
        assert len(loaded) == n_modules, (len(loaded), n_modules)
        with torch.no_grad():
            ours = pipe.unet(**fam.diffusers_inputs).sample
            pipe.unet.disable_adapters()
            base = pipe.unet(**fam.diffusers_inputs).sample
            pipe.unet.enable_adapters()
            comfy_base = fam.model.model.diffusion_model(**fam.comfy_inputs).float()
    finally:
        pipe.unload_lora_weights()
    assert float((base - comfy_base).abs().max()) < 1e-5, "the converted base UNet must equal ComfyUI's first"
    comfy_out = comfy_unet_out(T, fam.model, sd, **fam.comfy_inputs)
    assert (ours - base).abs().max() > 1e-2, "the LoRA must visibly change the output"
    err = float((ours - comfy_out).abs().max())
    assert err < 1e-4, err


@pytest.mark.parametrize("family,algorithm,preset", [("sd15", "lora", "attention+mlp"),
                                                     ("sd15", "lora", "all-linear"),
                                                     ("sd15", "locon", "all-linear+conv"),
                                                     ("sdxl", "lora", "all-linear"),
                                                     ("sdxl", "locon", "all-linear+conv")],
                         indirect=["family"])
def test_lora_loads_completely_in_diffusers_and_matches_comfyui(T, family, tmp_path, algorithm, preset):
    lora = T.C.LoraConfig(algorithm=algorithm, rank=4, alpha=2, preset=preset)
    run = _run(T, family.model, family.training_set, tmp_path, lora, f"dl_{algorithm}_{preset}")
    path, report = T.export.save_lora(run, f"dl_{algorithm}", folder=tmp_path / "loras", dtype=torch.float32)
    assert report["diffusers"]["checked"] and not report["diffusers"]["dropped"], report["diffusers"]
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(path))
    assert all(k.startswith("lora_unet_") for k in sd)
    if T.naming.family_facts(family.model).get("names") == "diffusers_unet":
        assert not any("input_blocks" in k or "output_blocks" in k or "middle_block" in k for k in sd), \
            "SD1.x keys use kohya's (diffusers) module names"
    assert_loads_completely_and_matches_comfyui(T, family, path)


def test_save_check_agrees_with_diffusers_and_refuses_dropped_modules(T, sd15, sd15_training_set, diffusers_unet,
                                                                       tmp_path, monkeypatch):
    """The save-time check predicts what load_lora_weights does: with ComfyUI's internal module names
    (what this pack wrote before #17) diffusers loads none of the modules, the check lists every one as dropped,
    and Save LoRA refuses to write the file, naming a module."""
    lora = T.C.LoraConfig(rank=4, alpha=4, preset="attention")
    run = _run(T, sd15[0], sd15_training_set, tmp_path, lora, "dl_check")
    internal = T.export.kohya_from_adapters(run.state["adapters"], torch.float32)  # lora_unet_input_blocks_...
    assert any("input_blocks" in k for k in internal)
    result = T.diffusers_check.check(sd15[0], internal)
    n_modules = len({k.rsplit(".", 2)[0] for k in internal if k.endswith("lora_down.weight")})
    pipe = R.sd_pipeline(diffusers_unet)
    try:
        pipe.load_lora_weights(dict(internal), adapter_name="default_0")
        loaded = R.lora_modules(pipe.unet)
    except ValueError:  # peft: "Target modules {...} not found in the base model" (the names it made up)
        loaded = []
    finally:
        pipe.unload_lora_weights()
    assert len(loaded) < n_modules
    assert result["checked"] and result["dropped"], result
    assert all(n.startswith(("down_blocks", "mid_block", "up_blocks")) or "lost" in n for n in result["dropped"])
    named = T.export.kohya_state_dict(run, torch.float32)  # the names Save LoRA writes: nothing dropped
    assert T.diffusers_check.check(sd15[0], named)["dropped"] == []

    monkeypatch.setattr(T.naming, "module_prefixes", lambda model, modules: {})
    with pytest.raises(T.export.ExportError, match=r"diffusers' load_lora_weights would drop \d+ module"):
        T.export.save_lora(run, "dl_dropped", folder=tmp_path / "loras")
    assert not (tmp_path / "loras" / "dl_dropped.safetensors").exists()


def _dora_family(request, name):
    if name == "sd15":
        return _sd15_family(request.getfixturevalue("sd15"), request.getfixturevalue("sd15_training_set"),
                            request.getfixturevalue("diffusers_unet"))
    return request.getfixturevalue(name)


@pytest.mark.parametrize("name,algorithm,preset", [("sd15", "lora", "attention"),
                                                   ("sdxl", "locon", "all-linear+conv"),
                                                   ("sd3", "lora", "all-linear")])
def test_output_axis_dora_loads_in_diffusers_and_matches_comfyui(T, request, tmp_path, name, algorithm, preset):
    """DoRA with dora_axis 'output' (peft's DoRA): Save LoRA writes the ComfyUI file (kohya names, an output-axis
    ``dora_scale`` as ComfyUI reads it) and a diffusers copy (peft layout with ``lora_magnitude_vector``, SD3's fused
    qkv split with its magnitudes). ComfyUI maps every key of the first and merges exactly the weights training
    used; the pipeline's standard ``load_lora_weights(copy)`` puts a DoRA adapter on every module of the copy, and
    the model's output equals ComfyUI's with the ComfyUI file within 1e-4."""
    import comfy.lora
    import comfy.utils

    fam = _dora_family(request, name)
    lora = T.C.LoraConfig(algorithm=algorithm, rank=4, alpha=2, preset=preset, dora=True, dora_axis="output")
    run = _run(T, fam.model, fam.training_set, tmp_path, lora, f"dl_odora_{name}")
    g = torch.Generator().manual_seed(5)  # magnitudes visibly away from the base row norms
    run = run.advanced(state={**run.state, "adapters": {
        k: v * (1 + 0.3 * torch.rand(v.shape, generator=g)) if k.endswith("dora_magnitude") else v
        for k, v in run.state["adapters"].items()}})
    path, report = T.export.save_lora(run, f"dl_odora_{name}", folder=tmp_path / "loras", dtype=torch.float32,
                                      diffusers_folder=tmp_path / "diffusers")
    d = report["diffusers"]
    assert d["checked"] and not d["dropped"] and not d["refused"], d
    copy_path = tmp_path / "diffusers" / path.name
    assert d["file"] == str(copy_path) and copy_path.is_file()
    sd, copy = comfy.utils.load_torch_file(str(path)), comfy.utils.load_torch_file(str(copy_path))
    assert T.export.unmapped_keys(fam.model, sd) == [] and any(k.endswith(".dora_scale") for k in sd)
    assert not any(k.endswith("dora_magnitude") for k in sd)
    # ComfyUI's merge of the file = the trained weights (the adapters' own forward on the base weight)
    patched = T.export.model_with_lora(fam.model, sd)
    tr = T.loop.Trainer(run)
    base = fam.model.model.state_dict()
    for module, adapter in tr.adapters.items():
        adapter.eval()
        key = f"diffusion_model.{module}.weight"
        w0 = base[key].float()
        with torch.no_grad():
            ours = adapter(w0.clone())
        theirs = comfy.lora.calculate_weight(patched.patches[key], w0.clone(), key)
        assert float((ours - theirs).abs().max()) <= 1e-5 * max(1.0, float(w0.abs().max())), module
    # diffusers: every module of the copy carries a DoRA adapter; the output equals ComfyUI's
    n_modules = len({k.rsplit(".", 2)[0] for k in copy if k.endswith(".lora_A.weight")})
    assert n_modules == len({k[:-len(".lora_magnitude_vector")] for k in copy if k.endswith("lora_magnitude_vector")})
    pipe = fam.pipeline
    component = pipe.transformer if name == "sd3" else pipe.unet
    pipe.load_lora_weights(str(copy_path), adapter_name="default_0")
    try:
        in_copy = {k.split(".", 1)[1].rsplit(".", 2)[0] for k in copy if k.endswith(".lora_A.weight")}
        assert set(R.lora_modules(component)) == in_copy, sorted(in_copy ^ set(R.lora_modules(component)))
        assert sum("lora_magnitude_vector" in n for n, _ in component.named_parameters()) == n_modules
        with torch.no_grad():
            theirs = component(**fam.diffusers_inputs).sample
            component.disable_adapters()
            base_out = component(**fam.diffusers_inputs).sample
            component.enable_adapters()
    finally:
        pipe.unload_lora_weights()
    comfy_out = comfy_unet_out(T, fam.model, sd, **fam.comfy_inputs)
    assert float((theirs - base_out).abs().max()) > 1e-2, "the LoRA must visibly change the output"
    err = float((theirs - comfy_out).abs().max())
    assert err < 1e-4, err
    # and the copy starts a run again: its magnitudes come back as trained (init_lora reads peft's DoRA keys)
    names = sorted(tr.adapters)
    back = T.interop.adapters_from_lora(fam.model, copy, names, lora)
    for k, v in run.state["adapters"].items():
        if k.endswith(("lora_up.weight", "lora_down.weight", "dora_magnitude")):
            assert torch.allclose(back[k].reshape(v.shape) * (1 if not k.endswith("lora_up.weight") else 1),
                                  v.float(), atol=1e-5), k
    # ... and so does the ComfyUI file (its dora_scale converted back against the base weights)
    back = T.interop.adapters_from_lora(fam.model, sd, names, lora)
    for k, v in run.state["adapters"].items():
        if k.endswith("dora_magnitude"):
            assert torch.allclose(back[k], v.float(), atol=1e-5), k


def test_input_axis_dora_cannot_give_comfyui_output_in_diffusers(T, sd15, sd15_training_set, diffusers_unet,
                                                                  tmp_path):
    """Why an input-axis DoRA file (dora_axis 'input', the default) cannot load in diffusers with ComfyUI's output
    (diffusers 0.42.1, peft 0.21, ComfyUI 0.3.75); each fact is measured here, so the test fails when one changes.
    (dora_axis 'output' is how a DoRA reaches diffusers: test_output_axis_dora_loads_in_diffusers_and_matches_comfyui.)

    1. kohya layout (``dora_scale``, what ComfyUI/A1111/Forge/LyCORIS read): every diffusers pipeline's
       ``lora_state_dict`` removes every key containing ``dora_scale`` before converting ("DoRA checkpoint that is not
       compatible"), so ``load_lora_weights`` applies the LoRA part only: every module is loaded, and the output equals
       ComfyUI's for the same file WITHOUT its magnitudes, not ComfyUI's DoRA output.
    2. peft layout (``lora_magnitude_vector``, what diffusers reads as DoRA): ComfyUI's stock loader does not read that
       key (it stays unmapped) and applies the pair as plain LoRA.
    3. peft's magnitude is per output row and normalises by the UPDATED weight's row norms, so an input-axis
       magnitude (a column scaling) has no peft counterpart; ComfyUI normalises an output-axis ``dora_scale`` by the
       BASE weight's row norms (``weight_decompose``), so the same magnitude gives different weights in the two,
       which is why the output-axis ComfyUI file stores ``m * ||W|| / ||W + dW||`` (``dora_axes``).
    Save LoRA reports input-axis DoRA files as loading without magnitudes in diffusers."""
    import comfy.lora
    import comfy.utils
    from comfy.weight_adapter import LoRAAdapter
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    lora = T.C.LoraConfig(rank=4, alpha=2, preset="attention", dora=True)
    run = _run(T, sd15[0], sd15_training_set, tmp_path, lora, "dl_dora")
    g = torch.Generator().manual_seed(5)  # magnitudes visibly away from the base norms
    run = run.advanced(state={**run.state, "adapters": {
        k: v * (1 + 0.3 * torch.rand(v.shape, generator=g)) if k.endswith("dora_scale") else v
        for k, v in run.state["adapters"].items()}})
    path, report = T.export.save_lora(run, "dl_dora", folder=tmp_path / "loras", dtype=torch.float32)
    assert "dora_scale" in report["diffusers"]["reason"] and not report["diffusers"]["dropped"]
    sd = comfy.utils.load_torch_file(str(path))
    assert any(k.endswith(".dora_scale") for k in sd)
    # 1. every pipeline drops the magnitudes before conversion
    for pipe_cls, key in ((StableDiffusionXLPipeline, "lora_unet_a.dora_scale"),
                          (StableDiffusion3Pipeline, "transformer.a.dora_scale"),
                          (FluxPipeline, "lora_unet_double_blocks_0_img_attn_proj.dora_scale")):
        probe = {key: torch.ones(4, 1)}
        kept = pipe_cls.lora_state_dict(dict(probe))
        kept = kept[0] if isinstance(kept, tuple) else kept
        assert not any("dora" in k or "magnitude" in k for k in kept), (pipe_cls.__name__, list(kept))
    fam = _sd15_family(sd15, sd15_training_set, diffusers_unet)
    pipe = fam.pipeline
    pipe.load_lora_weights(str(path), adapter_name="default_0")
    try:
        n_modules = len({k.rsplit(".", 2)[0] for k in sd if k.endswith("lora_down.weight")})
        assert len(R.lora_modules(pipe.unet)) == n_modules
        assert not any("magnitude" in n for n, _ in pipe.unet.named_parameters())
        with torch.no_grad():
            theirs = pipe.unet(**fam.diffusers_inputs).sample
    finally:
        pipe.unload_lora_weights()
    plain = {k: v for k, v in sd.items() if not k.endswith(".dora_scale")}
    comfy_plain = comfy_unet_out(T, fam.model, plain, **fam.comfy_inputs)
    assert float((theirs - comfy_plain).abs().max()) < 1e-4
    # ... which is not ComfyUI's DoRA output: the magnitudes change ComfyUI's merged weights (every module)
    with_dora, without = (T.export.model_with_lora(fam.model, f).patches for f in (sd, plain))
    base = fam.model.model.state_dict()
    assert set(with_dora) == set(without) and len(with_dora) == n_modules
    for key in with_dora:
        w = base[key].float()
        delta = comfy.lora.calculate_weight(with_dora[key], w.clone(), key) - \
            comfy.lora.calculate_weight(without[key], w.clone(), key)
        assert float(delta.abs().max()) > 1e-3, key
    # 2. ComfyUI does not read peft's magnitude key (a module ComfyUI maps under its peft name)
    name = "unet.down_blocks.0.attentions.0.proj_in"
    w = dict(diffusers_unet.named_parameters())["down_blocks.0.attentions.0.proj_in.weight"]
    peft_file = {f"{name}.lora_A.weight": torch.randn(4, w.shape[1], generator=g),
                 f"{name}.lora_B.weight": torch.randn(w.shape[0], 4, generator=g),
                 f"{name}.lora_magnitude_vector": torch.rand(w.shape[0], generator=g) + 1}
    assert T.export.unmapped_keys(sd15[0], peft_file) == [f"{name}.lora_magnitude_vector"]
    # 3. the axes: peft's merged DoRA weight vs ComfyUI's weight_decompose on the same W, LoRA and magnitude
    layer = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False))
    torch.nn.init.normal_(layer[0].weight, generator=g)
    W = layer[0].weight.detach().clone()
    layer = inject_adapter_in_model(PeftLoraConfig(r=2, lora_alpha=2, use_dora=True, target_modules=["0"]), layer)
    down, up, m = torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), torch.rand(5, generator=g) + 1
    with torch.no_grad():
        layer[0].lora_A["default"].weight.copy_(down)
        layer[0].lora_B["default"].weight.copy_(up)
        assert layer[0].lora_magnitude_vector["default"].weight.shape == (5,), "peft: one magnitude per output row"
        layer[0].lora_magnitude_vector["default"].weight.copy_(m)
        layer[0].merge()
        peft_w = layer[0].base_layer.weight.detach().clone()
    merged = W + up @ down
    assert torch.allclose(peft_w, merged * (m / merged.norm(dim=1)).unsqueeze(1), atol=1e-5)
    adapter = LoRAAdapter(set(), (up, down, torch.tensor(2.0), None, m.reshape(5, 1), None))
    comfy_w = comfy.lora.calculate_weight([(1.0, adapter, 1.0, None, None)], W.clone(), "w")
    assert torch.allclose(comfy_w, merged * (m / W.norm(dim=1)).unsqueeze(1), atol=1e-5), "ComfyUI: base norm"
    assert float((comfy_w - peft_w).abs().max()) > 1e-2


def test_flux_width_diffusers_cannot_convert_is_not_checkable(T, family_bundle, tmp_path):
    """diffusers' kohya FLUX converter hard-codes FLUX.1's width (3072) for ``single_blocks.N.linear1``, and its
    transformer converter hard-codes it too, so a reduced-width FLUX (the tiny one is 64 wide) has no diffusers
    counterpart: Save LoRA reports such a file as not checkable (not as refused) and still saves it. The same file
    without its linear1 modules converts, and is checked. The hard-coded width is diffusers' own fact: the same
    converter takes a single-block linear1 LoRA at width 3072 and raises at width 64."""
    from comfy.utils import load_torch_file
    from diffusers import FluxPipeline

    from support.factories import families

    model, _, _ = family_bundle("flux1-dev")
    g = torch.Generator().manual_seed(0)
    # conditioning as FLUX's CLIPTextEncode gives it (T5 sequence, pooled CLIP-L), seeded: only names matter here
    cond = [[torch.randn(1, 8, families.T5_FLUX["d_model"], generator=g),
             {"pooled_output": torch.randn(1, families.CLIP_L_WIDTH, generator=g)}]]
    types = T.types
    tset = types.TrainingSet((types.Sample("a", torch.randn(16, 8, 8, generator=g),
                                           (types.CaptionVariant("ohwx", cond),), bucket=(64, 64)),))
    run = _run(T, model, tset, tmp_path, T.C.LoraConfig(rank=4, alpha=4, preset="attention"), "dl_flux")
    path, report = T.export.save_lora(run, "dl_flux", folder=tmp_path / "loras", dtype=torch.float32)
    full = report["diffusers"]
    sd = load_torch_file(str(path))
    assert any("linear1" in k for k in sd)
    assert not full["checked"] and not full["refused"] and not full["dropped"], full
    assert full["reason"].startswith("not checkable") and "3072" in full["reason"] and "64" in full["reason"]
    part = T.diffusers_check.check(model, {k: v for k, v in sd.items() if "linear1" not in k})
    assert part["checked"] and part["dropped"] == [] and part["refused"] == [] and part["modules"] > 0, part
    # modules outside the blocks: diffusers' kohya FLUX converter names them without the "transformer." prefix, which
    # load_lora_weights then skips (measured at full width: tests/test_interop_flux_full.py); the check names them
    dm_params = dict(model.model.diffusion_model.named_parameters())
    outer = {}
    for module in ("img_in", "final_layer.linear"):
        out_dim, in_dim = dm_params[module + ".weight"].shape
        key = "lora_unet_" + module.replace(".", "_")
        outer.update({key + ".lora_down.weight": torch.zeros(4, in_dim),
                      key + ".lora_up.weight": torch.zeros(out_dim, 4), key + ".alpha": torch.tensor(4.0)})
    skipped = T.diffusers_check.check(model, outer)
    assert skipped["checked"] and len(skipped["dropped"]) == 2, skipped
    assert all("outside the model component" in n for n in skipped["dropped"])
    assert {n.split(" ")[0] for n in skipped["dropped"]} == {"x_embedder", "proj_out"}

    def linear1(width):
        g = torch.Generator().manual_seed(0)
        return {"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(4, width, generator=g),
                "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.randn(7 * width, 4, generator=g),
                "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(4.0)}

    converted = FluxPipeline.lora_state_dict(linear1(3072))
    converted = converted[0] if isinstance(converted, tuple) else converted
    assert {k.rsplit(".", 2)[0] for k in converted} == {f"transformer.single_transformer_blocks.0.{m}" for m in
                                                        ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
    with pytest.raises(AssertionError):  # diffusers: assert sum(dims) == up_weight.shape[0]
        FluxPipeline.lora_state_dict(linear1(64))


@pytest.fixture(scope="module")
def sd3(T, family_bundle):
    """The tiny SD3: a one-sample training set (conditioning shaped as SD3's CLIPTextEncode gives it: CLIP-L+G padded
    to 4096 and T5 on the sequence axis; pooled CLIP-L+G; seeded), diffusers' SD3 pipeline around the transformer
    converted from the same weights, and the same inputs spelled for each side."""
    from support.factories import families

    model, _, _ = family_bundle("sd3")
    g = torch.Generator().manual_seed(0)
    adm = families.SD3_MMDIT["adm_in_channels"]
    cond = [[torch.randn(1, 8, 4096, generator=g), {"pooled_output": torch.randn(1, adm, generator=g)}]]
    lat = torch.randn(16, 8, 8, generator=g)
    tset = T.types.TrainingSet((T.types.Sample("a", lat, (T.types.CaptionVariant("ohwx", cond),), bucket=(64, 64)),))
    x, t = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([500.0])
    ctx, pooled = torch.randn(1, 6, 4096, generator=g), torch.randn(1, adm, generator=g)
    return Family(model, tset, R.sd3_pipeline(model.model.diffusion_model.state_dict()),
                  {"hidden_states": x, "timestep": t, "encoder_hidden_states": ctx, "pooled_projections": pooled},
                  {"x": x, "timesteps": t, "context": ctx, "y": pooled})


@pytest.mark.parametrize("algorithm,preset", [("lora", "all-linear"), ("locon", "all-linear+conv")])
def test_sd3_files_in_peft_layout_load_completely_in_diffusers_and_match_comfyui(T, sd3, tmp_path, algorithm,
                                                                                  preset):
    """SD3 files are written in diffusers' peft layout (``layout: peft`` in lora_formats.json), since diffusers'
    ``SD3LoraLoaderMixin`` has no kohya converter: the fused ``qkv`` split into ``to_q``/``to_k``/``to_v`` (and
    ``add_*_proj``), the final adaLN's rows swapped as ComfyUI's table swaps them. ComfyUI maps every key (Save LoRA
    checks), the save check covers SD3, ``StableDiffusion3Pipeline.load_lora_weights(path)`` puts an adapter on every
    module of the file, and the output equals ComfyUI's within 1e-4."""
    lora = T.C.LoraConfig(algorithm=algorithm, rank=4, alpha=2, preset=preset)
    run = _run(T, sd3.model, sd3.training_set, tmp_path, lora, f"dl_sd3_{algorithm}")
    path, report = T.export.save_lora(run, f"dl_sd3_{algorithm}", folder=tmp_path / "loras", dtype=torch.float32)
    d = report["diffusers"]
    assert d["checked"] and d["pipeline"] == "StableDiffusion3Pipeline" and not d["dropped"] and not d["refused"], d
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(path))
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd)
    assert {"to_q", "to_k", "to_v", "add_q_proj"} <= {k.split(".")[-3] for k in sd}, "fused qkv split"
    assert any(k.startswith("transformer.norm_out.linear.") for k in sd), "final adaLN (swapped rows) covered"
    assert (algorithm == "locon") == any(k.startswith("transformer.pos_embed.proj.") for k in sd)
    assert d["modules"] == len({k.rsplit(".", 2)[0] for k in sd})
    assert T.export.unmapped_keys(sd3.model, sd) == []
    # init_lora joins the split qkv slices back into ComfyUI's fused weight: the run's own adapters come back
    names = sorted({k.rsplit(".", 2)[0] for k in run.state["adapters"] if k.endswith(".lora_up.weight")})
    back = T.interop.adapters_from_lora(sd3.model, sd, names, lora)
    for k, v in run.state["adapters"].items():
        if k.endswith(("lora_up.weight", "lora_down.weight")):
            assert torch.allclose(back[k].reshape(v.shape), v.float(), atol=1e-6), k
    assert {k for k in back if k.endswith("lora_up.weight")} == {n + ".lora_up.weight" for n in names}
    bad = dict(sd)
    q = next(k for k in sd if k.endswith("attn.to_q.lora_A.weight"))
    bad[q] = sd[q] + 1.0  # to_q's down no longer the fused LoRA's down
    with pytest.raises(T.C.ConfigError, match="different down"):
        T.interop.adapters_from_lora(sd3.model, bad, names, lora)
    n_modules = len({k.rsplit(".", 2)[0] for k in sd})
    pipe = sd3.pipeline
    pipe.load_lora_weights(str(path), adapter_name="default_0")
    try:
        assert len(R.lora_modules(pipe.transformer)) == n_modules
        with torch.no_grad():
            ours = pipe.transformer(**sd3.diffusers_inputs).sample
            pipe.transformer.disable_adapters()
            base = pipe.transformer(**sd3.diffusers_inputs).sample
            pipe.transformer.enable_adapters()
            comfy_base = sd3.model.model.diffusion_model(**sd3.comfy_inputs).float()
    finally:
        pipe.unload_lora_weights()
    assert float((base - comfy_base).abs().max()) < 1e-5, "the converted base transformer must equal ComfyUI's first"
    comfy_out = comfy_unet_out(T, sd3.model, sd, **sd3.comfy_inputs)
    assert (ours - base).abs().max() > 1e-2, "the LoRA must visibly change the output"
    err = float((ours - comfy_out).abs().max())
    assert err < 1e-4, err


def test_sd3_kohya_names_load_nothing_in_diffusers(T, sd3, tmp_path):
    """Why SD3 is written in the peft layout: the same LoRA under kohya's SD3 names (``lora_unet_joint_blocks_...``,
    what sd-scripts writes; still used for SD3 DoRA/LoHa/LoKr files) is injected into no module at all by diffusers'
    standard ``load_lora_weights`` (it only logs that no ``transformer`` keys were found: a silent drop), and the
    save check reports such a file as not checked rather than passing it. If diffusers gains a kohya SD3 converter,
    this test fails: then drop ``diffusers_kohya: false`` from lora_formats.json."""
    run = _run(T, sd3.model, sd3.training_set, tmp_path, T.C.LoraConfig(rank=4, alpha=4, preset="attention"), "dl_sd3k")
    kohya = T.export.kohya_state_dict(run, torch.float32)
    assert all(k.startswith("lora_unet_joint_blocks_") for k in kohya)
    assert T.export.unmapped_keys(sd3.model, kohya) == []
    result = T.diffusers_check.check(sd3.model, kohya)
    assert not result["checked"] and "SD3" in result["reason"], result
    pipe = sd3.pipeline
    pipe.load_lora_weights(dict(kohya), adapter_name="default_0")
    try:
        assert R.lora_modules(pipe.transformer) == []
    finally:
        pipe.unload_lora_weights()


def test_save_check_reads_files_with_each_pipelines_own_lora_loader(T):
    """The save-time check imports diffusers' LoRA loader mixins, not the pipelines (seconds less in every ComfyUI
    process): each family's ``diffusers_lora_loader`` is the class its ``diffusers_pipeline`` takes
    ``lora_state_dict`` from, so the check converts files exactly as ``load_lora_weights`` does."""
    import diffusers
    from diffusers.loaders import lora_pipeline

    entries = [f for f in T.naming._formats()["families"].values() if f.get("diffusers_pipeline")]
    assert len(entries) >= 5
    for f in entries:
        pipe = getattr(diffusers, f["diffusers_pipeline"])
        (owner,) = [c for c in pipe.__mro__ if "lora_state_dict" in c.__dict__][:1]
        assert getattr(lora_pipeline, f["diffusers_lora_loader"]) is owner, (f["diffusers_pipeline"], owner)
