"""sampling/heatmaps.py pinned (issue #26) on hand-built attention inputs: what ``Capture`` records from a UNet
cross-attention call and a DiT joint-attention call (DAAM: softmax attention of the conditional sample's image
queries over the text keys, averaged over heads, bicubic to the latent), how sums of calls with different token
counts grow, the q/k layouts of ``optimized_attention`` calls, the per-word maps, the overlay colours and the grid's
tiles; on the session's tiny FLUX.1 bundle, the joint hook's refusals and the conditional sample it records through
ComfyUI's own attention wrapper, and the T5 positions of a word. Expected values are computed here element by element
with ``math.exp``, not with the module's code. Run time: about 2 s (most of it building the tiny FLUX.1 bundle, which
test_heatmaps.py shares)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(scope="module")
def H(comfy):
    return comfy.engine("sampling.heatmaps")


@pytest.fixture(scope="module")
def J(comfy):
    return comfy.engine("sampling.joint_layouts")


def _softmax_rows(q: torch.Tensor, k: torch.Tensor) -> list[list[float]]:
    """softmax(q k^T / sqrt(d)) row by row with math.exp (q: (n, d), k: (t, d))."""
    d = q.shape[-1]
    out = []
    for qi in q.tolist():
        logits = [sum(a * b for a, b in zip(qi, kj)) / math.sqrt(d) for kj in k.tolist()]
        e = [math.exp(x) for x in logits]
        out.append([x / sum(e) for x in e])
    return out


def _head_mean(q: torch.Tensor, k: torch.Tensor, cols=None) -> torch.Tensor:
    """(n, t') mean over heads of each head's softmax (q, k: (heads, n|t, d)), columns ``cols`` kept."""
    heads = [torch.tensor(_softmax_rows(q[h], k[h])) for h in range(q.shape[0])]
    m = sum(heads) / len(heads)
    return m if cols is None else m[:, cols]


def test_capture_add_is_the_conditional_samples_head_mean_attention_upsampled(H):
    """A cross-attention call of a CFG batch (uncond first, then cond: ``cond_or_uncond`` [1, 0], 2 samples each):
    only the first conditional sample counts; its attention (2 heads of width 2, 6 image queries on a 2 x 3 grid of
    a 4 x 6 latent, 3 text keys) averaged over heads, per token, upsampled bicubic to 4 x 6 and clamped at 0, is the
    capture's total; a second call adds to it; a later call with more tokens pads the sum with zeros; a batch with
    no conditional sample is skipped."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 6, 4, generator=g), torch.randn(4, 3, 4, generator=g)
    extra = {"n_heads": 2, "cond_or_uncond": [1, 0], "original_shape": [4, 4, 4, 6]}
    cap = H.Capture()
    cap.add(q, k, extra)
    att = _head_mean(q[2].reshape(6, 2, 2).transpose(0, 1), k[2].reshape(3, 2, 2).transpose(0, 1))  # (6, 3)
    want = F.interpolate(att.T.reshape(3, 1, 2, 3), size=(4, 6), mode="bicubic", align_corners=False)[:, 0]
    want = want.clamp_min(0)
    assert cap.calls == 1 and cap.total.shape == (3, 4, 6)
    torch.testing.assert_close(cap.total, want, atol=1e-6, rtol=1e-5)
    cap.add(q, k, extra)
    torch.testing.assert_close(cap.total, 2 * want, atol=1e-6, rtol=1e-5)
    k5 = torch.randn(4, 5, 4, generator=g)
    cap.add(q, k5, extra)
    att5 = _head_mean(q[2].reshape(6, 2, 2).transpose(0, 1), k5[2].reshape(5, 2, 2).transpose(0, 1))
    want5 = F.interpolate(att5.T.reshape(5, 1, 2, 3), size=(4, 6), mode="bicubic", align_corners=False)[:, 0]
    grown = torch.cat([2 * want, torch.zeros(2, 4, 6)]) + want5.clamp_min(0)
    assert cap.calls == 3
    torch.testing.assert_close(cap.total, grown, atol=1e-6, rtol=1e-5)
    cap.add(q, k, {**extra, "cond_or_uncond": [1, 1]})
    assert cap.calls == 3
    alone = H.Capture()
    alone.add(q[:1], k[:1], {**extra, "cond_or_uncond": None})  # no CFG split: the one sample is conditional
    att0 = _head_mean(q[0].reshape(6, 2, 2).transpose(0, 1), k[0].reshape(3, 2, 2).transpose(0, 1))
    want0 = F.interpolate(att0.T.reshape(3, 1, 2, 3), size=(4, 6), mode="bicubic", align_corners=False)[:, 0]
    torch.testing.assert_close(alone.total, want0.clamp_min(0), atol=1e-6, rtol=1e-5)


def test_capture_add_joint_reads_the_image_rows_and_text_columns(H, J):
    """A joint-attention call (B, heads, sequence, d) with the text at positions 0-1 and a 1 x 3 image at 2-4: the
    first conditional sample's image queries, softmax over all five keys, the text columns, averaged over heads;
    sums grow over calls (zero-padded for more tokens); an all-unconditional batch is skipped."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(4, 2, 5, 2, generator=g), torch.randn(4, 2, 5, 2, generator=g)
    span = J.Span(text=slice(0, 2), image=slice(2, 5), grid=(1, 3), seq=5)
    cap = H.Capture()
    cap.add_joint(q, k, span, {"cond_or_uncond": [1, 0]})
    want = _head_mean(q[2, :, 2:5], k[2], slice(0, 2)).T.reshape(2, 1, 3)
    assert cap.calls == 1
    torch.testing.assert_close(cap.total, want, atol=1e-6, rtol=1e-5)
    cap.add_joint(q, k, span, {"cond_or_uncond": [1, 1]})
    cap.add_joint(q, k, span, {})
    want0 = _head_mean(q[0, :, 2:5], k[0], slice(0, 2)).T.reshape(2, 1, 3)
    assert cap.calls == 2
    torch.testing.assert_close(cap.total, want + want0, atol=1e-6, rtol=1e-5)
    wide = J.Span(text=slice(0, 3), image=slice(2, 5), grid=(1, 3), seq=5)
    cap.add_joint(q, k, wide, {})
    want3 = _head_mean(q[0, :, 2:5], k[0], slice(0, 3)).T.reshape(3, 1, 3)
    torch.testing.assert_close(cap.total, torch.cat([want + want0, torch.zeros(1, 1, 3)]) + want3, atol=1e-6,
                               rtol=1e-5)


def test_heads_first_reads_both_call_layouts(H):
    """``optimized_attention(q, k, v, heads, ...)``: (B, sequence, heads * d) split into (B, heads, sequence, d) with
    the head count from the keyword or the fourth argument; ``skip_reshape`` calls are already heads-first."""
    q, k = torch.arange(24.0).reshape(1, 4, 6), torch.arange(18.0).reshape(1, 3, 6)
    want_q = torch.stack([q[0, :, 0:2], q[0, :, 2:4], q[0, :, 4:6]])[None]
    want_k = torch.stack([k[0, :, 0:2], k[0, :, 2:4], k[0, :, 4:6]])[None]
    for args, kwargs in (((q, k, None, 3), {}), ((q, k, None, 2), {"heads": 3})):
        got_q, got_k = H._heads_first(args, kwargs)
        assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    got_q, got_k = H._heads_first((q, k), {"skip_reshape": True})
    assert got_q is q and got_k is k


def test_word_maps_sum_tokens_upsample_and_normalise(H):
    """Each word's map: the sum of its tokens' captured maps, bicubic to the image size, clamped at 0, divided by its
    maximum; a word whose map is zero everywhere stays zero (no division by zero)."""
    cap = H.Capture()
    cap.total = torch.zeros(4, 2, 2)
    cap.total[1] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    cap.total[2] = torch.tensor([[0.0, 3.0], [0.0, 1.0]])
    maps = H.word_maps(cap, {"a": [1, 2], "b": [1], "z": [0, 3]}, ["a", "b", "z"], (2, 2))
    assert maps.shape == (3, 2, 2)
    torch.testing.assert_close(maps[0], torch.tensor([[1 / 3, 1.0], [0.0, 1 / 3]]))
    torch.testing.assert_close(maps[1], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(maps[2], torch.zeros(2, 2))
    up = H.word_maps(cap, {"b": [1]}, ["b"], (4, 4))[0]
    want = F.interpolate(cap.total[1][None, None], size=(4, 4), mode="bicubic", align_corners=False)[0, 0]
    want = want.clamp_min(0)
    torch.testing.assert_close(up, want / want.max())


def test_overlay_blends_blue_to_red(H):
    """Heat 0 is blue, 0.5 green with half red and blue, 1 red; blended with weight ``alpha`` over the image."""
    image = torch.full((1, 3, 3), 0.2)
    heat = torch.tensor([[0.0, 0.5, 1.0]])
    got = H.overlay(image, heat, alpha=0.5)
    want = torch.tensor([[[0.1, 0.1, 0.6], [0.35, 0.6, 0.35], [0.6, 0.1, 0.1]]])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(H.overlay(image, heat), 0.45 * image + 0.55 * (want - 0.1) / 0.5)


def test_scores_are_scaled_by_the_head_width_not_the_head_count(H, J):
    """softmax(q k^T / sqrt(d)) with d the width of one head: 2 heads of width 3 (so sqrt(heads) would give other
    maps), for a cross-attention call and a joint call alike."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 6, generator=g) * 2, torch.randn(1, 3, 6, generator=g) * 2
    cap = H.Capture()
    cap.add(q, k, {"n_heads": 2, "cond_or_uncond": None, "original_shape": [1, 4, 2, 2]})
    att = _head_mean(q[0].reshape(4, 2, 3).transpose(0, 1), k[0].reshape(3, 2, 3).transpose(0, 1))  # (4, 3)
    want = F.interpolate(att.T.reshape(3, 1, 2, 2), size=(2, 2), mode="bicubic", align_corners=False)[:, 0]
    torch.testing.assert_close(cap.total, want.clamp_min(0), atol=1e-6, rtol=1e-5)
    qj, kj = torch.randn(1, 2, 5, 3, generator=g) * 2, torch.randn(1, 2, 5, 3, generator=g) * 2
    joint = H.Capture()
    joint.add_joint(qj, kj, J.Span(text=slice(0, 2), image=slice(2, 5), grid=(1, 3), seq=5), {})
    torch.testing.assert_close(joint.total, _head_mean(qj[0, :, 2:5], kj[0], slice(0, 2)).T.reshape(2, 1, 3),
                               atol=1e-6, rtol=1e-5)


def test_a_call_with_fewer_tokens_adds_to_the_first_rows_of_a_longer_sum(H, J):
    """After a call with 3 text tokens, one with 2 (another prompt length): the sum keeps 3 rows, the new maps added
    to the first 2 (joint calls on a 2 x 2 image grid: more tokens than grid rows)."""
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 1, 7, 2, generator=g), torch.randn(1, 1, 7, 2, generator=g)
    long_, short = (J.Span(text=slice(0, n), image=slice(3, 7), grid=(2, 2), seq=7) for n in (3, 2))
    cap = H.Capture()
    cap.add_joint(q, k, long_, {})
    cap.add_joint(q, k, short, {})
    first = _head_mean(q[0, :, 3:7], k[0], slice(0, 3)).T.reshape(3, 2, 2)
    second = _head_mean(q[0, :, 3:7], k[0], slice(0, 2)).T.reshape(2, 2, 2)
    assert cap.calls == 2 and cap.total.shape == (3, 2, 2)
    torch.testing.assert_close(cap.total, first + torch.cat([second, torch.zeros(1, 2, 2)]), atol=1e-6, rtol=1e-5)


def test_flux_capture_needs_the_sizes_and_reads_the_calls_conditional_sample(H, J, family_bundle):
    """On the tiny FLUX.1 (joint attention): ``patched`` without the token count or without the latent size is
    refused; ComfyUI's own ``optimized_attention`` called with the hooked model's ``transformer_options`` and a CFG
    batch (uncond first: ``cond_or_uncond`` [1, 0]) returns plain attention's output and records the second
    sample's image-to-text attention (3 text tokens, a 4 x 4 latent in 2 x 2 patches)."""
    import comfy.ldm.modules.attention as ca

    model = family_bundle("flux1-dev")[0]
    for kwargs in ({"text_len": 3}, {"latent_hw": (4, 4)}):
        with pytest.raises(ValueError, match="need the prompt's token count and the latent size"):
            H.patched(model, H.Capture(), **kwargs)
    cap = H.Capture()
    hooked = H.patched(model, cap, text_len=3, latent_hw=(4, 4))
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 7, 3, generator=g) for _ in range(3))  # (batch, heads, 3 text + 4 image, d)
    options = {**hooked.model_options["transformer_options"], "cond_or_uncond": [1, 0]}
    out = ca.optimized_attention(q, k, v, 2, skip_reshape=True, transformer_options=options)
    torch.testing.assert_close(out, ca.optimized_attention(q, k, v, 2, skip_reshape=True))
    assert cap.calls == 1
    want = _head_mean(q[1, :, 3:7], k[1], slice(0, 3)).T.reshape(3, 2, 2)
    torch.testing.assert_close(cap.total, want, atol=1e-6, rtol=1e-5)


def test_flux_word_positions_index_t5s_tokens_the_conditionings_count(H, family_bundle, comfy):
    """FLUX.1's conditioning is T5's tokens (256 of them: T5 pads to its minimum), not CLIP-L's 77 (pooled only):
    the positions found for a word index T5's token list, where the word's own T5 tokens sit."""
    _, clip, _ = family_bundle("flux1-dev")
    prompt = "ohwx, a zebra on a red carpet"
    text_len = comfy.engine("sampling.render").encode(clip, prompt, 3.5)[0][0].shape[1]
    toks = {k: [int(t[0]) for chunk in v for t in chunk] for k, v in clip.tokenize(prompt).items()}
    assert len(toks["t5xxl"]) == text_len != len(toks["l"])
    t5 = toks["t5xxl"]
    ends = {int(t[0]) for chunk in clip.tokenize("")["t5xxl"] for t in chunk}
    zebra = [int(t[0]) for t in clip.tokenize("zebra")["t5xxl"][0] if int(t[0]) not in ends]
    where = [p + j for p in range(len(t5)) if t5[p:p + len(zebra)] == zebra for j in range(len(zebra))]
    assert where and H.token_positions(clip, prompt, ["zebra"], text_len)["zebra"] == where


def test_heatmap_grid_is_the_image_then_each_overlay_in_a_labelled_row(H, comfy):
    """The grid: a 4 px left margin (no row label), a label strip above (labelled_grid's ``label_h``), then the image
    and one overlay tile per word side by side, each the 8-bit rendering of image * 0.45 + colour * 0.55 (heat h:
    red h, green 1 - |2h - 1|, blue 1 - h)."""
    import inspect

    label_h = inspect.signature(comfy.engine("imaging").labelled_grid).parameters["label_h"].default
    g = torch.Generator().manual_seed(6)
    image, maps = torch.rand(1, 6, 5, 3, generator=g), torch.rand(2, 6, 5, generator=g)
    grid = H.heatmap_grid(image, maps, ["a", "b"])
    assert grid.shape == (1, label_h + 6, 4 + 3 * 5, 3)
    tiles = [image[0]] + [0.45 * image[0] + 0.55 * torch.stack([m, 1 - (2 * m - 1).abs(), 1 - m], -1) for m in maps]
    for j, tile in enumerate(tiles):
        got = grid[0, label_h:, 4 + 5 * j:4 + 5 * (j + 1)]
        torch.testing.assert_close(got, (tile * 255).round() / 255, atol=1e-6, rtol=0)


def test_unet_hook_attends_at_the_layers_precision(H, sd15):
    """The attn2 replacement the capture installs computes its output as ComfyUI's cross-attention layer does,
    ``optimized_attention`` with the layer's ``attn_precision``: on half-precision inputs with float32 precision (the
    upcast SD2.x asks for) its output equals the upcast attention's, which differs from attention without it."""
    import comfy.ldm.modules.attention as ca

    hooked = H.patched(sd15[0], H.Capture())
    attn2 = next(iter(hooked.model_options["transformer_options"]["patches_replace"]["attn2"].values()))
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, n, 8, generator=g).mul(4).half() for n in (4, 3, 3))
    upcast = ca.optimized_attention(q, k, v, 2, attn_precision=torch.float32)
    assert not torch.equal(upcast, ca.optimized_attention(q, k, v, 2))
    out = attn2(q, k, v, {"n_heads": 2, "attn_precision": torch.float32, "original_shape": [1, 4, 2, 2]})
    assert torch.equal(out, upcast)
