"""The HunyuanVideo 1.5 parts of the text-encoder engine pinned in-process (tiny tensors, no encoders): the quoted
text byT5 reads against diffusers' own ``extract_glyph_texts`` on hostile prompts, and ``strip_padding`` against
hand-made masks."""
from __future__ import annotations

import pytest
import torch

GLYPH_PROMPTS = [
    "no quotes at all", "", 'one "OPEN" sign', 'two "A" and "B"', 'repeat "A", "B", "A", "A"', 'single "A" once',
    "curly “hello” then straight \"world\"", 'straight "x" then curly “y”', 'empty "" span', 'only ""',
    'unbalanced "open', 'a "multi\nline" span', "‘single’ curly quotes only", 'nested "a “b” c"',
    'mixed “a" and "b”', '"' + "z" * 400 + '"', "“”", 'emoji "✨ café"', 'same span "A" and curly “A”',
]


@pytest.fixture(scope="module")
def E(comfy):
    class NS:
        align = comfy.engine("te.align")
        inputs = comfy.engine("te.inputs")
        specs = comfy.engine("te.specs")
    return NS


@pytest.mark.parametrize("prompt", GLYPH_PROMPTS)
def test_quoted_text_is_diffusers_glyph_text(E, prompt):
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts

    assert E.inputs.derive(prompt, "quoted_text") == extract_glyph_texts(prompt)
    assert E.inputs.derive(prompt, "prompt") == E.inputs.derive(prompt, None) == prompt


def test_unknown_input_is_refused_by_name(E):
    with pytest.raises(ValueError, match="'glyphs'.*prompt, quoted_text"):
        E.inputs.derive("a", "glyphs")


def test_strip_padding_keeps_the_masked_in_positions(E):
    spec = E.specs.get_spec("hunyuan-video-1.5")  # the default variant strips both streams
    cond = torch.arange(12.0).reshape(1, 6, 2)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]])
    byt5 = torch.ones(1, 4, 3)
    out = E.align.strip_padding({"cond": cond, "attention_mask": mask, "conditioning_byt5small": byt5,
                                 "conditioning_byt5small_attention_mask": torch.tensor([[1, 1, 0, 0]]),
                                 "pooled_output": None}, spec)
    assert set(out) == {"cond", "conditioning_byt5small", "pooled_output"}
    assert torch.equal(out["cond"], cond[:, :3]) and out["conditioning_byt5small"].shape == (1, 2, 3)
    none = E.align.strip_padding({"cond": cond, "conditioning_byt5small": byt5 * 0,
                                  "conditioning_byt5small_attention_mask": torch.zeros(1, 4)}, spec)
    assert set(none) == {"cond"} and none["cond"] is cond  # no Qwen mask: every position kept
    padded = E.specs.get_spec("hunyuan-video-1.5:padded")
    same = {"cond": cond, "attention_mask": mask}
    assert E.align.strip_padding(same, padded) == same
    with pytest.raises(E.specs.SpecError, match="hunyuan-video-1.5.*one prompt per encode.*batch of 2"):
        E.align.strip_padding({"cond": cond.repeat(2, 1, 1), "attention_mask": mask.repeat(2, 1)}, spec)
