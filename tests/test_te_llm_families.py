"""LLM-encoder families (Z-Image: Qwen3 under a chat template; Qwen-Image: Qwen2.5-VL under a system-prompt
template whose first 34 tokens are dropped): the aligned CLIP, built from ComfyUI's own text-encoder classes on
seeded tiny encoders, against the official diffusers pipeline's ``encode_prompt`` on the same weights (fp32), and
where ComfyUI's default encoding differs from the spec."""
from __future__ import annotations

import inspect

import pytest
import torch

from support.factories import te_llm, te_lumina2, te_qwen_image
from support.prompt_syntax import BASE_PROMPTS, SYNTAX_PROMPTS
from support.te_compare import max_diff as _max, encode as _encode

TOL = 1e-4
PROMPTS = {
    **BASE_PROMPTS,
    "long": "word, " * 600,  # over 512 tokens once templated
    **{f"syntax-{k}": v for k, v in SYNTAX_PROMPTS.items()},
}


@pytest.fixture(scope="module")
def z_image(comfy):
    path = te_llm.qwen3_tiny_file()
    return {"clip": te_llm.z_image_clip(path), "pipe": te_llm.z_image_pipeline(path)}


@pytest.mark.parametrize("name", PROMPTS)
def test_z_image_matches_z_image_pipeline(comfy, z_image, name):
    """Reference: ZImagePipeline.encode_prompt(prompt, do_classifier_free_guidance=False): Qwen3 chat template,
    padded to 512 and truncated, mask inside the encoder, hidden_states[-2], padding removed."""
    align = comfy.engine("te.align")
    prompt = PROMPTS[name]
    with torch.no_grad():
        ref, _ = z_image["pipe"].encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    ref = ref[0].unsqueeze(0)
    out = _encode(align.align_clip(z_image["clip"], "z-image"), prompt)
    assert out["cond"].shape == ref.shape == (1, ref.shape[1], te_llm.QWEN3_TINY["hidden_size"])
    assert _max(out["cond"], ref) <= TOL
    mask = out.get("attention_mask")
    assert mask is None or bool(mask.bool().all()), "every position the transformer sees is a prompt token"
    if name == "long":
        assert ref.shape[1] == 512


def test_z_image_spec_is_detected(comfy, z_image):
    assert comfy.engine("te.specs").detect_spec(z_image["clip"]).id == "z-image"


def test_z_image_comfy_default_vs_spec(comfy, z_image):
    """ComfyUI's default equals the official encoding for a plain prompt (same template, layer and norm), but
    never truncates at 512 tokens and parses part of its prompt syntax (escapes)."""
    align = comfy.engine("te.align")
    aligned = align.align_clip(z_image["clip"], "z-image")
    default = z_image["clip"]
    plain = PROMPTS["plain"]
    assert _max(_encode(default, plain)["cond"], _encode(aligned, plain)["cond"]) <= TOL
    long_default, long_aligned = _encode(default, PROMPTS["long"])["cond"], _encode(aligned, PROMPTS["long"])["cond"]
    assert long_aligned.shape[1] == 512 < long_default.shape[1]
    esc = r"a \(literal\) bracket"
    d, a = _encode(default, esc)["cond"], _encode(aligned, esc)["cond"]
    assert d.shape != a.shape or _max(d, a) > TOL


def test_z_image_comfyui_syntax_equals_stock_comfyui(comfy, z_image):
    """The 'comfyui' prompt syntax reproduces ComfyUI's own Z-Image encoding: escapes resolved, emphasis weights
    ignored as ZImageTokenizer does (the spec's comfy_weights false), for prompts under the 512-token cap."""
    align = comfy.engine("te.align")
    ac = align.align_clip(z_image["clip"], "z-image", prompt_syntax="comfyui")
    for prompt in (r"a (red:1.3) circle, \(cat\) on ((grass))", PROMPTS["plain"], ""):
        assert _max(_encode(ac, prompt)["cond"], _encode(z_image["clip"], prompt)["cond"]) <= 1e-6, prompt


# -- Qwen-Image: Qwen2.5-VL under a system-prompt template, the template's first 34 tokens dropped ---------------
# The prompt-syntax cases of these families are compared with the same reference pipelines in test_te_syntax.py.
UNSYNTAX_PROMPTS = {k: v for k, v in PROMPTS.items() if not k.startswith("syntax-")}
# "long": 600 tokens, over the 512 kept after the 34-token prefix (the shared 1200-token prompt costs twice as much)
QWEN_PROMPTS = {**UNSYNTAX_PROMPTS, "long": "word, " * 300, "leading-newline": "\n a cat on a mat"}


@pytest.fixture(scope="module")
def qwen_image(comfy):
    path = te_qwen_image.qwen25vl_tiny_file()
    return {"clip": te_qwen_image.qwen_image_clip(path), "pipe": te_qwen_image.qwen_image_pipeline(path)}


def _qwen_ref(pipe, prompt):
    """QwenImagePipeline.encode_prompt as __call__ runs it (its default max_sequence_length)."""
    n = inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default
    with torch.no_grad():
        return pipe.encode_prompt(prompt, device="cpu", max_sequence_length=n)


def test_qwen_image_spec_values_are_the_pipelines(comfy, qwen_image):
    """The spec's template, dropped prefix and length are the pipeline's own values, and the dropped prefix is
    exactly the template's tokens before the prompt."""
    pipe = qwen_image["pipe"]
    (enc,) = comfy.engine("te.specs").get_spec("qwen-image").encoders
    assert enc["template"] == pipe.prompt_template_encode.replace("{}", "{prompt}")
    assert enc["drop_prefix"] == pipe.prompt_template_encode_start_idx
    assert enc["max_length"] == inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default
    assert len(pipe.tokenizer(enc["template"].split("{prompt}")[0]).input_ids) == enc["drop_prefix"]


@pytest.mark.parametrize("name", QWEN_PROMPTS)
def test_qwen_image_matches_qwen_image_pipeline(comfy, qwen_image, name):
    """Reference: QwenImagePipeline.encode_prompt(prompt, max_sequence_length=512): system-prompt template, mask in
    the encoder, hidden_states[-1], the first 34 positions dropped, at most 512 kept; mask None (all prompt)."""
    prompt = QWEN_PROMPTS[name]
    ref, ref_mask = _qwen_ref(qwen_image["pipe"], prompt)
    out = _encode(comfy.engine("te.align").align_clip(qwen_image["clip"], "qwen-image"), prompt)
    assert out["cond"].shape == ref.shape == (1, ref.shape[1], te_qwen_image.QWEN25VL_TINY["hidden_size"])
    assert _max(out["cond"], ref) <= TOL
    mask = out.get("attention_mask")
    assert ref_mask is None and (mask is None or bool(mask.bool().all()))
    if name == "long":
        assert ref.shape[1] == 512


def test_qwen_image_spec_is_detected(comfy, qwen_image):
    assert comfy.engine("te.specs").detect_spec(qwen_image["clip"]).id == "qwen-image"


def test_qwen_image_comfy_default_vs_spec(comfy, qwen_image, record_property):
    """ComfyUI's default equals the official encoding for ordinary prompts (same template, layer, and its
    template search finds the same 34 tokens), but never truncates at 512, keeps 3 template positions when the
    prompt begins with a newline, skips the template for a prompt that begins with '<|im_start|>', and resolves
    escapes."""
    aligned = comfy.engine("te.align").align_clip(qwen_image["clip"], "qwen-image")
    default = qwen_image["clip"]
    rows = {}
    for name, prompt in {"plain": PROMPTS["plain"], "empty": "", "long": QWEN_PROMPTS["long"],
                         "leading-newline": QWEN_PROMPTS["leading-newline"], "im_start": "<|im_start|>a red circle",
                         "escaped": r"a \(literal\) bracket"}.items():
        d, a = _encode(default, prompt)["cond"], _encode(aligned, prompt)["cond"]
        rows[name] = {"default_len": d.shape[1], "aligned_len": a.shape[1],
                      "max_abs": _max(d, a) if d.shape == a.shape else None}
    record_property("comfy_default_vs_spec", rows)
    print("qwen-image comfy default vs spec", rows)
    assert rows["plain"]["max_abs"] <= TOL and rows["empty"]["max_abs"] <= TOL
    assert rows["long"]["aligned_len"] == 512 < rows["long"]["default_len"]
    assert rows["leading-newline"]["default_len"] == rows["leading-newline"]["aligned_len"] + 3
    assert rows["im_start"]["default_len"] < rows["im_start"]["aligned_len"]
    assert rows["escaped"]["max_abs"] is None or rows["escaped"]["max_abs"] > TOL


def test_qwen_image_comfyui_syntax_equals_stock_comfyui(comfy, qwen_image):
    """The 'comfyui' prompt syntax reproduces ComfyUI's own Qwen-Image encoding (escapes resolved, weights ignored)
    for ordinary prompts under the cap, with the dropped prefix passed to ComfyUI's own template_end."""
    ac = comfy.engine("te.align").align_clip(qwen_image["clip"], "qwen-image", prompt_syntax="comfyui")
    for prompt in (r"a (red:1.3) circle, \(cat\) on ((grass))", PROMPTS["plain"], ""):
        assert _max(_encode(ac, prompt)["cond"], _encode(qwen_image["clip"], prompt)["cond"]) <= 1e-6, prompt


def test_dropped_prefix_needs_comfys_template_end(comfy, z_image):
    """A spec that drops a template prefix on a text encoder without ComfyUI's template_end fails naming both."""
    specs = comfy.engine("te.specs")
    ac = comfy.engine("te.align").align_clip(z_image["clip"], "qwen-image")
    with pytest.raises(specs.SpecError, match=r"'qwen-image'.*drop_prefix 34.*ZImageTEModel"):
        _encode(ac, "a cat")


# -- Lumina 2: Gemma-2 on a system prompt, 256 tokens, mask in the encoder and to the transformer -----------------
@pytest.fixture(scope="module")
def lumina2(comfy):
    path = te_lumina2.gemma2_tiny_file()
    return {"clip": te_lumina2.lumina2_clip(path), "pipe": te_lumina2.lumina2_pipeline(path, softcap=False),
            "official": te_lumina2.lumina2_pipeline(path)}


def _lumina_ref(pipe, prompt):
    with torch.no_grad():
        pe, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, device="cpu")
    return pe, mask


def test_lumina2_spec_values_are_the_pipelines(comfy, lumina2):
    pipe = lumina2["official"]
    (enc,) = comfy.engine("te.specs").get_spec("lumina2").encoders
    assert enc["template"] == pipe.system_prompt + " <Prompt Start> {prompt}"
    for fn in (type(pipe).__call__, type(pipe).encode_prompt):
        assert enc["max_length"] == inspect.signature(fn).parameters["max_sequence_length"].default
    assert pipe.tokenizer.pad_token_id == 0 and enc["pad_token"] == "zero"


@pytest.mark.parametrize("name", UNSYNTAX_PROMPTS)
def test_lumina2_matches_lumina2_pipeline(comfy, lumina2, name):
    """Reference: Lumina2Pipeline.encode_prompt(prompt): system prompt + ' <Prompt Start> ' + prompt, padded and
    truncated to 256, mask in the encoder and returned for the transformer, hidden_states[-2]; the reference's
    Gemma-2 without the attention-logit soft-cap, which ComfyUI's Gemma-2 lacks (measured below)."""
    prompt = PROMPTS[name]
    ref, ref_mask = _lumina_ref(lumina2["pipe"], prompt)
    out = _encode(comfy.engine("te.align").align_clip(lumina2["clip"], "lumina2"), prompt)
    assert out["cond"].shape == ref.shape == (1, 256, te_lumina2.GEMMA2_TINY["hidden_size"])
    assert _max(out["cond"], ref) <= TOL
    assert torch.equal(out["attention_mask"].long(), ref_mask.long())
    assert (name == "long") == bool(ref_mask.all())


def test_lumina2_spec_is_detected(comfy, lumina2):
    assert comfy.engine("te.specs").detect_spec(lumina2["clip"]).id == "lumina2"


def test_lumina2_gemma2_softcap_is_missing_in_comfyui(comfy, lumina2, record_property):
    """ComfyUI's Gemma-2 does not soft-cap attention logits (Gemma-2's attn_logit_softcapping 50): on the tiny
    weights the aligned CLIP equals the pipeline exactly with the cap off, and differs from the official config."""
    ac = comfy.engine("te.align").align_clip(lumina2["clip"], "lumina2")
    out = _encode(ac, PROMPTS["plain"])["cond"]
    capped, uncapped = _lumina_ref(lumina2["official"], PROMPTS["plain"])[0], _lumina_ref(lumina2["pipe"], PROMPTS["plain"])[0]
    figures = {"vs_softcap_off": _max(out, uncapped), "vs_official_softcap_50": _max(out, capped)}
    record_property("gemma2_softcap", figures)
    print("lumina2 gemma2 soft-cap", figures)
    assert figures["vs_softcap_off"] <= TOL < figures["vs_official_softcap_50"]


def test_lumina2_comfy_default_vs_spec(comfy, lumina2, record_property):
    """ComfyUI's CLIPTextEncode adds no system prompt (only CLIPTextEncodeLumina2 does), pads nothing and never cuts
    at 256; with the system prompt prepended its positions equal the aligned CLIP's unmasked ones."""
    aligned = comfy.engine("te.align").align_clip(lumina2["clip"], "lumina2")
    default = lumina2["clip"]
    system = lumina2["official"].system_prompt
    rows = {}
    prompts = {"plain": PROMPTS["plain"], "empty": "", "long": "word, " * 150}  # long: ~330 tokens with the system prompt
    for name, prompt in prompts.items():
        a = _encode(aligned, prompt)
        n = int(a["attention_mask"].sum())
        plain_default = _encode(default, prompt)["cond"]
        node_text = f"{system} <Prompt Start> {prompt}"  # what CLIPTextEncodeLumina2 encodes
        if name == "long":  # only its length is compared: count the positions without encoding 330 tokens
            rows[name] = {"aligned_tokens": n, "default_len": plain_default.shape[1],
                          "node_len": len(default.tokenize(node_text)["gemma2_2b"][0])}
            continue
        node_default = _encode(default, node_text)["cond"]
        rows[name] = {"aligned_tokens": n, "default_len": plain_default.shape[1], "node_len": node_default.shape[1],
                      "node_max_abs": _max(node_default[:, :n], a["cond"][:, :n]) if node_default.shape[1] >= n else None}
    record_property("comfy_default_vs_spec", rows)
    print("lumina2 comfy default vs spec", rows)
    for name in ("plain", "empty"):
        assert rows[name]["default_len"] < rows[name]["aligned_tokens"] == rows[name]["node_len"]
        assert rows[name]["node_max_abs"] <= TOL
    assert rows["long"]["aligned_tokens"] == 256 < rows["long"]["node_len"]
    weighted = "a (red:1.3) circle"
    d = _encode(default, f"{system} <Prompt Start> {weighted}")["cond"]
    a = _encode(aligned, weighted)
    n = int(a["attention_mask"].sum())
    assert d.shape[1] != n or _max(d, a["cond"][:, :n]) > TOL


def test_lumina2_token_inspector_counts_the_system_prompt(comfy, lumina2):
    """The Token Inspector's truncation count takes the system prompt's room into account: it equals what the
    official tokenizer cuts from the system-prompted text at 256 tokens."""
    ac = comfy.engine("te.align").align_clip(lumina2["clip"], "lumina2")
    tok, system = lumina2["official"].tokenizer, lumina2["official"].system_prompt
    for prompt in ("word, " * 150, PROMPTS["plain"]):
        cut = max(0, len(tok(f"{system} <Prompt Start> {prompt}").input_ids) - 256)
        info = comfy.engine("te.inspect").inspect_text(ac, prompt)
        assert info["encoders"]["gemma2_2b"]["truncated_tokens"] == cut, prompt
        assert any("truncated" in w for w in info["warnings"]) == (cut > 0)


def test_qwen_image_token_inspector_counts_the_kept_positions(comfy, qwen_image):
    """With a dropped prefix and a template suffix, the Token Inspector's count is the prompt tokens missing from
    the official embedding: the template's end is cut first, 512 positions are kept after the 34 dropped."""
    ac = comfy.engine("te.align").align_clip(qwen_image["clip"], "qwen-image")
    tok = qwen_image["pipe"].tokenizer
    for prompt, over in ((QWEN_PROMPTS["long"], True), (PROMPTS["plain"], False)):
        n = len(tok(prompt).input_ids)
        cut = n - 512 if over else 0  # all 512 kept positions are prompt tokens once it is this long
        assert comfy.engine("te.inspect").inspect_text(ac, prompt)["encoders"]["qwen25_7b"]["truncated_tokens"] == cut
