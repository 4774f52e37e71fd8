"""The text-encoder swap's small modules pinned (issue #26): ``te_swap_measure`` (token / vector spreads, the captions
measured), ``te_swap_reset`` (PyTorch's default Linear init, the refusals of models without cross-attention) and
``te_swap_pooled`` (the adm's pooled vector: its source, head, scale and report) on hand-built tensors whose expected
values come from Python's ``statistics`` module or PyTorch's own ``nn.init`` functions, not from the code under test;
and ``te_swap`` itself: the projection's init (pooled head included), a one-caption setup from a dataset under
inference mode (as the node runs) with its refusal of an old CLIP of another width, and the preview plan projected by
a run's adapters. No model is loaded beyond the session's tiny SD1.5 / SDXL; the setups encode one caption."""
from __future__ import annotations

import math
import statistics

import pytest
import torch


def _pstd(row) -> float:
    return statistics.pstdev([float(v) for v in row])


# three tokens of four channels with different spreads
TOKENS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 8.0, 0.0], [5.0, -5.0, 5.0, -5.0]])


def _assert_default_linear_init(layers, seed: int) -> None:
    """Each Linear of ``layers`` holds PyTorch's default Linear init (``nn.init``: kaiming-uniform weight, uniform
    bias in +-1/sqrt(fan_in)), drawn in turn from one generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    for layer in layers:
        w, b = torch.empty(layer.weight.shape), torch.empty(layer.bias.shape)
        torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
        bound = 1 / math.sqrt(w.shape[1])
        torch.nn.init.uniform_(b, -bound, bound, generator=g)
        torch.testing.assert_close(layer.weight.detach(), w, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.bias.detach(), b, atol=1e-6, rtol=0)


def test_token_std_counts_every_token_or_the_masked_ones(M):
    """All three tokens counted without a mask (population std per token, averaged); a mask of the conditioning's
    length counts only its valid (> 0) tokens, over several captions; a mask of another length is ignored; extras
    that are not a dict count every token; no valid token at all is refused."""
    per = [_pstd(r) for r in TOKENS]
    x = TOKENS.reshape(1, 3, 4)
    assert M.token_std([[[x, {}]]]) == (pytest.approx(sum(per) / 3, rel=1e-6), 3)
    assert M.token_std([[[x, None]]]) == (pytest.approx(sum(per) / 3, rel=1e-6), 3)
    mask = torch.tensor([[1, 0, 1]])
    got, n = M.token_std([[[x, {"attention_mask": mask}]], [[x[:, :2], {"attention_mask": torch.tensor([[0, 1]])}]]])
    assert n == 3 and got == pytest.approx((per[0] + per[2] + per[1]) / 3, rel=1e-6)
    assert M.token_std([[[x, {"attention_mask": torch.tensor([[1, 0]])}]]]) == (pytest.approx(sum(per) / 3,
                                                                                               rel=1e-6), 3)
    with pytest.raises(M.SwapError, match="no caption gave any valid token"):
        M.token_std([[[x, {"attention_mask": torch.zeros(1, 3)}]]])


def test_vector_std_is_the_mean_row_spread(M):
    """Mean over every row of every vector of its population std over the channels."""
    v = [TOKENS[:2], TOKENS[2:].reshape(1, 1, 4)]
    assert M.vector_std(v) == pytest.approx(statistics.mean(_pstd(r) for r in TOKENS), rel=1e-6)


def test_measured_captions_distinct_sorted_and_evenly_spaced(M):
    """Distinct string captions sorted; more than ``limit``: that many, evenly spaced, first and last kept; a limit
    under 2 keeps the first; no caption at all is refused with the fix."""
    texts = [f"c{i:02d}" for i in range(10)]
    assert M.measured_captions(texts[::-1] + [None, 3, texts[0]], 10) == texts
    assert M.measured_captions(texts, 4) == ["c00", "c03", "c06", "c09"]
    assert M.measured_captions(texts, 2) == ["c00", "c09"]
    assert M.measured_captions(texts, 1) == ["c00"] and M.measured_captions(texts, 0) == ["c00"]
    assert M.measured_captions(texts, 11) == texts
    with pytest.raises(M.SwapError, match="no captions"):
        M.measured_captions([None, 1], 4)


def test_default_linear_is_pytorchs_own_default_init(R):
    """``default_linear_`` draws what ``nn.init.kaiming_uniform_(a=sqrt(5))`` and ``nn.init.uniform_`` within
    1/sqrt(fan_in) draw for the weight then the bias from the same generator; a layer without a bias gets its
    weight only."""
    layer = torch.nn.Linear(5, 3)
    R.default_linear_(layer, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    w, b = torch.empty(3, 5), torch.empty(3)
    torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
    torch.nn.init.uniform_(b, -1 / math.sqrt(5), 1 / math.sqrt(5), generator=g)
    torch.testing.assert_close(layer.weight.detach(), w, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.bias.detach(), b, atol=1e-6, rtol=0)
    bare = torch.nn.Linear(5, 3, bias=False)
    R.default_linear_(bare, torch.Generator().manual_seed(1))
    torch.testing.assert_close(bare.weight.detach(), w, atol=1e-6, rtol=0)


def test_reset_refuses_unknown_modes_and_models_without_cross_attention(R, sd15):
    """An unknown reset mode, and a model with no SpatialTransformer attention (reset and context width alike), are
    refused with the fix; the tiny SD1.5 reads a 768-wide context and its reset 'none' names nothing."""
    dm = sd15[0].model.diffusion_model
    assert R.context_dim(dm) == 768 and R.reset_layers(dm, "none") == []
    with pytest.raises(R.SwapError, match="reset mode 'q' is not one of"):
        R.reset_layers(dm, "q")
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(R.SwapError, match="set reset to 'none'"):
        R.reset_layers(plain, "qk")
    with pytest.raises(R.SwapError, match="no cross-attention reading a text context"):
        R.context_dim(plain)


def test_pooled_option_and_width_follow_the_models_adm(PO, sd15, family_bundle):
    """'zero' / 'projected' accepted where they apply; an unknown choice, and 'projected' on SD1.5 (no adm), refused;
    the pooled width is 0 without an adm, the old encoder's pooled_output width with one, and an adm model whose old
    conditioning has no pooled vector (or none at all) is refused with the fix."""
    sdxl = family_bundle("sdxl")[0]
    PO.check_option(sd15[0], "zero")
    PO.check_option(sdxl, "projected")
    with pytest.raises(PO.SwapError, match="pooled 'x' is not one of"):
        PO.check_option(sdxl, "x")
    with pytest.raises(PO.SwapError, match="set pooled to 'zero'"):
        PO.check_option(sd15[0], "projected")
    old = [[[torch.zeros(1, 77, 8), {"pooled_output": torch.zeros(1, 320)}]]]
    assert PO.pooled_dim(sd15[0], old) == 0 and PO.pooled_dim(sdxl, old) == 320
    for bad in ([[[torch.zeros(1, 77, 8), {}]]], []):
        with pytest.raises(PO.SwapError, match="connect the CLIP of the model's own checkpoint"):
            PO.pooled_dim(sdxl, bad)


def test_pooled_source_is_pooled_output_or_the_masked_token_mean(PO):
    """The new encoder's pooled_output when it has one (one row per batch item); else the mean over the valid
    tokens of its mask (hand-computed), over all tokens with no mask or a mask of another length; an all-zero mask
    gives zeros, not NaN."""
    x = TOKENS.reshape(1, 3, 4)
    p = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(PO.pooled_source(torch.zeros(2, 3, 4), {"pooled_output": p.reshape(6)}), p)
    torch.testing.assert_close(PO.pooled_source(x, {"attention_mask": torch.tensor([[1, 0, 1]])}),
                               torch.tensor([[3.0, -1.5, 4.0, -0.5]]))
    every = torch.tensor([[2.0, -1.0, 16 / 3, -1 / 3]])
    torch.testing.assert_close(PO.pooled_source(x, {}), every)
    torch.testing.assert_close(PO.pooled_source(x, None), every)
    torch.testing.assert_close(PO.pooled_source(x, {"attention_mask": torch.tensor([[1, 0]])}), every)
    assert torch.equal(PO.pooled_source(x, {"attention_mask": torch.zeros(1, 3)}), torch.zeros(1, 4))
    torch.testing.assert_close(PO.pooled_source(x, {"attention_mask": torch.tensor([[0, 1, 0]])}), TOKENS[1:2])
    two = torch.stack([TOKENS, TOKENS.flip(0)])  # a batch of two whose masks count 2 and 1 tokens
    torch.testing.assert_close(PO.pooled_source(two, {"attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}),
                               torch.stack([TOKENS[:2].mean(0), TOKENS[2]]))
    rows = PO.sources([[[x, {}]], [[x, {"pooled_output": p[:1]}]]])
    torch.testing.assert_close(rows[0], every) and torch.testing.assert_close(rows[1], p[:1])
    old = PO.old_pooled([[[x, {"pooled_output": p[:1]}]], [[x, {"pooled_output": p[1:].reshape(1, 1, 3)}]]])
    assert torch.equal(old, p)


def test_pooled_head_projects_scales_and_fills_the_extras(PO, S):
    """A Projection with a head: ``pooled`` Linear (pooled_in -> pooled_dim) and ``pooled_scale`` 1; its vector is
    the Linear of the source times the scale (``fit_scale_`` makes the spread the target's, by vector_std computed
    here with ``statistics``); ``with_pooled`` puts it into a copy of the extras; without a head an adm gets a zero
    vector of its width, a model without an adm the extras unchanged; a source of the wrong width, and captions of
    zero spread, are refused with the fix."""
    head = S.Projection(4, 6, "linear", pooled_dim=3, pooled_in=4).init_(0)
    assert PO.add_head(torch.nn.Module(), 0, 4) == 0
    assert head.pooled_in == 4 and tuple(head.pooled.weight.shape) == (3, 4) and float(head.pooled_scale) == 1.0
    x = TOKENS.reshape(1, 3, 4)
    src = torch.tensor([[2.0, -1.0, 16 / 3, -1 / 3]])
    with torch.no_grad():
        raw = head.pooled(src)
        target = torch.tensor([[1.0, 4.0, -2.0, 0.5]])
        PO.fit_scale_(head, [src], target)
        scale = _pstd(target[0]) / _pstd(raw[0])
        assert float(head.pooled_scale) == pytest.approx(scale, rel=1e-5)
        extras = {"attention_mask": torch.ones(1, 3)}
        out = PO.with_pooled(head, extras, x)
        torch.testing.assert_close(out["pooled_output"], raw * scale, atol=1e-5, rtol=1e-5)
        assert "pooled_output" not in extras and torch.equal(out["attention_mask"], extras["attention_mask"])
        assert PO.spread(head, [[[x, {}]]]) == pytest.approx(_pstd(target[0]), rel=1e-5)
        with pytest.raises(PO.SwapError, match="pooled vector is 5 wide, the swap's pooled projection reads 4"):
            PO.head_vector(head, torch.zeros(1, 3, 5), {})
        with pytest.raises(PO.SwapError, match="zero spread"):
            _zero_spread(PO, head, target)
    with torch.no_grad():
        wide = head.double()(x.double())  # a head held in float64: the source is cast to its dtype
        hv = PO.head_vector(head, x, {})
    assert hv.dtype == torch.float64 and wide.dtype == torch.float64
    zero = S.Projection(4, 6, "linear", pooled_dim=3).init_(0)
    out = PO.with_pooled(zero, {}, x.half())
    assert out["pooled_output"].dtype == torch.half and torch.equal(out["pooled_output"], torch.zeros(1, 3).half())
    assert PO.spread(zero, [[[x, {}]]]) == 0.0
    none = S.Projection(4, 6, "linear").init_(0)
    assert PO.with_pooled(none, {"a": 1}, x) == {"a": 1}


def _zero_spread(PO, head, target):
    """Captions whose projection has zero spread: a head whose weight and bias are zero."""
    with torch.no_grad():
        head.pooled.weight.zero_(), head.pooled.bias.zero_()
    PO.fit_scale_(head, [TOKENS[:1]], target)


def test_pooled_report(PO, S):
    """'' without an adm; 'zero' with an adm and no head; in/out widths and both spreads with a head."""
    from dataclasses import replace

    swap = S.Swap("linear", 4, 6, {}, "none", (), {})
    assert PO.report(swap) == ""
    assert PO.report(replace(swap, pooled_dim=3)) == "; pooled 3: zero"
    head = replace(swap, pooled_dim=3, pooled_in=4, std_pooled_old=0.5, std_pooled_projected=0.25)
    assert PO.report(head) == "; pooled 4->3 projected: old pooled std 0.5000, output 0.2500"


def _projection_file(F, S, path, record: dict, in_dim: int = 4):
    import json

    from safetensors.torch import save_file

    state = S.Projection(in_dim, 6, "linear").init_(0).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path),
              metadata={"format": F.FORMAT, "aligned_trainer.te_swap": json.dumps(record)})
    return state


def test_load_projection_defaults_shapes_and_unreadable_files(F, S, tmp_path):
    """A projection file whose record has only kind and widths loads with the Swap's defaults (no reset, seed 0, zero
    spreads and counts, no pooled head) and its tensors, which stay writable outside inference mode even when loaded
    inside it (as ComfyUI runs the Load node); tensors that do not fit the recorded widths, and a file that is not
    safetensors, are refused."""
    state = _projection_file(F, S, tmp_path / "p.safetensors", {"kind": "linear", "in_dim": 4, "out_dim": 6})
    with torch.inference_mode():
        swap = F.load_projection(tmp_path / "p.safetensors")
    assert (swap.kind, swap.in_dim, swap.out_dim, swap.reset, swap.reset_layers, swap.reset_diffs) == \
        ("linear", 4, 6, "none", (), {})
    assert (swap.seed, swap.tokens_old, swap.tokens_new, swap.captions, swap.pooled_dim, swap.pooled_in) == (0,) * 6
    assert (swap.std_old, swap.std_new, swap.std_projected, swap.std_pooled_old, swap.std_pooled_projected) == (0.0,) * 5
    assert (swap.new_spec, swap.old_spec) == ("", "")
    assert set(swap.projection) == set(state) and all(torch.equal(swap.projection[k], state[k]) for k in state)
    for v in swap.projection.values():
        v.add_(0)  # an inference tensor refuses this outside inference mode
    _projection_file(F, S, tmp_path / "q.safetensors", {"kind": "linear", "in_dim": 5, "out_dim": 6})
    with pytest.raises(F.SwapError, match="q.safetensors is a damaged .*size mismatch"):
        F.load_projection(tmp_path / "q.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(F.SwapError, match="cannot be read as safetensors.*Save Text Encoder Swap"):
        F.load_projection(tmp_path / "junk.safetensors")


def test_projection_folder_is_registered_next_to_the_first_loras_folder(F, S, tmp_path, monkeypatch):
    """With no ``te_projections`` model folder yet, listing or loading a projection registers it as
    ``<first loras folder's parent>/te_projections`` for .safetensors files; a projection written there is then
    listed and loaded by name."""
    import os

    import folder_paths

    fnp = folder_paths.folder_names_and_paths
    loras = [str(tmp_path / "a" / "loras"), str(tmp_path / "b" / "loras")]
    monkeypatch.setitem(fnp, "loras", (loras, set(fnp["loras"][1])))
    monkeypatch.delitem(fnp, F.PROJECTION_FOLDER, raising=False)
    want = str(tmp_path / "a" / "te_projections")
    assert F.projection_folders() == [want]
    assert fnp[F.PROJECTION_FOLDER][1] == {".safetensors"}
    os.makedirs(want)
    _projection_file(F, S, os.path.join(want, "mine.safetensors"), {"kind": "linear", "in_dim": 4, "out_dim": 6})
    del fnp[F.PROJECTION_FOLDER]
    assert "mine.safetensors" in F.projection_files()
    del fnp[F.PROJECTION_FOLDER]
    assert F.load_projection_named("mine.safetensors").in_dim == 4
    with pytest.raises(F.SwapError, match="'gone.safetensors' is not in the te_projections folder"):
        F.load_projection_named("gone.safetensors")


def test_reset_diffs_are_pytorchs_init_drawn_in_name_order_minus_the_base(R, sd15):
    """Base + diff of the reset layers (the first SD1.5 cross-attention: to_q/to_k/to_v without a bias, to_out.0 with one)
    equals PyTorch's own default init drawn layer after layer, in name order, from one generator of the seed: the
    weight by ``kaiming_uniform_(a=sqrt(5))``, then the bias (only where the layer has one) by ``uniform_`` within
    1/sqrt(fan_in)."""
    model = sd15[0]
    names = R.reset_layers(model.model.diffusion_model, "cross_attention")[:4]  # one layer's, sorted: k, out.0, q, v
    diffs = R.reset_diffs(model, names, seed=5)
    base = model.model.state_dict()
    g = torch.Generator().manual_seed(5)
    assert any(f"diffusion_model.{n}.bias" in base for n in names)
    assert any(f"diffusion_model.{n}.bias" not in base for n in names)
    for n in names:
        wkey, bkey = f"diffusion_model.{n}.weight", f"diffusion_model.{n}.bias"
        w = torch.empty(base[wkey].shape)
        torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
        torch.testing.assert_close(base[wkey].float() + diffs[wkey], w, atol=1e-6, rtol=0)
        if bkey in base:
            b = torch.empty(base[bkey].shape)
            bound = 1 / math.sqrt(w.shape[1])
            torch.nn.init.uniform_(b, -bound, bound, generator=g)
            torch.testing.assert_close(base[bkey].float() + diffs[bkey], b, atol=1e-6, rtol=0)
        else:
            assert bkey not in diffs


def test_projection_init_forward_and_fit_follow_pytorch_and_the_measured_spread(S, M):
    """``Projection``: an unknown kind refused; 'linear' one Linear, 'mlp' Linear-GELU-Linear; ``init_`` draws
    PyTorch's default init (``nn.init``) layer after layer from one seeded generator, the pooled head after the net
    (a zero-pooled projection of the same seed has the same net); forward is ``scale * net(x)`` in x's dtype;
    ``fit_projection`` sets the scale to target / the unscaled output's token spread (computed here with
    ``statistics``) and refuses captions without a positive spread; ``context`` refuses a conditioning of another width and
    ``project`` keeps the extras and an empty conditioning."""
    with pytest.raises(S.SwapError, match="projection kind 'conv' is not one of"):
        S.Projection(4, 6, "conv")
    mlp = S.Projection(4, 6, "mlp").init_(2)
    assert [type(m).__name__ for m in mlp.net] == ["Linear", "GELU", "Linear"]
    _assert_default_linear_init((mlp.net[0], mlp.net[2]), 2)
    head = S.Projection(4, 6, "linear", pooled_dim=3, pooled_in=4).init_(2)
    plain = S.Projection(4, 6, "linear", pooled_dim=3).init_(2)
    assert torch.equal(head.net[0].weight, plain.net[0].weight) and not hasattr(plain, "pooled")
    x = TOKENS.reshape(1, 3, 4)
    conds = [[[x, {"attention_mask": torch.tensor([[1, 1, 0]])}]]]
    proj, raw = S.fit_projection(conds, 2.5, 6, "linear", 2)
    with torch.no_grad():
        net = proj.net(x)[0]
        want_raw = statistics.mean(_pstd(r) for r in net[:2])
        assert raw == pytest.approx(want_raw, rel=1e-5) and float(proj.scale) == pytest.approx(2.5 / want_raw, rel=1e-5)
        out = proj(x.half())
        assert out.dtype == torch.half
        torch.testing.assert_close(out.float(), (net * 2.5 / want_raw)[None], atol=2e-2, rtol=2e-3)
        (c, e), = proj.project([[x, {"k": 1}]])
        assert e == {"k": 1} and torch.allclose(c, net[None] * 2.5 / want_raw, atol=1e-5)
    assert proj.project([]) == []
    with pytest.raises(S.SwapError, match="this conditioning is 5 wide, the swap's projection reads 4"):
        proj.context(torch.zeros(1, 3, 5), {})
    with pytest.raises(S.SwapError, match="zero spread"):  # no finite spread either (NaN states)
        S.fit_projection([[[torch.full((1, 3, 4), float("nan")), {}]]], 2.5, 6, "linear", 2)


def test_swap_attachment_run_state_and_plan_checks(S, sd15):
    """``with_swap`` attaches the Swap to a clone (``of`` finds it, ``extra_targets`` names the projection; the base
    has none) and refuses reset patches for layers the model lacks; the run's projection state is the EMA one when
    kept and asked for, else the trained one, without the layers' keys (``without_projection`` keeps exactly those);
    a run without state, without a projection or without a swap is refused; a preview plan of another width than the
    projection reads is refused (positives and negative), nothing is checked without a swap or a plan, and a plan
    of a model without a swap is used as it is."""
    from types import SimpleNamespace

    swap = S.Swap("linear", 4, 6, {"scale": torch.tensor(2.0)}, "none", (), {})
    model = S.with_swap(sd15[0], swap)
    assert S.of(model) is swap and S.of(sd15[0]) is None and S.of(object()) is None
    assert S.extra_targets(model) == [S.ADAPTER] and S.extra_targets(sd15[0]) == []
    with pytest.raises(S.SwapError, match="does not have the layers the swap resets"):
        S.with_swap(sd15[0], S.Swap("linear", 4, 6, {}, "qk", ("x",), {"diffusion_model.nope.weight": torch.zeros(1)}))

    a, e, d = torch.ones(2), torch.full((2,), 3.0), torch.zeros(1)
    adapters = {f"{S.ADAPTER}.net.0.weight": a, "input.attn2.to_k.diff": d, f"{S.ADAPTER}x.w": d}
    assert S.without_projection(adapters) == {"input.attn2.to_k.diff": d, f"{S.ADAPTER}x.w": d}
    run = SimpleNamespace(model=model, state={"adapters": adapters, "ema_adapters": {f"{S.ADAPTER}.net.0.weight": e}})
    assert S.trained_projection(run)["net.0.weight"] is e and S.trained_projection(run, ema=False)["net.0.weight"] is a
    assert S.trained_swap(run, ema=False).projection == {"net.0.weight": a} and S.trained_swap(run).kind == "linear"
    bare = SimpleNamespace(model=model, state={"adapters": adapters, "ema_adapters": None})
    assert S.trained_projection(bare)["net.0.weight"] is a
    with pytest.raises(S.SwapError, match="no trained weights yet"):
        S.trained_projection(SimpleNamespace(model=model, state=None))
    with pytest.raises(S.SwapError, match="has no text-encoder swap projection"):
        S.trained_projection(SimpleNamespace(model=model, state={"adapters": {"x.diff": d}}))
    with pytest.raises(S.SwapError, match="carries no text-encoder swap"):
        S.trained_swap(SimpleNamespace(model=sd15[0], state=run.state))

    good, wide = [[torch.zeros(1, 3, 4), {}]], [[torch.zeros(1, 3, 5), {}]]
    S.check_plan(model, SimpleNamespace(positives=[good], negative=good))
    S.check_plan(model, None)
    S.check_plan(sd15[0], SimpleNamespace(positives=[wide], negative=wide))
    for plan in (SimpleNamespace(positives=[good, wide], negative=good), SimpleNamespace(positives=[good], negative=wide)):
        with pytest.raises(S.SwapError, match="Preview Plan's prompts are encoded 5 wide, the swap's projection reads 4"):
            S.check_plan(model, plan)
    plan = SimpleNamespace(positives=[wide], negative=wide)
    assert S.projected_plan(plan, sd15[0], adapters) is plan


def test_swap_record_and_report(S):
    """The record a projection file keeps: every setting and measurement (tuples as lists) and the scale, not the
    tensors or the reset patches; the one-line report with the figures."""
    swap = S.Swap("mlp", 4, 6, {"scale": torch.tensor(1.5)}, "qk", ("a", "b"), {"k": torch.zeros(1)}, 3, 0.25, 0.5,
                  0.2575, 154, 120, 2, "t5", "clip_l", 0, 0, 0.0, 0.0)
    rec = swap.record()
    assert rec == {"kind": "mlp", "in_dim": 4, "out_dim": 6, "reset": "qk", "reset_layers": ["a", "b"], "seed": 3,
                   "std_old": 0.25, "std_new": 0.5, "std_projected": 0.2575, "tokens_old": 154, "tokens_new": 120,
                   "captions": 2, "new_spec": "t5", "old_spec": "clip_l", "pooled_dim": 0, "pooled_in": 0,
                   "std_pooled_old": 0.0, "std_pooled_projected": 0.0, "scale": 1.5}
    assert swap.report() == ("old encoder token std 0.2500 (154 tokens of 2 captions), new encoder 0.5000; projection "
                             "mlp 4->6, scale 1.5: output std 0.2575; reset qk (2 layers)")


def test_pooled_head_is_drawn_after_the_net_from_the_same_generator(S):
    """``init_`` with a pooled head: the net's layers, then the head, each PyTorch's default Linear init
    (``nn.init``) drawn in turn from one generator of the seed."""
    head = S.Projection(4, 6, "mlp", pooled_dim=3, pooled_in=5).init_(7)
    _assert_default_linear_init((head.net[0], head.net[2], head.pooled), 7)


def _width(conditioning) -> int:
    return int(conditioning[0][0].shape[-1])


def _context_width(model) -> int:
    """The UNet's cross-attention context width, read from its first attn2.to_k layer."""
    return next(m.in_features for n, m in model.model.diffusion_model.named_modules() if n.endswith("attn2.to_k"))


def test_setup_from_a_one_caption_dataset_under_comfyuis_inference_mode(S, comfy, D, sd15, family_bundle, tmp_path):
    """The node's path, as ComfyUI's executor runs it (under ``torch.inference_mode``): Text Encoder Swap Setup from
    a one-image dataset, the CLIPs as connected (already aligned: tiny SD1.5's CLIP-L as the new encoder of the tiny
    SDXL, pooled 'projected', reset 'qk'). The swap names both CLIPs' specs, its pooled head reads the new encoder's
    pooled width, and its reset patches are computed outside inference mode (ordinary tensors, which can be updated
    in place and saved for backward after the node returns). An SD1.5 swap without a pooled head records no old pooled spread (0.0). An old CLIP of another
    width than the UNet's context is refused, naming both widths."""
    from support.factories.dataset import make_dataset

    align = comfy.engine("te.align")
    sdxl, sdxl_clip, _ = family_bundle("sdxl")
    new, old = align.align_clip(sd15[1], "sd15"), align.align_clip(sdxl_clip, "sdxl")
    folder = make_dataset(tmp_path / "data", n=1, sizes=((64, 64),))
    ds = D.dataset.from_folder(folder.parent, D.captions.CaptionConfig(trigger_word="ohwx"),
                               D.buckets.BucketConfig(resolution=64, min_side=64, max_side=64, step=64))
    (caption,) = [c for item in ds.items for c in item.captions]
    with torch.inference_mode():
        _, swap = S.setup_from_dataset(sdxl, new, old, ds, reset="qk", seed=1, pooled="projected")
    assert swap.captions == 1 and (swap.new_spec, swap.old_spec) == (new.spec.id, old.spec.id)
    assert swap.new_spec and swap.old_spec and swap.new_spec != swap.old_spec
    pooled_width = new.encode_from_tokens(new.tokenize(caption), return_pooled=True)[1].shape[-1]
    assert swap.pooled_in == pooled_width and swap.std_pooled_old > 0
    tensors = list(swap.reset_diffs.values())
    assert tensors and not any(t.is_inference() for t in tensors)
    for t in tensors:
        t.add_(0)  # an inference tensor refuses this outside inference mode
    _, plain = S.setup(sd15[0], sdxl_clip, sd15[1], [caption], reset="none", seed=1)
    assert plain.pooled_in == 0 and plain.std_pooled_old == 0.0
    old_width = _width(sdxl_clip.encode_from_tokens_scheduled(sdxl_clip.tokenize(caption)))
    with pytest.raises(S.SwapError, match=f"the old CLIP's conditioning is {old_width} wide but this UNet reads "
                                          f"{_context_width(sd15[0])}: connect the CLIP the model was trained with"):
        S.setup(sd15[0], sd15[1], sdxl_clip, [caption], reset="none")


def test_projected_plan_uses_the_adapters_projection_state(S, comfy, sd15):
    """A swap run's preview plan: every prompt and the negative projected by the projection as the run's adapters
    hold it (``te_swap.projection.*`` keys; other adapters ignored), computed here as x W^T + b times the scale; the
    rest of the plan kept."""
    P, R = comfy.engine("sampling.plans"), comfy.engine("sampling.render")
    start = S.Projection(4, 6).init_(3)
    swap = S.Swap("linear", 4, 6, {k: v.detach().clone() for k, v in start.state_dict().items()}, "none", (), {})
    model = S.with_swap(sd15[0], swap)
    g = torch.Generator().manual_seed(8)
    w, b = torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    adapters = {f"{S.ADAPTER}.net.0.weight": w, f"{S.ADAPTER}.net.0.bias": b, f"{S.ADAPTER}.scale": torch.tensor(1.5),
                "input.attn2.to_k.diff": torch.zeros(2)}
    x1, x2 = torch.randn(1, 3, 4, generator=g), torch.randn(1, 2, 4, generator=g)
    plan = P.PreviewPlan(vae=None, prompts=("a",), positives=([[x1, {"k": 1}]],), negative=[[x2, {}]],
                         settings=R.SampleSettings(steps=1), every_n=2)
    out = S.projected_plan(plan, model, adapters)
    (c1, e1), = out.positives[0]
    (c2, e2), = out.negative
    torch.testing.assert_close(c1, (x1 @ w.T + b) * 1.5, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c2, (x2 @ w.T + b) * 1.5, atol=1e-5, rtol=1e-5)
    assert e1 == {"k": 1} and e2 == {} and (out.prompts, out.settings, out.every_n) == (plan.prompts, plan.settings, 2)
