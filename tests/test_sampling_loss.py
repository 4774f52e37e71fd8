"""Loss Graph engine on plain lists (no training run needed) and the node's JSON input."""
from __future__ import annotations

import json

import pytest
import torch

P = "AlignedTrainer_"


def history():
    loss = [5, 4, 3, 2, 3, 4, 5, 4, 1, 2, 3, 4, 5, 6, 7]
    return [{"step": i + 1, "loss": v, "lr": 1e-4, **({"val_loss": v + 0.5} if i % 3 == 0 else {})}
            for i, v in enumerate(loss)]


def test_ema_minima_and_validation(comfy):
    plot = comfy.engine("plot")
    vals = [1.0, 3.0, 2.0, 5.0]
    sm = plot.ema(vals, 0.5)
    acc, ref = 0.0, []
    for i, v in enumerate(vals):  # bias-corrected EMA, computed independently
        acc = 0.5 * acc + 0.5 * v
        ref.append(acc / (1 - 0.5 ** (i + 1)))
    assert sm == pytest.approx(ref) and sm[0] == vals[0]
    info = plot.summarize(history(), smoothing=0.0, window=2)
    assert info["smoothed_minima_steps"] == [4, 9]
    assert [s for s, _ in info["val"]] == [1, 4, 7, 10, 13]
    assert info["best_val_step"] == 4  # val 2.5 at step 4 (step 10 has 2.5 too; first wins)


def test_loss_graph_node_draws_minima_and_reads_json(comfy):
    plot, imaging = comfy.engine("plot"), comfy.engine("imaging")
    img, summary = comfy.call(P + "LossGraph", history_json=json.dumps(history()), smoothing=0.0)
    s = json.loads(summary)
    # default window 5: step 4 (loss 2) sees step 9 (loss 1), so only step 9 is a local minimum
    assert s["steps"] == 15 and s["best_val_step"] == 4 and s["smoothed_minima_steps"] == [9]
    assert img.shape == (1, 360, 640, 3)
    px = (img[0] * 255).round()
    for color in (plot.LOSS, plot.VAL, plot.MINIMA):  # loss, validation and minima markers are drawn
        assert (px == torch.tensor(color, dtype=px.dtype)).all(-1).sum() > 10, color
    flat, _ = comfy.call(P + "LossGraph", history_json=json.dumps([{"step": 1, "loss": 1.0}]), smoothing=0.9)
    assert flat.shape == img.shape
    empty, _ = comfy.call(P + "LossGraph", history_json="", smoothing=0.9)
    assert empty.shape == img.shape and imaging.BG is not None
    with pytest.raises(ValueError, match="loss history JSON"):
        comfy.call(P + "LossGraph", history_json='{"x": 1}', smoothing=0.5)
    with pytest.raises(ValueError, match="history_json"):
        comfy.call(P + "LossGraph", history_json="[{", smoothing=0.5)


@pytest.mark.server
def test_loss_graph_hostile_histories_through_the_server(server):
    """Histories a user can paste into history_json (or a diverged run's NaN loss): a NaN/inf loss is left out of the
    plot and its step listed; losses near +-1e308 still draw; malformed records are refused naming the record.
    Before: bare 'cannot convert float NaN to integer', RecursionError, 'could not convert string to float' and a
    TypeError on null."""
    from support.api_nodes import execution_error, node

    def prompt(text):
        return {"1": node(server, P + "LossGraph", history_json=text, smoothing=0.0),
                "2": node(server, "PreviewAny", source=["1", 1]), "3": node(server, "PreviewImage", images=["1", 0])}

    drawn = [(json.dumps(history()[:3] + [{"step": 4, "loss": float("nan")}, {"step": 5, "loss": float("inf")}]),
              [4, 5], 3),
             ('[{"step": 1, "loss": -1e308}, {"step": 2, "loss": 1e308}, {"step": 3, "loss": 0}]', [], 3)]
    for text, left_out, kept in drawn:
        entry = server.run(prompt(text))
        s = json.loads(entry["outputs"]["2"]["text"][0])
        assert s["non_finite_loss_steps"] == left_out and s["steps"] == kept, s
    refused = {"[" * 100_000 + "]" * 100_000: "nested too deeply",
               '[{"step": 1, "loss": "y"}]': "record 0 has loss 'y'",
               '[{"step": 1, "loss": 1}, {"step": null, "loss": 2}]': "record 1 has step None",
               '[{"step": NaN, "loss": 1}]': "record 0 has step nan",
               '[{"step": 1, "loss": 1, "val_loss": "x"}]': "record 0 has val_loss 'x'"}
    for text, words in refused.items():
        err = execution_error(server, prompt(text))
        assert err["node_type"] == P + "LossGraph" and words in err["exception_message"], (text[:40], err)
