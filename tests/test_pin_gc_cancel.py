"""gradient_checkpointing and Cancel pinned on the tiny SD1.5, in process (issue #26).

- gradient_checkpointing: a step with it recomputes every UNet block in backward (its first layer runs twice per
  step; once without), with the same loss and trained weights as the same step without it; ComfyUI's
  ``forward_timestep_embed`` and the blocks are as before afterwards (replaces test_train.py's two 2-step runs).
- Cancel: ``comfy.model_management.interrupt_current_processing`` (what ComfyUI's Cancel button and
  ``POST /interrupt`` call), set between two steps or inside a step's forward pass, stops ``train_steps`` there:
  one checkpoint is written, of the last completed step, holding the weights and the random state that step
  left (a resume then repeats the interrupted step as an uninterrupted run takes it); nothing is written when
  no step completed."""
from __future__ import annotations

import pytest
import torch


def _run(T, sd15, tset, tmp_path, name, **settings):
    return T.loop.init_run(sd15[0], tset, T.C.LoraConfig(rank=4, alpha=4, preset="attention"), T.C.TimestepConfig(),
                           T.C.OptimizerConfig(lr=1e-2), T.st.RunSettings(run_name=name, seed=3, **settings),
                           runs_root=tmp_path / "runs")


def test_checkpointing_recomputes_every_block_with_the_same_step(T, sd15, sd15_training_set, tmp_path):
    """One Train Steps step with and without gradient_checkpointing: with it every UNet block after the first
    runs again in backward (its first layer twice per step), the loss and the trained weights are the same, and
    ComfyUI's function and the blocks are as before afterwards."""
    from comfy.ldm.modules.diffusionmodules import openaimodel

    dm = sd15[0].model.diffusion_model
    units = T.loop.checkpoint_units(dm)
    # independently: the UNet's blocks as ComfyUI builds them (every one holds weights)
    assert sorted(map(id, units)) == sorted(map(id, [*dm.input_blocks, dm.middle_block, *dm.output_blocks]))
    fte = openaimodel.forward_timestep_embed
    before = [dict(vars(u)) for u in units]
    calls = [0] * len(units)
    hooks = [u[0].register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, u in enumerate(units)]
    got = {}
    try:
        for gc in (False, True):  # the same seed: the same draw both times
            calls[:] = [0] * len(units)
            losses = []
            run = T.loop.train_steps(_run(T, sd15, sd15_training_set, tmp_path, f"gc{gc:d}",
                                          gradient_checkpointing=gc), 1,
                                     on_step=lambda r, tr: losses.append(r.loss))
            got[gc] = (losses, run.state["adapters"], list(calls))
            assert openaimodel.forward_timestep_embed is fte
    finally:
        for h in hooks:
            h.remove()
    (l0, a0, off), (l1, a1, on) = got[False], got[True]
    # one forward each without checkpointing; with it, every block whose input or weights need a gradient runs
    # again in backward (the first, the input convolution, sees none: the adapters start after it)
    assert off == [1] * len(units), off
    assert on == [1] + [2] * (len(units) - 1), on
    assert l1 == pytest.approx(l0, rel=1e-6)
    start = T.loop.Trainer(_run(T, sd15, sd15_training_set, tmp_path, "gc_start")).adapter_state()
    ups = [k for k in a0 if k.endswith("lora_up.weight")]
    assert ups and all(not torch.equal(a0[k], start[k]) for k in ups)  # the step trained (up starts at 0)
    for k, v in a0.items():
        torch.testing.assert_close(a1[k], v, rtol=1e-5, atol=1e-6)
    assert [dict(vars(u)) for u in units] == before  # no forward (or anything else) left on the blocks


def _interrupted(T, sd15, tset, tmp_path, name, where):
    """train_steps(10) interrupted ``where`` ('start': before the first step, 'between': after step 2, 'forward':
    inside step 3's forward pass); returns (the runs handed to save, what on_step saw per step)."""
    import comfy.model_management as mm

    saved, seen = [], {}
    armed = [where == "start"]
    if armed[0]:
        mm.interrupt_current_processing(True)

    def save(run, keep_last):
        saved.append(run)
        return (f"{name}-{run.step}",)

    def on_step(r, trainer):
        seen[r.step] = (trainer.adapter_state(), trainer.gen.get_state(), trainer.py_rng.getstate())
        if r.step == 2 and where == "between":
            mm.interrupt_current_processing(True)
        if r.step == 2 and where == "forward":
            armed[0] = True

    dm = sd15[0].model.diffusion_model
    hook = dm.middle_block[0].register_forward_pre_hook(
        lambda *a: mm.interrupt_current_processing(True) if armed[0] and where == "forward" else None)
    try:
        run = _run(T, sd15, tset, tmp_path, name)
        with pytest.raises(mm.InterruptProcessingException):
            T.loop.train_steps(run, 10, on_step=on_step, save=save)
    finally:
        hook.remove()
        mm.interrupt_current_processing(False)
    assert run.step == 0  # the run given is unchanged
    return saved, seen


def test_cancel_keeps_the_last_completed_step(T, sd15, sd15_training_set, tmp_path):
    saved, seen = _interrupted(T, sd15, sd15_training_set, tmp_path, "c0", "start")
    assert saved == [] and seen == {}  # nothing trained: nothing to keep
    for where in ("between", "forward"):
        saved, seen = _interrupted(T, sd15, sd15_training_set, tmp_path, f"c_{where}", where)
        assert sorted(seen) == [1, 2], where  # stopped within the step
        assert len(saved) == 1, where
        ck = saved[0]
        assert ck.step == 2 and [h["step"] for h in ck.history] == [1, 2], where
        adapters, gen, py = seen[2]  # what step 2 left
        assert ck.state["adapters"].keys() == adapters.keys()
        for k, v in adapters.items():
            assert torch.equal(ck.state["adapters"][k], v), (where, k)
        up = next(k for k in adapters if k.endswith("lora_up.weight"))
        assert not torch.equal(adapters[up], seen[1][0][up])  # step 2 trained
        assert torch.equal(ck.state["rng"], gen), where
        assert ck.state["py_rng"] == list(py[1]) + [py[2]], where
