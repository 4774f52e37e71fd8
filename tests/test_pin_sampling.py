"""Sampling helpers pinned to hand-computed values (issue #26): A/B difference metrics (MAE, max, RMSE, PSNR),
the |A-B| figure, loss-history input, preview plans (when they are due, prompt lists), sample settings and seeds,
the guidance value on the conditioning, checkpoint steps and ordering, the file resolver's refusals, A/B record
differences and validation curves, and the LoRA recipe checks. In-process; no sampling (the sampler paths are
compared with the stock KSampler in test_sampling_*.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def M(comfy):
    class NS:
        compare = comfy.engine("sampling.compare")
        history = comfy.engine("sampling.history")
        plans = comfy.engine("sampling.plans")
        render = comfy.engine("sampling.render")
        ck = comfy.engine("sampling.checkpoints")
        ab = comfy.engine("sampling.ab_training")
        recipe = comfy.engine("sampling.lora_recipe")
        C = comfy.engine("train.config")
    return NS


# -- compare --------------------------------------------------------------------------------------------------
def test_metrics_are_mae_max_rmse_psnr(M):
    a = torch.full((1, 2, 2, 3), 0.25)
    b = a.clone()
    b[0, 0, 0, 0], b[0, 1, 1, 2] = 0.75, 0.0  # diffs: 0.5 and 0.25 among 12 values
    m = M.compare.metrics(a, b)
    mse = (0.5 ** 2 + 0.25 ** 2) / 12
    assert m["mean_abs_diff"] == pytest.approx(0.75 / 12)
    assert m["max_abs_diff"] == pytest.approx(0.5)
    assert m["rmse"] == pytest.approx(math.sqrt(mse))
    assert m["psnr_db"] == pytest.approx(10 * math.log10(1 / mse))
    assert M.compare.metrics(a, a)["psnr_db"] == math.inf and M.compare.metrics(a, a)["rmse"] == 0
    d = M.compare.diff_image(a, b)
    assert d[0, 0, 0, 0] == 1.0 and d[0, 1, 1, 2] == pytest.approx(1.0) and d.sum() == pytest.approx(2.0)
    d2 = M.compare.diff_image(a, a + 0.05, gain=3.0)
    torch.testing.assert_close(d2, torch.full_like(a, 0.15))
    safe = M.compare.json_safe([{"psnr_db": math.inf, "rmse": 0.0, "prompt": "x"}, {"psnr_db": 12.5}])
    assert safe == [{"psnr_db": None, "rmse": 0.0, "prompt": "x"}, {"psnr_db": 12.5}]
    json.dumps(safe, allow_nan=False)


# -- history --------------------------------------------------------------------------------------------------
def test_history_from_run_or_json(M):
    run = SimpleNamespace(history=[{"step": 1, "loss": 0.5}])
    out = M.history.history_from(run)
    assert out == run.history and out[0] is not run.history[0]
    text = json.dumps([{"step": 3, "loss": 1.0}, {"step": 1, "loss": 2.0}])
    assert [h["step"] for h in M.history.history_from(None, text)] == [1, 3]
    assert M.history.history_from(None, "  ") == []
    with pytest.raises(ValueError, match="history_json: not valid JSON"):
        M.history.history_from(None, "[1,")
    for bad in ('{"step": 1, "loss": 1}', '[{"step": 1}]', '[{"loss": 1}]', "[1]"):
        with pytest.raises(ValueError, match="must be a list of"):
            M.history.history_from(None, bad)


# -- plans and settings ---------------------------------------------------------------------------------------
def test_plan_is_due_every_n_steps(M):
    s = M.render.SampleSettings(steps=1, width=64, height=64)
    plan = M.plans.PreviewPlan(None, ("a",), (), [], s, 3)
    assert [k for k in range(0, 10) if plan.due(k)] == [3, 6, 9]
    every1 = M.plans.PreviewPlan(None, ("a",), (), [], s, 1)
    assert [k for k in range(0, 3) if every1.due(k)] == [1, 2]
    with pytest.raises(ValueError, match="every_n must be >= 1"):
        M.plans.make_plan(None, None, ["a"], "", s, 0)
    assert M.plans.prompt_list("  a red circle \n\n b \n") == ["a red circle", "b"]


def test_settings_validate_every_field(M):
    S = M.render.SampleSettings
    assert S(steps=1, width=8, height=8).steps == 1  # the smallest valid values
    for kw in ({"steps": 0}, {"width": 7}, {"height": 7}):
        with pytest.raises(ValueError, match="steps must be >= 1 and width/height >= 8"):
            S(**kw)
    with pytest.raises(ValueError, match="scheduler"):
        S(scheduler="no_such_scheduler")
    with pytest.raises(M.C.ConfigError, match="cfg is nan"):
        S(cfg=float("nan"))
    with pytest.raises(M.C.ConfigError, match="guidance is inf"):
        S(guidance=float("inf"))
    assert S(seed=4, seed_mode="walk").seed_for() == 4 and S(seed=4, seed_mode="walk").seed_for(3) == 7
    assert S(seed=4).seed_for(3) == 4
    assert M.render.short("abcdef", 4) == "abc…" and M.render.short("abcd", 4) == "abcd"


def test_encode_puts_guidance_on_every_conditioning(M, comfy):
    from support.factories import te_t5
    from support.factories import text_encoders as te

    clip = te_t5.pixart_clip(te.t5_tiny_file())
    cond = M.render.encode(clip, "a red circle", 2.75)
    ref = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"))
    assert len(cond) == len(ref) >= 1
    for (c, d), (rc, _) in zip(cond, ref):
        assert d["guidance"] == 2.75 and torch.equal(c, rc)


def test_grid_geometry_and_labels(M):
    red = torch.zeros(1, 16, 24, 3)
    red[..., 0] = 1.0
    g, geo = M.render.grid([[red, red], [red, red]], ["r0", "r1"], ["c0", "c1"], [["a", "b"], ["c", "d"]])
    assert geo["row_labels"] == ["r0", "r1"] and geo["col_labels"] == ["c0", "c1"]
    assert geo["cell_labels"] == [["a", "b"], ["c", "d"]]
    x0, y0, x1, y1 = geo["cell_boxes"][1][1]
    assert (x1 - x0, y1 - y0) == (24, 16)
    assert torch.equal(g[0, y0:y1, x0:x1], red[0])
    assert M.render.grid([[red]], ["r"], ["c"])[1]["cell_labels"] is None


# -- checkpoints ----------------------------------------------------------------------------------------------
def test_step_of_prefers_metadata_then_the_file_name(M):
    step_of = M.ck.step_of
    assert step_of(Path("x-000007.safetensors"), {}) == 7
    assert step_of(Path("x-7.safetensors"), {"ss_steps": "12"}) == 12
    assert step_of(Path("x-7.safetensors"), {"aligned_trainer.steps": "5", "ss_steps": "12"}) == 5
    assert step_of(Path("x-7.safetensors"), {"step": "3", "aligned_trainer.steps": "5"}) == 3
    assert step_of(Path("x-7.safetensors"), {"step": "three", "ss_steps": ""}) == 7
    assert step_of(Path("final.safetensors"), {}) is None


def test_resolve_refuses_what_is_not_a_lora(M, comfy_dirs, tmp_path):
    folder = comfy_dirs["models"] / "loras" / "pin_resolve"
    (folder / "empty").mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.zeros(1)}, str(folder / "b.safetensors"))
    save_file({"w": torch.zeros(1)}, str(folder / "a.safetensors"))
    (folder / "notes.txt").write_text("x")
    assert [p.name for p in M.ck.resolve("pin_resolve")] == ["a.safetensors", "b.safetensors"]
    assert [p.name for p in M.ck.resolve(" pin_resolve/b.safetensors \n\n pin_resolve/a.safetensors")] == \
        ["b.safetensors", "a.safetensors"]
    with pytest.raises(ValueError, match="give a folder of LoRA files"):
        M.ck.resolve(" \n ")
    with pytest.raises(ValueError, match="no .safetensors files in 'pin_resolve/empty'"):
        M.ck.resolve("pin_resolve/empty")
    with pytest.raises(ValueError, match="'pin_resolve/notes.txt' is neither a folder nor a .safetensors file"):
        M.ck.resolve("pin_resolve/notes.txt")
    outside = tmp_path / "c.safetensors"
    save_file({"w": torch.zeros(1)}, str(outside))
    with pytest.raises(ValueError, match="LoRA path"):
        M.ck.resolve(str(outside))


def test_checkpoint_grid_refuses_a_non_finite_strength(M):
    s = M.render.SampleSettings(steps=1, width=64, height=64)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="strength is .*finite"):
            M.ck.checkpoint_grid(None, None, None, [], ["a"], "", s, strength=bad)


# -- A/B training ---------------------------------------------------------------------------------------------
def test_differences_walk_nested_records(M):
    a = {"config": {"lora": {"rank": 4, "alpha": 4}, "seed": 1}, "te_spec": {"id": "sd15"}, "steps": 2}
    b = {"config": {"lora": {"rank": 4, "alpha": 8}, "seed": 1}, "te_spec": None, "steps": 2, "extra": 1}
    assert M.ab.differences(a, b) == ["config/lora/alpha", "extra", "te_spec"]
    assert M.ab.differences(a, a) == []
    run = SimpleNamespace(training_set=SimpleNamespace(meta={"prompt_syntax": "literal", "clip_id": "c",
                                                             "dataset_hash": "h"}),
                          config_json=lambda: {"k": 1}, te_spec={"id": "sd15"}, step=3)
    assert M.ab.run_record(run) == {"config": {"k": 1}, "te_spec": {"id": "sd15"}, "prompt_syntax": "literal",
                                    "clip_id": "c", "dataset_hash": "h", "steps": 3}


def test_val_curves_draw_validation_or_training_loss(M):
    """A run's validation losses are drawn (its training losses ignored); a run without validation points
    falls back to its training losses, drawn exactly where the same values as validation points would be."""
    import numpy as np

    pts_a, pts_b = ((1, 1.0), (2, 0.5), (3, 0.25)), ((1, 2.0), (2, 1.5), (3, 1.0))
    val_a = [{"step": s, "loss": 9.0, "val_loss": v} for s, v in pts_a]
    only_val_a = [{"step": s, "val_loss": v} for s, v in pts_a]
    train_b = [{"step": s, "loss": v} for s, v in pts_b]
    val_b = [{"step": s, "val_loss": v} for s, v in pts_b]
    img = np.asarray(M.ab.val_curves([val_a, train_b], ["A", "B"]))
    body = slice(24, None)  # below the title and legend
    assert np.array_equal(img[body], np.asarray(M.ab.val_curves([only_val_a, train_b], ["A", "B"]))[body])
    assert np.array_equal(img[body], np.asarray(M.ab.val_curves([only_val_a, val_b], ["A", "B"]))[body])
    for c in M.ab.COLORS:
        assert np.all(img[body] == np.array(c, dtype=np.uint8), axis=-1).sum() > 50  # both curves drawn
    empty = np.asarray(M.ab.val_curves([[], []], ["A", "B"]))
    assert not np.any(np.all(empty == np.array(M.ab.COLORS[0], dtype=np.uint8), axis=-1))


# -- LoRA recipe ----------------------------------------------------------------------------------------------
def _lora_file(path: Path, meta: dict) -> Path:
    save_file({"w": torch.zeros(1)}, str(path), metadata=meta)
    return path


def test_read_recipe_from_metadata(M, tmp_path):
    spec = {"id": "sd15", "variant": "default", "hash": "abc"}
    r = M.recipe.read_recipe(_lora_file(tmp_path / "a.safetensors", {
        "aligned_trainer.te_spec": json.dumps(spec), "aligned_trainer.prompt_syntax": "comfyui",
        "aligned_trainer.base_model": "SD15"}))
    assert r == M.recipe.Recipe(te_spec=spec, prompt_syntax="comfyui", base_model="SD15")
    for raw in ("not json", "null", json.dumps({"variant": "x"}), "[1]"):
        r = M.recipe.read_recipe(_lora_file(tmp_path / "b.safetensors", {"aligned_trainer.te_spec": raw}))
        assert r == M.recipe.Recipe(None, None, None), raw
    assert M.recipe.spec_key({"id": "sd3", "variant": "diffusers"}) == "sd3:diffusers"
    assert M.recipe.spec_key({"id": "sd15", "variant": "default"}) == M.recipe.spec_key({"id": "sd15"}) == "sd15"


def _model(config_name: str):
    return SimpleNamespace(model=SimpleNamespace(model_config=type(config_name, (), {})()))


def _clip(tokenizer_name: str):
    return SimpleNamespace(tokenizer=type(tokenizer_name, (), {})(), cond_stage_model=None)


def test_recipe_check_names_each_mismatch(M, comfy):
    specs = comfy.engine("te.specs")
    sd15 = specs.get_spec("sd15")
    ok = M.recipe.Recipe(te_spec=sd15.identity(), prompt_syntax="literal", base_model="SD15")
    assert M.recipe.check(ok, _model("SD15"), _clip("SD1Tokenizer")) == []
    assert M.recipe.check(ok, SimpleNamespace(), _clip("SD1Tokenizer")) == []  # base unknown: nothing to compare
    (w,) = M.recipe.check(ok, _model("SDXL"), _clip("SD1Tokenizer"))
    assert w.startswith("the LoRA was trained on a SD15 model, this model is SDXL")
    (w,) = M.recipe.check(ok, _model("SD15"), _clip("SDXLTokenizer"))
    assert "trained with text-encoder spec 'sd15', but this CLIP is sdxl" in w
    (w,) = M.recipe.check(ok, _model("SD15"), _clip("NoTokenizer"))
    assert "this CLIP is of no known family" in w
    changed = M.recipe.Recipe(te_spec={**sd15.identity(), "hash": "0123"}, prompt_syntax=None, base_model=None)
    (w,) = M.recipe.check(changed, _model("SD15"), _clip("SD1Tokenizer"))
    assert w.startswith("te_specs/sd15.json changed since training (hash 0123 -> " + sd15.hash)
    nohash = M.recipe.Recipe(te_spec={"id": "sd15"}, prompt_syntax=None, base_model=None)
    assert M.recipe.check(nohash, _model("SD15"), _clip("SD1Tokenizer")) == []
    gone = M.recipe.Recipe(te_spec={"id": "sd15", "variant": "gone"}, prompt_syntax=None, base_model=None)
    (w,) = M.recipe.check(gone, _model("SD15"), _clip("SD1Tokenizer"))
    assert w == "the recorded spec 'sd15:gone' is not in te_specs/; the CLIP is left unaligned"
    assert M.recipe.check(M.recipe.Recipe(None, None, None), _model("SD15"), _clip("X")) == []


def test_apply_aligns_the_clip_to_the_recorded_recipe(M, comfy, sd15, tmp_path):
    """Load LoRA (aligned) on the tiny SD1.5 with LoRA files that hold no matching weights (only the recipe
    matters here): the CLIP follows the recorded spec and syntax; an unknown syntax falls back to the spec's;
    a file without a recipe is reported; the report names what was recorded and returned."""
    model, clip, _ = sd15
    align = comfy.engine("te.align")
    spec = json.dumps(comfy.engine("te.specs").get_spec("sd15").identity())
    meta = {"aligned_trainer.te_spec": spec, "aligned_trainer.base_model": type(model.model.model_config).__name__}
    a = M.recipe.apply(model, clip, _lora_file(tmp_path / "a.safetensors",
                                               {**meta, "aligned_trainer.prompt_syntax": "comfyui"}), 1.0, 1.0)
    assert isinstance(a.clip, align.AlignedCLIP) and a.clip.prompt_syntax == "comfyui" and a.warnings == ()
    assert a.clip.aligned_trainer_spec["id"] == "sd15"
    assert a.report().splitlines()[0] == ("recorded te_spec: sd15; prompt syntax: comfyui; base model: "
                                          + meta["aligned_trainer.base_model"])
    assert "'prompt_syntax': 'comfyui'" in a.report().splitlines()[1] and "WARNING" not in a.report()
    b = M.recipe.apply(model, a.clip, _lora_file(tmp_path / "b.safetensors",
                                                 {**meta, "aligned_trainer.prompt_syntax": "weird"}), 1.0, 1.0)
    assert b.clip.prompt_syntax == "literal" and b.warnings == ()
    c = M.recipe.apply(model, clip, _lora_file(tmp_path / "c.safetensors", {}), 1.0, 1.0)
    assert not isinstance(c.clip, align.AlignedCLIP)
    assert c.warnings == ("c.safetensors records no text-encoder recipe (not saved by Aligned Trainer); the CLIP is "
                          "returned unaligned",)
    assert c.report().splitlines() == ["recorded te_spec: none (ComfyUI's default CLIP); prompt syntax: not recorded; "
                                       "base model: not recorded", "CLIP returned: unaligned (ComfyUI default)",
                                       "WARNING: " + c.warnings[0]]
    d = M.recipe.apply(model, clip, _lora_file(tmp_path / "d.safetensors", {"aligned_trainer.prompt_syntax": "literal"}),
                       1.0, 1.0)
    assert d.warnings == ()  # trained with ComfyUI's default CLIP: nothing to align, nothing to warn about


def test_differences_keep_every_path_across_nested_records(M):
    a = {"a_top": 1, "config": {"lora": {"rank": 4}, "seed": 1}, "z": {"x": 1}}
    b = {"a_top": 2, "config": {"lora": {"rank": 8}, "seed": 2}, "z": {"x": 2}}
    assert M.ab.differences(a, b) == ["a_top", "config/lora/rank", "config/seed", "z/x"]


# What the A/B validation chart shows, read back from its pixels: the title, one legend entry per run (a swatch
# in the run's colour, then "label (validation|training)"), each point as a 5 px dot, each run's line 2 px
# wide, the frame in the chart's muted grey, and "no steps yet" on an empty chart. Text is read back by
# comparing the region with the same text set alone on a blank chart (same font size and place).
def _text_alone(M, size, xy, text, fill, px):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, M.ab.BG)
    ImageDraw.Draw(img).text(xy, text, fill=fill, font=M.ab.font(px))
    return img


def _box(mask):
    import numpy as np

    ys, xs = np.nonzero(mask)
    return (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())) if len(xs) else None


def test_val_curves_title_legend_dots_and_line_width(M):
    import numpy as np

    size = W, H = (640, 360)
    L, R, T, B = M.ab.plot.MARGINS
    a = [{"step": s, "loss": 9.0, "val_loss": 0.75} for s in (1, 3, 5)]   # validation: flat at 3/4
    b = [{"step": 0, "loss": 0.0}, {"step": 6, "loss": 1.0}]             # training only: two points
    img = M.ab.val_curves([a, b], ["A", "B"], size=size, title="A/B loss")
    px = np.asarray(img)
    col = [np.all(px == np.array(c, dtype=np.uint8), axis=-1) for c in M.ab.COLORS]
    # the title, top left of the plot area, 13 px, in the foreground colour
    ref = np.asarray(_text_alone(M, size, (L, 6), "A/B loss", M.ab.FG, 13))
    assert np.array_equal(px[:24, 40:300], ref[:24, 40:300])
    assert np.all(px[:24, 40:300] == np.array(M.ab.FG, dtype=np.uint8), axis=-1).sum() >= 10
    # legend: a 9x9 swatch per run, from 320 px left of the right edge, each label after its swatch; the second
    # entry starts 20 px after the first label's text
    f = M.ab.font(11)
    x1 = W - 320
    x2 = x1 + 20 + int(f.getlength("A (validation)"))
    assert _box(col[0][:24]) == (x1, 11, x1 + 8, 19)
    assert _box(col[1][:24]) == (x2, 11, x2 + 8, 19)
    for x, text in ((x1, "A (validation)"), (x2, "B (training)")):
        ref = np.asarray(_text_alone(M, size, (x + 11, 8), text, M.ab.MUTED, 11))
        span = slice(x + 9, x + 11 + int(f.getlength(text)) + 2)
        assert np.array_equal(px[:24, span], ref[:24, span]), text
    # points where the axes put them (x over steps 0..6, y over values 0..1), each a 5x5 dot
    def at(step, v):
        return int(L + step / 6 * (W - L - R)), int(T + (1 - v) * (H - T - B))

    for s in (1, 3, 5):
        x, y = at(s, 0.75)
        assert col[0][y - 2:y + 3, x].all() and col[0][y, x - 2:x + 3].all() and col[0][y - 1:y + 2, x - 1:x + 2].all()
        assert not col[0][y - 3, x] and not col[0][y + 3, x]
    x, y = at(3, 0.75)  # a whole pixel: the dot is the 5x5 disc around it (rows of 3, 5, line, line, 3)
    assert int(col[0][y - 6:y + 7, x].sum()) == 5          # the dot, 5 px tall
    assert [int(col[0][r, x - 6:x + 7].sum()) for r in (y - 2, y - 1, y + 2)] == [3, 5, 3]
    xm = (at(1, 0)[0] + at(3, 0)[0]) // 2
    assert int(col[0][T + 1:H - B, xm].sum()) == 2         # between dots: the line, 2 px wide
    # the two-point training curve is a line from corner to corner of the plot area
    for s in (1, 2, 3, 4, 5):
        x, y = at(s, s / 6)
        assert col[1][y - 2:y + 3, x].any()
    # frame in the chart's muted grey
    assert tuple(px[(T + H - B) // 2, L]) == M.ab.MUTED and tuple(px[(T + H - B) // 2, W - R]) == M.ab.MUTED
    # empty: the words "no steps yet" at mid-height, nothing else below the title
    empty = np.asarray(M.ab.val_curves([[], []], ["A", "B"], size=size, title="A/B loss"))
    ref = np.asarray(_text_alone(M, size, (L, H // 2), "no steps yet", M.ab.MUTED, 11))
    assert np.array_equal(empty[24:], ref[24:])
    assert np.any(empty[24:] != np.array(M.ab.BG, dtype=np.uint8), axis=-1).sum() > 10  # and it is not blank

