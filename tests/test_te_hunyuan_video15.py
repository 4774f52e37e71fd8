"""HunyuanVideo 1.5's text encoders (``hunyuan-video-1.5`` spec): the aligned CLIP, built from ComfyUI's own
HunyuanVideo 1.5 text-encoder classes on a seeded tiny Qwen2.5-VL and a tiny byT5, against diffusers'
``HunyuanVideo15Pipeline.encode_prompt`` on the same weights (fp32): both streams, embeddings and masks; and where
ComfyUI's default encoding differs from the spec."""
from __future__ import annotations

import inspect

import pytest
import torch

from support.factories import te_hunyuan_video15 as hv
from support.factories import te_qwen_image
from support.prompt_syntax import BASE_PROMPTS
from support.te_compare import encode as _encode, max_diff as _max

TOL = 1e-4
PROMPTS = {
    # the shared prompt set of the LLM families (test_te_llm_families.PROMPTS without the syntax cases)
    **BASE_PROMPTS,
    "long": "word, " * 600,  # 1200 tokens: over the 1000 kept after the 108-token crop
    "leading-newline": "\n a cat on a mat",  # the newline merges into the template's: the crop is a fixed count
    # quoted text for byT5: one span; two spans, one repeated (deduplicated); curly quotes before straight ones (in
    # order of appearance), a single-quoted span (not read), an empty span and one over the 256-byte cut
    "quote-one": 'a shop sign that says "OPEN" above the door',
    "quote-two": 'a poster reading "SALE", then "50% OFF" and "SALE" again',
    "quote-curly": 'a neon sign “hello world”, a ‘single’ quote, an empty "" sign and "' + "x" * 300 + '"',
}


@pytest.fixture(scope="module")
def hv15(comfy):
    qwen, byt5 = hv.qwen25vl_tiny_file(), hv.byt5_tiny_file()
    clip = hv.shared_hv15_clip(qwen, byt5)
    align = comfy.engine("te.align")
    return {"clip": clip, "aligned": align.align_clip(clip, "hunyuan-video-1.5:padded"),
            "unpadded": align.align_clip(clip, "hunyuan-video-1.5"), "pipe": hv.hv15_pipeline(qwen, byt5),
            "encoded": {}}


def _aligned(hv15, prompt):
    """The 'padded' variant's conditioning (encode_prompt's form), encoded once per prompt for the module (1108
    Qwen positions each)."""
    if prompt not in hv15["encoded"]:
        hv15["encoded"][prompt] = _encode(hv15["aligned"], prompt)
    return hv15["encoded"][prompt]


def _ref(pipe, prompt):
    with torch.no_grad():
        return pipe.encode_prompt(prompt, device="cpu", dtype=torch.float32)


def test_hv15_spec_values_are_the_pipelines(comfy, hv15):
    """Template, crop, lengths and layer are the pipeline's own values; the template equals the chat template
    rendered by the reference tokenizer, and the crop is exactly the template's tokens before the prompt."""
    pipe = hv15["pipe"]
    qwen, byt5 = comfy.engine("te.specs").get_spec("hunyuan-video-1.5:padded").encoders
    params = inspect.signature(pipe._get_mllm_prompt_embeds).parameters
    rendered = pipe.tokenizer.apply_chat_template(
        [{"role": "system", "content": pipe.system_message}, {"role": "user", "content": "PROMPT"}],
        add_generation_prompt=True, tokenize=False)
    assert qwen["template"].replace("{prompt}", "PROMPT") == rendered
    assert qwen["drop_prefix"] == pipe.prompt_template_encode_start_idx == params["crop_start"].default
    assert len(pipe.tokenizer(qwen["template"].split("{prompt}")[0]).input_ids) == qwen["drop_prefix"]
    assert qwen["max_length"] == pipe.tokenizer_max_length
    assert qwen["hidden_layer"] == "third_last" and params["num_hidden_layers_to_skip"].default == 2
    assert byt5["max_length"] == pipe.tokenizer_2_max_length
    detected = comfy.engine("te.specs").detect_spec(hv15["clip"])
    assert (detected.id, detected.variant) == ("hunyuan-video-1.5", "unpadded")


@pytest.mark.parametrize("name", PROMPTS)
def test_hv15_matches_hunyuan_video15_pipeline(comfy, hv15, name):
    """Reference: HunyuanVideo15Pipeline.encode_prompt: Qwen2.5-VL stream (1000 positions after the 108-token crop,
    hidden_states[-3], mask) and byT5 stream (256 positions of the quoted text, mask; zeros without quotes)."""
    prompt = PROMPTS[name]
    ref, ref_mask, ref2, ref_mask2 = _ref(hv15["pipe"], prompt)
    out = _aligned(hv15, prompt)
    assert out["cond"].shape == ref.shape == (1, 1000, te_qwen_image.QWEN25VL_TINY["hidden_size"])
    print(f"hv15 {name}: qwen max abs {_max(out['cond'], ref):.2e}, "
          f"byt5 max abs {_max(out['conditioning_byt5small'], ref2):.2e}")
    assert _max(out["cond"], ref) <= TOL
    mask = out.get("attention_mask")  # ComfyUI drops a mask with every position set
    assert torch.equal(mask.float(), ref_mask) if mask is not None else bool(ref_mask.bool().all())
    byt5 = out["conditioning_byt5small"]
    assert byt5.shape == ref2.shape == (1, 256, hv.BYT5_TINY["d_model"])
    assert _max(byt5, ref2) <= TOL
    assert torch.equal(out["conditioning_byt5small_attention_mask"].float(), ref_mask2)
    if not name.startswith("quote"):
        assert not ref2.any() and not ref_mask2.any()
    else:
        assert ref_mask2.any()
    if name == "long":
        assert bool(ref_mask.all())


def test_hv15_unpadded_is_encode_prompts_kept_positions_and_runs_in_comfys_model(comfy, hv15):
    """The default variant ('unpadded') gives encode_prompt's conditioning without the positions its masks leave out
    (diffusers' transformer never attends them): no mask, byT5 only with quoted text. ComfyUI's tiny HunyuanVideo
    1.5 transformer (text width 128) runs on it, and fails on the padded form (a Qwen mask with byT5 states)."""
    from support.factories import hunyuan_video15 as dit

    model = dit.build_model(context_in_dim=te_qwen_image.QWEN25VL_TINY["hidden_size"]).model.diffusion_model
    x, t = torch.randn(1, 65, 2, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0.5])
    for name in ("plain", "quote-two"):
        ref, ref_mask, ref2, ref_mask2 = _ref(hv15["pipe"], PROMPTS[name])
        out = _encode(hv15["unpadded"], PROMPTS[name])
        assert "attention_mask" not in out and "conditioning_byt5small_attention_mask" not in out
        assert _max(out["cond"], ref[:, ref_mask[0].bool()]) <= TOL
        if name == "plain":
            assert "conditioning_byt5small" not in out
        else:
            assert _max(out["conditioning_byt5small"], ref2[:, ref_mask2[0].bool()]) <= TOL
        with torch.no_grad():
            y = model(x, t, out["cond"], txt_byt5=out.get("conditioning_byt5small"))
        assert y.shape == (1, 32, 2, 4, 4) and bool(torch.isfinite(y).all())
    padded = _aligned(hv15, PROMPTS["quote-two"])
    with pytest.raises(RuntimeError, match="must match"), torch.no_grad():
        model(x, t, padded["cond"], attention_mask=padded["attention_mask"], txt_byt5=padded["conditioning_byt5small"])


def test_hv15_comfy_default_vs_spec(comfy, hv15, record_property):
    """ComfyUI's default HunyuanVideo 1.5 encoding: another system message (newlines where diffusers' string has
    runs of spaces), no padding, mask or 1000-token cap, a heuristic template end (3 extra positions after a leading
    newline), and a byT5 stream only with quoted text, read its own way (single quotes too, no deduplication)."""
    default = hv15["clip"]
    rows = {}
    for name in ("plain", "long", "leading-newline", "quote-two", "quote-curly"):
        d, a = _encode(default, PROMPTS[name]), _aligned(hv15, PROMPTS[name])
        mask = a.get("attention_mask")
        kept = int(mask.sum()) if mask is not None else a["cond"].shape[1]
        row = {"default_len": d["cond"].shape[1], "spec_len": kept,
               "max_abs": _max(d["cond"], a["cond"][:, :kept]) if d["cond"].shape[1] == kept else None}
        db = d.get("conditioning_byt5small")
        sb, sm = a["conditioning_byt5small"], a["conditioning_byt5small_attention_mask"]
        row["byt5_default_len"] = None if db is None else db.shape[1]
        row["byt5_spec_len"] = int(sm.sum())
        rows[name] = row
    record_property("comfy_default_vs_spec", rows)
    print("hunyuan-video-1.5 comfy default vs spec", rows)
    assert rows["plain"]["max_abs"] > 0.01, "ComfyUI's system message (newlines) is another text than diffusers'"
    assert rows["long"]["spec_len"] == 1000 < rows["long"]["default_len"]
    assert rows["leading-newline"]["default_len"] == rows["leading-newline"]["spec_len"] + 3
    assert rows["plain"]["byt5_default_len"] is None and rows["plain"]["byt5_spec_len"] == 0
    # 'Text "SALE". Text "50% OFF". ' (29 bytes + </s>) vs ComfyUI's 'SALE' twice (+13 bytes)
    assert rows["quote-two"]["byt5_spec_len"] == 30 and rows["quote-two"]["byt5_default_len"] == 43
    # ComfyUI adds the 'single' span; the spec cuts the 300-byte span at 256 tokens
    assert rows["quote-curly"]["byt5_spec_len"] == 256 < rows["quote-curly"]["byt5_default_len"]


def test_hv15_token_inspector_reads_the_quoted_text_for_byt5(comfy, hv15):
    """The Token Inspector shows byT5 the text it reads (the quoted spans, as diffusers' tokenizer_2 splits them)
    and warns of a cut only when that text passes 256 tokens, whatever the caption's length."""
    inspect_text = comfy.engine("te.inspect").inspect_text
    tok2 = hv15["pipe"].tokenizer_2
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts

    for prompt, cut in (("a long caption about a sign " * 20 + 'that says "OPEN"', 0), (PROMPTS["plain"], 0),
                        (PROMPTS["quote-curly"], None)):
        glyph = extract_glyph_texts(prompt)
        n = len(tok2(glyph).input_ids) - 1 if glyph else 0  # without </s>
        report = inspect_text(hv15["unpadded"], prompt)
        entry = report["encoders"]["byt5"]
        assert entry["content_tokens"] == n
        assert entry["truncated_tokens"] == (max(0, n + 1 - 256) if cut is None else cut)
        assert any(w.startswith("byt5:") for w in report["warnings"]) == (entry["truncated_tokens"] > 0)
