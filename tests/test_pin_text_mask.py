"""The text mask handed to denoisers that drop it (train/text_mask.py), pinned in process (issue #26, survivors of
the first run): the joint bias against a hand-built tensor; the token grid of a non-square latent; the form each
model takes asked afresh of the model (the tiny Chroma keeps the joint bias, SD1.5 keeps none); ``for_model``'s
output for Chroma and the cases it leaves alone."""
from __future__ import annotations

import math

import torch

INF = float("-inf")


def test_joint_bias_hides_masked_text_keys_from_every_query(comfy):
    tm = comfy.engine("train.text_mask")
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    bias = tm.joint_bias(mask, 2, dtype=torch.float16)
    row = torch.tensor([[0, 0, INF, 0, 0], [0, INF, INF, 0, 0]], dtype=torch.float16)
    assert bias.dtype == torch.float16 and bias.shape == (2, 5, 5) and bias.is_contiguous()
    assert torch.equal(bias, row[:, None, :].expand(2, 5, 5))


def test_chroma_gets_the_joint_bias_on_its_token_grid(comfy, family_bundle, sd15, monkeypatch):
    tm = comfy.engine("train.text_mask")
    align = comfy.engine("te.align")
    model, clip, _ = family_bundle("chroma")
    (cond,) = comfy.nodes.CLIPTextEncode().encode(align.align_clip(clip, "chroma"), "ohwx, a red circle")
    extras = cond[0][1]
    mask = extras["attention_mask"]
    assert mask.ndim == 2 and not bool((mask > 0).all())  # the aligned Chroma mask hides padding
    base = model.model
    patch = base.diffusion_model.patch_size
    latent = torch.zeros(1, 16, 6, 10)  # not square
    grid = (math.ceil(6 / patch), math.ceil(10 / patch))
    assert tm._token_grid(base.diffusion_model, latent) == grid
    assert tm._token_grid(base.diffusion_model, latent[0]) is None  # a latent without its batch axis
    monkeypatch.setattr(tm, "_FORM", {})  # asked of the models afresh, once each
    out = tm.for_model(base, extras, latent)
    assert out[tm.SHAPE_KEY] == grid and torch.equal(out[tm.KEY], tm.joint_bias(mask, grid[0] * grid[1]))
    assert tm._FORM == {type(base): "joint"}
    # left alone: no mask hidden, a mask not per token, a bias already joint
    ones = {**extras, tm.KEY: torch.ones_like(mask)}
    assert tm.for_model(base, ones, latent) is ones
    cube = {**extras, tm.KEY: mask[:, None, :]}
    assert tm.for_model(base, cube, latent) is cube
    given = {**extras, tm.SHAPE_KEY: grid}
    assert tm.for_model(base, given, latent) is given
    # SD1.5's conds keep no attention mask in either form
    sd = sd15[0].model
    assert tm._form(sd, {tm.KEY: mask}, torch.zeros(1, 4, 8, 8), (4, 4)) == "none"
    assert tm.for_model(sd, extras, torch.zeros(1, 4, 8, 8)) is extras
