"""train/diffusers_check.py pinned (issue #26): the save-time prediction of what diffusers' ``load_lora_weights`` loads,
on hand-built LoRA files whose module names come from ComfyUI's own SD1.5 -> diffusers table (the names a diffusers
UNet has) or are made up, in kohya's spelling (``lora_unet_`` + the module path with underscores, as sd-scripts writes
it) and in diffusers' peft spelling. What the check says is compared with what the file holds: how many modules, which
are dropped (a made-up name, a key outside the ``unet`` component), which files are not checkable (LoHa, a family
without a diffusers loader, SD3's kohya names) and the DoRA note. The full agreement with diffusers' own loading is
tests/test_interop_diffusers.py's. Run time: well under 1 s per test (diffusers' converters on a few keys)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def K(comfy):
    return comfy.engine("train.diffusers_check")


@pytest.fixture(scope="module")
def names(comfy, sd15):
    """Four module names of the tiny SD1.5's diffusers UNet (ComfyUI's unet_to_diffusers table): two attention
    projections of one block, an attention output (``to_out.0``) and a ResNet conv."""
    import comfy.utils

    table = comfy.utils.unet_to_diffusers(sd15[0].model.model_config.unet_config)
    mods = sorted(k[:-len(".weight")] for k in table if k.endswith(".weight"))
    pick = [next(m for m in mods if m.endswith("attn1.to_q")), next(m for m in mods if m.endswith("attn1.to_k")),
            next(m for m in mods if m.endswith("attn2.to_out.0")),
            next(m for m in mods if m.endswith("resnets.0.conv1"))]
    return pick


def _kohya(name: str, rank: int = 4) -> dict[str, torch.Tensor]:
    key = "lora_unet_" + name.replace(".", "_")
    return {f"{key}.lora_down.weight": torch.zeros(rank, 8), f"{key}.lora_up.weight": torch.zeros(8, rank),
            f"{key}.alpha": torch.tensor(float(rank))}


def _peft(name: str, prefix: str = "unet.") -> dict[str, torch.Tensor]:
    return {f"{prefix}{name}.lora_A.weight": torch.zeros(4, 8), f"{prefix}{name}.lora_B.weight": torch.zeros(8, 4)}


def test_a_kohya_file_of_real_modules_is_checked_complete(K, sd15, names):
    sd = {k: v for n in names for k, v in _kohya(n).items()}
    out = K.check(sd15[0], sd)
    assert out == {"checked": True, "pipeline": "StableDiffusionPipeline", "modules": 4, "dropped": [],
                   "refused": [], "reason": ""}


def test_a_made_up_module_is_named_as_dropped(K, sd15, names):
    bogus = names[0].rsplit(".", 1)[0] + ".nosuchlayer"
    seq = names[0] + ".0"  # to_q spelled as if it were a Sequential, as to_out is: no such module either
    sd = {k: v for n in [*names, bogus] for k, v in _kohya(n).items()}
    out = K.check(sd15[0], sd)
    assert out["checked"] and out["modules"] == 5 and out["dropped"] == [bogus], out
    out = K.check(sd15[0], {k: v for n in [*names, seq] for k, v in _peft(n).items()})
    assert out["modules"] == 5 and out["dropped"] == [seq], out


def test_peft_files_count_their_modules_and_keys_outside_the_unet_are_dropped(K, sd15, names):
    sd = {k: v for n in names for k, v in _peft(n).items()}
    out = K.check(sd15[0], sd)
    assert out["checked"] and out["modules"] == 4 and out["dropped"] == [] and out["refused"] == [], out
    outside = {**sd, **_peft(names[0], prefix="")}  # the same module without its component: load_lora_weights skips it
    out = K.check(sd15[0], outside)
    assert out["modules"] == 5 and len(out["dropped"]) == 1, out
    assert out["dropped"][0].startswith(names[0] + " (") and "outside the model component" in out["dropped"][0]


def test_dora_files_are_checked_with_the_note_that_diffusers_drops_the_magnitudes(K, sd15, names):
    sd = _kohya(names[0])
    key = next(k for k in sd if k.endswith(".alpha"))[:-len(".alpha")]
    out = K.check(sd15[0], {**sd, f"{key}.dora_scale": torch.ones(1, 8)})
    assert out["checked"] and out["modules"] == 1 and out["dropped"] == []
    assert "dora_scale" in out["reason"] and "LoRA part only" in out["reason"]


def test_files_diffusers_has_no_loader_for_are_not_checked(K, sd15, names):
    key = "lora_unet_" + names[0].replace(".", "_")
    loha = {f"{key}.hada_w1_a": torch.zeros(8, 4), f"{key}.hada_w1_b": torch.zeros(4, 8),
            f"{key}.hada_w2_a": torch.zeros(8, 4), f"{key}.hada_w2_b": torch.zeros(4, 8), f"{key}.alpha": torch.tensor(4.0)}
    out = K.check(sd15[0], loha)
    assert not out["checked"] and "LoHa/LoKr" in out["reason"] and out["dropped"] == []
    # a LoHa key next to a LoRA pair: the file is still not checkable
    assert not K.check(sd15[0], {**_kohya(names[1]), **loha})["checked"]


def test_families_without_a_diffusers_loader_are_not_checked_and_name_the_family(K):
    from support.factories import families

    model = families.build_model("lumina2")
    out = K.check(model, _kohya("layers.0.attention.qkv"))
    assert out == {"checked": False, "dropped": [],
                   "reason": "diffusers has no loader for this family's kohya-format LoRA files (Lumina2)"}
    sd3 = families.build_model("sd3")  # SD3: a diffusers pipeline, but no converter for kohya's names
    out = K.check(sd3, _kohya("joint_blocks.0.x_block.attn.qkv"))
    assert not out["checked"] and "(SD3)" in out["reason"]
    out = K.check(sd3, _peft("transformer_blocks.0.attn.to_q", prefix="transformer."))
    assert out["checked"] and out["pipeline"] == "StableDiffusion3Pipeline" and out["dropped"] == [], out


def test_a_file_diffusers_converter_refuses_is_reported_refused(K, sd15, names):
    """A module with a down but no up weight: diffusers' kohya converter raises, so load_lora_weights would fail
    loudly; the check reports the converter's error as refused (SD1.5 has no width its converter hard-codes)."""
    sd = {k: v for k, v in _kohya(names[0]).items() if not k.endswith("lora_up.weight")}
    out = K.check(sd15[0], sd)
    assert out["checked"] and out["refused"] and out["modules"] == 1 and out["dropped"] == [], out


def test_sdxl_names_diffusers_lacks_are_dropped(K):
    """SDXL: the file goes through diffusers' SGM block renumbering (the UNet's layers per block passed on) and the
    module ComfyUI's table names ``class_embedding`` (its label_emb) is not in diffusers' SDXL UNet (which calls it
    ``add_embedding``): dropped."""
    import comfy.utils

    from support.factories import families

    model = families.build_model("sdxl")
    table = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    mods = sorted(k[:-len(".weight")] for k in table if k.endswith(".weight"))
    real = [next(m for m in mods if m.endswith("attn2.to_k")), next(m for m in mods if m.endswith("resnets.1.conv2"))]
    assert "class_embedding.linear_1" in mods
    out = K.check(model, {k: v for n in real for k, v in _kohya(n).items()})
    assert out["checked"] and out["pipeline"] == "StableDiffusionXLPipeline" and out["modules"] == 2, out
    assert out["dropped"] == [] and out["refused"] == [], out
    out = K.check(model, {k: v for n in [*real, "class_embedding.linear_1"] for k, v in _peft(n).items()})
    assert out["dropped"] == ["class_embedding.linear_1"], out
    # kohya's older SGM names (ComfyUI's own: input_blocks.N.M...): diffusers renumbers them with the UNet's layers
    # per block, which the check passes on as load_lora_weights does
    sgm = [k.removeprefix("diffusion_model.").removesuffix(".weight") for k in (table[m + ".weight"] for m in real)]
    assert all(n.startswith(("input_blocks", "middle_block", "output_blocks")) for n in sgm), sgm
    out = K.check(model, {k: v for n in sgm for k, v in _kohya(n).items()})
    assert out["checked"] and out["refused"] == [] and out["modules"] == 2, out


def test_hidream_to_out_is_one_linear_read_under_the_processor_name(K):
    """HiDream's attention output is one Linear (``to_out``, no ``.0``): a file naming it ``to_out.0`` (diffusers'
    processor form) targets that module, not a missing one."""
    from support.factories import families

    model = families.build_model("hidream")
    mods = sorted(k[:-len(".weight")] for k in model.model.diffusion_model.state_dict() if k.endswith(".weight"))
    to_out = next(m for m in mods if m.endswith(".to_out"))
    assert to_out + ".0" not in mods
    out = K.check(model, {**_peft(to_out + ".0", prefix="transformer."), **_peft("nosuch.to_out.0", prefix="transformer.")})
    assert out["checked"] and out["modules"] == 2 and out["dropped"] == ["nosuch.to_out.0"], out
