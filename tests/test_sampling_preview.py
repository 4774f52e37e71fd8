"""Sample Preview through ComfyUI's own sampler path (tiny SD1.5): same seed -> same image, stock-equal cells,
grid geometry and labels, walk seeds."""
from __future__ import annotations

import pytest
import torch
from support.factories.lora import cell, stock_render

P = "AlignedTrainer_"
KW = dict(seed=7, seed_mode="fixed", steps=2, cfg=2.0, guidance=3.5, sampler_name="euler", scheduler="normal",
          width=64, height=64)
PROMPTS = ["a red circle", "a blue square"]


def test_preview_cells_equal_stock_ksampler_and_grid_geometry(comfy, sd15):
    model, clip, vae = sd15
    plans, render, imaging = comfy.engine("sampling.plans"), comfy.engine("sampling.render"), comfy.engine("imaging")
    s = render.SampleSettings(steps=2, cfg=2.0, width=64, height=64, seed=7)
    g, cells, geo = plans.preview_grid(model, clip, vae, PROMPTS, "", s, step=3)
    g2, cells2 = comfy.call(P + "SamplePreview", model=model, clip=clip, vae=vae, prompts="\n".join(PROMPTS) + "\n",
                            negative="", step=3, **KW)
    assert torch.equal(cells, cells2) and torch.equal(g, g2)  # same seed -> same image (engine and node, twice)
    assert cells.shape == (2, 64, 64, 3) and not torch.equal(cells[0], cells[1])
    assert tuple(g.shape[1:3]) == tuple(reversed(geo["size"]))
    assert geo["row_labels"] == ["step 3"] and geo["col_labels"] == PROMPTS
    assert geo["cell_labels"] == [["seed 7", "seed 7"]] and geo["seeds"] == [[7, 7]]
    bg = torch.tensor(imaging.BG, dtype=torch.float32) / 255
    for j, prompt in enumerate(PROMPTS):
        x0, y0, x1, y1 = geo["cell_boxes"][0][j]
        assert (x1 - x0, y1 - y0) == (64, 64)
        assert (cell(g, geo, 0, j) - cells[j]).abs().max() <= 1 / 255 + 1e-6  # the cell is that image
        header = g[0, :y0, x0:x1]  # the column label above the cell is drawn (not background)
        assert ((header - bg).abs().sum(-1) > 0.1).any()
        ref = stock_render(comfy.nodes, model, clip, vae, prompt, "", 7)
        assert torch.allclose(cells[j:j + 1], ref, atol=1e-5), prompt


def test_walk_seed_is_base_plus_step(comfy, sd15):
    model, clip, vae = sd15
    plans, render = comfy.engine("sampling.plans"), comfy.engine("sampling.render")
    s = render.SampleSettings(steps=2, cfg=2.0, width=64, height=64, seed=10, seed_mode="walk")
    assert [s.seed_for(k) for k in (0, 5, 6)] == [10, 15, 16]
    assert render.SampleSettings(seed=10).seed_for(6) == 10
    _, a, ga = plans.preview_grid(model, clip, vae, ["x"], "", s, step=5)
    _, b, gb = plans.preview_grid(model, clip, vae, ["x"], "", s, step=6)
    assert ga["cell_labels"] == [["seed 15"]] and gb["cell_labels"] == [["seed 16"]]
    assert not torch.equal(a, b)
    assert torch.allclose(a, stock_render(comfy.nodes, model, clip, vae, "x", "", 15), atol=1e-5)  # 10 + step 5


def test_settings_errors_name_the_field(comfy):
    render, plans = comfy.engine("sampling.render"), comfy.engine("sampling.plans")
    with pytest.raises(ValueError, match="seed_mode"):
        render.SampleSettings(seed_mode="random")
    with pytest.raises(ValueError, match="sampler"):
        render.SampleSettings(sampler="no_such_sampler")
    with pytest.raises(ValueError, match="prompts"):
        plans.prompt_list(" \n \n")
