"""sampling/joint_layouts.py pinned (issue #26): where the text and the image sit in a DiT's joint attention, measured
on the model itself instead of read from the layout table. One sampling step of ComfyUI's own sampler records the keys
of every attention call (through ``optimized_attention_override``); sampling again with another prompt (same pooled
vector) changes, in the first joint call, exactly the text's key columns, and with another noise exactly the image's.
``span`` must name those columns and that sequence length. Cases the family bundles do not reach: SD3's register
tokens (an MMDiT with ``register_length`` 3), Z-Image's padding of text and image to 32 tokens (Lumina 2's none), and
Wan's refusal when the image has as many tokens as the prompt. Run time: under 1 s per case on the tiny models."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def J(comfy):
    return comfy.engine("sampling.joint_layouts")


def _sd3_with_registers(n: int):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    from support.factories import families

    cfg = comfy.supported_models.SD3(dict(families.SD3_MMDIT, register_length=n))
    cfg.set_inference_dtype(torch.float32, None)
    base = cfg.get_model({}, "", device="cpu")
    families._seed_all_(base.diffusion_model, 0)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device="cpu")


def _first_joint_keys(model, cond, latent, seed):
    """The keys (B, heads, sequence, d) and the length of the first attention call over the longest sequence whose
    queries and keys have the same length (the joint sequence, not a text-only or image-only refiner's), in one step
    of ComfyUI's sampler."""
    import comfy.sample

    calls = []

    def record(func, *args, **kwargs):
        axis = -2 if kwargs.get("skip_reshape") else 1
        q, k = args[0], args[1]
        if q.shape[axis] == k.shape[axis]:
            if not kwargs.get("skip_reshape"):
                heads = kwargs["heads"] if "heads" in kwargs else args[3]
                k = k.reshape(k.shape[0], k.shape[1], heads, -1).transpose(1, 2)
            calls.append((k.detach().clone(), q.shape[axis]))
        return func(*args, **kwargs)

    m = model.clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = record
    noise = comfy.sample.prepare_noise(latent, seed, None)
    comfy.sample.sample(m, noise, 1, 1.0, "euler", "simple", cond, cond, latent, disable_pbar=True, seed=seed)
    longest = max(n for _, n in calls)
    return next(c for c in calls if c[1] == longest)


def _changed_columns(a, b) -> list[int]:
    return torch.nonzero((a - b).abs().amax(dim=(0, 1, 3)) > 0).flatten().tolist()


def _measured(model, cond_a, cond_b, latent):
    """(text columns, image columns, joint length): the key columns another prompt changes (none with ``cond_b``
    None) and those another noise changes, in the first joint call."""
    ka, seq = _first_joint_keys(model, cond_a, latent, 0)
    text = _changed_columns(ka, _first_joint_keys(model, cond_b, latent, 0)[0]) if cond_b is not None else None
    return text, _changed_columns(ka, _first_joint_keys(model, cond_a, latent, 1)[0]), seq


def test_sd3_text_follows_the_register_tokens_and_the_image_follows_the_text(J):
    from support.factories import families

    model = _sd3_with_registers(3)
    g = torch.Generator().manual_seed(0)
    adm = families.SD3_MMDIT["adm_in_channels"]
    pooled = torch.randn(1, adm, generator=g)
    cond_a = [[torch.randn(1, 7, 4096, generator=g), {"pooled_output": pooled}]]
    cond_b = [[torch.randn(1, 7, 4096, generator=g), {"pooled_output": pooled}]]
    latent = torch.zeros(1, 16, 8, 12)  # (8 / 2) x (12 / 2) = 24 image tokens
    text, image, seq = _measured(model, cond_a, cond_b, latent)
    span = J.span(model, 7, (8, 12))
    assert text == list(range(3, 10)) and image == list(range(10, 34)) and seq == 34  # measured on the model
    assert (list(range(span.text.start, span.text.stop)), list(range(span.image.start, span.image.stop)),
            span.seq, span.grid) == (text, image, seq, (4, 6))
    assert span.locate(seq, seq) == span and span.locate(seq, 7) is None and span.locate(seq - 1, seq - 1) is None


def test_z_image_pads_text_and_image_to_its_token_multiple(J):
    from support.factories import families

    model = families.build_model("z-image")
    assert model.model.diffusion_model.pad_tokens_multiple == 32
    g = torch.Generator().manual_seed(1)
    cond = [[torch.randn(1, 9, families.QWEN3["hidden_size"], generator=g), {}]]
    latent = torch.zeros(1, 16, 6, 10)  # 3 x 5 = 15 image tokens, padded to 32; the text's 9 padded to 32
    _, image, seq = _measured(model, cond, None, latent)
    # measured: the image block starts after the text's 32 and is 32 long (its pad tokens pass through the image
    # refiner, so another noise changes them too); the real image tokens are its first 15
    assert seq == 64 and image == list(range(32, 64))
    span = J.span(model, 9, (6, 10))
    assert (span.text, span.image, span.seq, span.grid) == (slice(0, 9), slice(32, 47), 64, (3, 5))
    # a latent side that is not a multiple of the patch: the last patch is padded (ComfyUI's pad_to_patch_size)
    assert J.span(model, 9, (7, 10)).grid == (4, 5)


def test_lumina2_pads_nothing(J):
    """Lumina 2 runs the same DiT class as Z-Image without a token multiple: an odd prompt and an odd image count
    sit side by side, unpadded."""
    from support.factories import families

    model = families.build_model("lumina2")
    assert model.model.diffusion_model.pad_tokens_multiple is None
    g = torch.Generator().manual_seed(2)
    cond = [[torch.randn(1, 9, families.LUMINA2_DIT["cap_feat_dim"], generator=g), {}]]
    _, image, seq = _measured(model, cond, None, torch.zeros(1, 16, 6, 10))
    assert seq == 24 and image == list(range(9, 24))  # measured: 9 text tokens, then the 3 x 5 image tokens
    span = J.span(model, 9, (6, 10))
    assert (span.text, span.image, span.seq) == (slice(0, 9), slice(9, 24), 24)


def test_wan_cross_attention_span_and_the_ambiguous_size_refused(J):
    from support.factories import wan

    model = wan.build_model()
    span = J.span(model, 5, (4, 6))  # patch (1, 2, 2): 2 x 3 = 6 image tokens
    assert (span.text, span.image, span.grid, span.text_at) == (slice(0, 5), slice(0, 6), (2, 3), "cross")
    assert span.locate(6, 5) == span and span.locate(6, 6) is None and span.locate(5, 6) is None
    with pytest.raises(ValueError, match="as many tokens \\(6\\) as the prompt"):
        J.span(model, 6, (4, 6))
    assert J.tokenizer(model) is None and J.family_name(model) == "WAN21_T2V"


def test_image_first_layouts_find_the_text_from_the_end_or_after_the_image(J):
    """``after_image`` (HiDream) and ``end`` (HunyuanVideo 1.5) spans placed in calls of a given length: the text right
    after the image, or at the end of the sequence; shorter calls and calls between unequal lengths are not read."""
    after = J.Span(slice(6, 10), slice(0, 6), (2, 3), 0, "after_image")
    assert after.locate(30, 30) == after and after.locate(10, 10) == after
    assert after.locate(9, 9) is None and after.locate(30, 29) is None
    end = J.Span(slice(6, 10), slice(0, 6), (2, 3), 0, "end")
    placed = end.locate(30, 30)
    assert (placed.text, placed.image, placed.seq) == (slice(26, 30), slice(0, 6), 30)
    assert end.locate(9, 9) is None and end.locate(30, 31) is None
