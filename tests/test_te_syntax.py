"""Prompts written in ComfyUI's prompt syntax are read literally by the aligned encoder, as the official pipelines
read them: every family with a spec against diffusers on the same seeded weights (fp32), with the CLIPs built the
way the stock loaders build them (an embeddings folder holding a real textual-inversion file). The aligned CLIP
with ComfyUI's syntax chosen explicitly is reported beside it (and must differ where that syntax changes text)."""
from __future__ import annotations

import pytest
import torch

from support.factories import (te_flux2, te_hidream, te_hunyuan_video15, te_llm, te_lumina2, te_more, te_qwen_image,
                               te_t5, te_wan)
from support.factories import text_encoders as te
from support.prompt_syntax import EMBEDDING_NAME, SYNTAX_PROMPTS, embeddings_folder

TOL = 1e-4
# families whose every encode is long run a subset (HunyuanVideo 1.5: 1108 Qwen positions per prompt, three encodes per
# prompt, ~0.2 s each; its Qwen stream reads text through the same path as Qwen-Image's, which runs every prompt):
# the prompts ComfyUI's syntax changes for it (escapes, embedding names) and two bracket forms
# Variants that share every tokenizer with a family that runs every prompt (SD3's diffusers projection and SD3.5 Large:
# SD3's CLIP-L, CLIP-G and T5; FLUX.1 schnell: dev's with 256 T5 tokens) run the same subset: a full-size CLIP-L
# encode is ~0.3 s on 2 cores, three per prompt
SUBSET = ("escaped", "embedding", "nested", "url")
SUBSETS = {"hunyuan-video-1.5:padded": SUBSET, "sd3:diffusers": SUBSET, "sd35:large": SUBSET, "flux1-schnell": SUBSET}


def _diff(a, b) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def emb_dirs(comfy, tmp_path_factory):
    return embeddings_folder(tmp_path_factory.mktemp("emb"), {
        "clip_l": 768, "clip_g": te.CLIP_G_TINY["hidden_size"], "clip_h": te_more.CLIP_H_TINY["hidden_size"],
        "t5xxl": te.T5_TINY["d_model"], "pile_t5xl": te_more.PILE_T5_TINY["d_model"],
        "qwen3_4b": te_llm.QWEN3_TINY["hidden_size"], "qwen25_7b": te_qwen_image.QWEN25VL_TINY["hidden_size"],
        "gemma2_2b": te_lumina2.GEMMA2_TINY["hidden_size"], "umt5xxl": te_wan.UMT5_SHRINK["d_model"],
        "llama": te_hidream.LLAMA_TINY["hidden_size"], "mistral3_24b": te_flux2.MISTRAL_TINY["hidden_size"]})


@pytest.fixture(scope="module")
def families(comfy, emb_dirs, tmp_path_factory):
    """spec id -> (ComfyUI CLIP with the embeddings folder, reference(prompt) -> (cond, pooled, mask[, other
    conditioning keys]))."""
    align = comfy.engine("te.align")
    l, lp, g, t5, t5_3 = te.clip_l_file(), te.clip_lp_file(), te.clip_g_file(), te.t5_tiny_file(), te.t5_sd3_file()
    h, pile = te_more.clip_h_file(), te_more.pile_t5_file()
    sd, flux = te.sd_pipeline(l), te.flux_pipeline(l, t5)
    sdxl, sd2, aura = te.sdxl_pipeline(lp, g), te_more.sd2_pipeline(h), te_more.auraflow_pipeline(pile)
    sd3_d, sd3_r = te.sd3_pipeline(lp, g, t5_3), te.sd3_pipeline(lp, g, t5_3, identity_l_projection=True)
    pixart, chroma = te_t5.pixart_sigma_pipeline(t5), te_t5.chroma_pipeline(t5)
    qwen3 = te_llm.qwen3_tiny_file()
    z_image = te_llm.z_image_pipeline(qwen3)
    qwen25vl = te_qwen_image.qwen25vl_tiny_file()
    qwen_image = te_qwen_image.qwen_image_pipeline(qwen25vl)
    gemma2 = te_lumina2.gemma2_tiny_file()
    lumina2 = te_lumina2.lumina2_pipeline(gemma2, softcap=False)  # ComfyUI's Gemma-2 has no soft-cap (test_te_llm_families)
    flux_clip, t5_clip = te.flux_clip(l, t5, emb_dirs), te_t5.pixart_clip(t5, emb_dirs)
    sd3_clip = te.sd3_clip(lp, g, t5_3, emb_dirs)
    cpu = dict(device="cpu")
    mistral = te_flux2.mistral_tiny_file()
    flux2 = te_flux2.flux2_pipeline(mistral, tmp_path_factory.mktemp("flux2-tokenizer"))
    hidream_files = te_hidream.files()
    hidream = te_hidream.hidream_pipeline(*hidream_files.values())
    hidream_refs = {}
    hv15_files = te_hunyuan_video15.qwen25vl_tiny_file(), te_hunyuan_video15.byt5_tiny_file()
    hv15 = te_hunyuan_video15.hv15_pipeline(*hv15_files)

    def hv15_ref(prompt):  # both streams, padded: Qwen2.5-VL (cond, mask) and byT5 (conditioning_byt5small)
        pe, mask, pe2, _ = hv15.encode_prompt(prompt, dtype=torch.float32, **cpu)
        return pe, None, mask, {"conditioning_byt5small": pe2}

    def hidream_ref(prompt):  # the whole syntax set in one batched encode_prompt call, on first use
        if not hidream_refs:
            hidream_refs.update(te_hidream.reference(hidream, SYNTAX_PROMPTS.values()))
        r = hidream_refs.get(prompt) or te_hidream.reference(hidream, [prompt])[prompt]
        return r["cond"], r["pooled_output"], None, {"conditioning_llama3": r["conditioning_llama3"]}

    def sd3_ref(pipe, prompt, variant):
        if variant == "diffusers":
            kw = dict(prompt=prompt, prompt_2=None, prompt_3=None, max_sequence_length=256)
        else:  # Stability's reference: CLIP words split on spaces (short prompts: one chunk); T5 text[:226], >= 77
            words = " ".join(w for w in prompt.replace("\n", " ").split(" ") if w)
            n = len(pipe.tokenizer_3(prompt[:226])["input_ids"])
            kw = dict(prompt=words, prompt_2=words, prompt_3=prompt[:226], max_sequence_length=max(77, n))
        pe, _, pooled, _ = pipe.encode_prompt(do_classifier_free_guidance=False, **cpu, **kw)
        return pe, pooled, None

    def pixart_ref(prompt):
        enc = comfy.engine("te.specs").get_spec("pixart-sigma").encoders[0]
        pe, mask, _, _ = pixart.encode_prompt(align.clean_text(prompt, enc["cleaning"]), do_classifier_free_guidance=False,
                                              max_sequence_length=300, clean_caption=False, **cpu)
        return pe, None, mask

    return {
        "sd15": (te.load_comfy_clip([l], "stable_diffusion", emb_dirs),
                 lambda p: (sd.encode_prompt(p, "cpu", 1, False)[0], None, None)),
        "sd2x": (te_more.sd2_clip(h, emb_dirs), lambda p: (sd2.encode_prompt(p, "cpu", 1, False)[0], None, None)),
        "sdxl": (te.sdxl_clip(lp, g, emb_dirs),
                 lambda p: (lambda r: (r[0], r[2], None))(sdxl.encode_prompt(p, do_classifier_free_guidance=False, **cpu))),
        "sd3:reference": (sd3_clip, lambda p: sd3_ref(sd3_r, p, "reference")),
        "sd3:diffusers": (sd3_clip, lambda p: sd3_ref(sd3_d, p, "diffusers")),
        "sd35:large": (sd3_clip, lambda p: sd3_ref(sd3_r, p, "reference")),
        "flux1-dev": (flux_clip, lambda p: flux.encode_prompt(p, prompt_2=None, max_sequence_length=512, **cpu)[:2] + (None,)),
        "flux1-schnell": (flux_clip,
                          lambda p: flux.encode_prompt(p, prompt_2=None, max_sequence_length=256, **cpu)[:2] + (None,)),
        "pixart-sigma": (t5_clip, pixart_ref),
        "chroma": (t5_clip, lambda p: (lambda r: (r[0], None, r[2]))(
            chroma.encode_prompt(p, do_classifier_free_guidance=False, max_sequence_length=512, **cpu))),
        "auraflow": (te_more.auraflow_clip(pile, emb_dirs),
                     lambda p: (aura.encode_prompt(p, do_classifier_free_guidance=False, max_sequence_length=256,
                                                   **cpu)[0], None, None)),
        "z-image": (te_llm.z_image_clip(qwen3, emb_dirs),
                    lambda p: (z_image.encode_prompt(p, do_classifier_free_guidance=False, **cpu)[0][0][None], None, None)),
        "wan": (te_wan.wan_clip(embedding_directory=emb_dirs),
                lambda p: (te_wan.wan_pipeline().encode_prompt(p, do_classifier_free_guidance=False,
                                                               max_sequence_length=512, **cpu)[0], None, None)),
        "qwen-image": (te_qwen_image.qwen_image_clip(qwen25vl, emb_dirs),
                       lambda p: (qwen_image.encode_prompt(p, max_sequence_length=512, **cpu)[0], None, None)),
        "hidream": (te_hidream.hidream_clip(hidream_files, emb_dirs), hidream_ref),
        "flux2-dev": (te_flux2.flux2_clip(mistral, emb_dirs),
                      lambda p: (flux2.encode_prompt(p, **cpu)[0], None, None)),
        "hunyuan-video-1.5:padded": (te_hunyuan_video15.hv15_clip(*hv15_files, emb_dirs), hv15_ref),
        "lumina2": (te_lumina2.lumina2_clip(gemma2, emb_dirs),
                    lambda p: (lambda r: (r[0], None, r[1]))(lumina2.encode_prompt(p, do_classifier_free_guidance=False,
                                                                                   **cpu))),
    }


def test_every_spec_family_is_covered(comfy, families):
    ids = {k.split(":")[0] for k in families}
    assert ids == set(comfy.engine("te.specs").all_specs())


@pytest.mark.parametrize("spec_id", ["sd15", "sd2x", "sdxl", "sd3:reference", "sd3:diffusers", "sd35:large",
                                     "flux1-dev", "flux1-schnell", "pixart-sigma", "chroma", "auraflow", "z-image",
                                     "wan", "qwen-image", "lumina2", "hidream", "flux2-dev",
                                     "hunyuan-video-1.5:padded"])
def test_syntax_prompts_read_literally(comfy, families, spec_id, record_property):
    """Aligned (default: literal) equals diffusers within 1e-4 on every syntax prompt; the same spec with
    ComfyUI's syntax chosen differs wherever that syntax changes the text (figures in the junit properties)."""
    align, syntax = comfy.engine("te.align"), comfy.engine("te.syntax")
    clip, reference = families[spec_id]
    ac = align.align_clip(clip, spec_id)
    assert ac.prompt_syntax == "literal"  # the default: the spec says literal
    ac_comfy = align.align_clip(clip, spec_id, prompt_syntax="comfyui")
    rows, bad = {}, []
    for name, prompt in SYNTAX_PROMPTS.items():
        if name not in SUBSETS.get(spec_id, SYNTAX_PROMPTS):
            continue
        with torch.no_grad():
            ref, ref_pooled, ref_mask, *other = reference(prompt)
        out = ac.encode_from_tokens(ac.tokenize(prompt), return_dict=True)
        com = ac_comfy.encode_from_tokens(ac_comfy.tokenize(prompt), return_dict=True)
        d = _diff(out["cond"], ref)
        if ref_pooled is not None:
            d = max(d, _diff(out["pooled_output"], ref_pooled))
        if ref_mask is not None:
            d = max(d, 0.0 if torch.equal(out["attention_mask"].long(), ref_mask.long()) else float("inf"))
        for key, value in (other[0] if other else {}).items():  # HiDream: the Llama stack
            d = max(d, _diff(out[key], value))
        dc = _diff(com["cond"], ref)
        rows[name] = {"aligned": d, "comfyui_syntax": dc}
        if d > TOL:
            bad.append(f"{name}: aligned differs from diffusers by {d:.3g}")
        seen = [align.encoder_text(prompt, e) for e in ac.spec.encoders]  # after the spec's cleaning (PixArt: no URLs)
        weights = all(e["comfy_weights"] is not False for e in ac.spec.encoders)  # Z-Image: ComfyUI ignores them
        # textual-inversion names change the text only where ComfyUI's tokenizer keeps the embeddings folder
        # (Wan's UMT5XXlTokenizer does not pass it on)
        folders = any(getattr(ac._sub(e), "embedding_directory", None) for e in ac.spec.encoders)
        changed = [c for t in seen for c in syntax.comfy_changes(t, weights) if not c.startswith("tokenized in")
                   and (folders or not c.startswith("textual-inversion"))]
        if changed and dc <= TOL:  # (splitting into segments alone can leave the tokens as they were)
            bad.append(f"{name}: ComfyUI's syntax changes this prompt but its encoding equals the reference")
    record_property("max_abs_vs_diffusers", rows)
    print(spec_id, rows)
    assert not bad, "\n".join(bad)


def test_embedding_names_are_text_unless_comfyui_syntax_is_chosen(comfy, families):
    """With the embeddings folder the stock loaders configure, ComfyUI's syntax replaces 'embedding:tiny_emb'
    with the file's vectors; the literal reading tokenizes the words."""
    align = comfy.engine("te.align")
    clip, _ = families["sd15"]
    prompt = f"embedding:{EMBEDDING_NAME}, a dog"
    lit = align.align_clip(clip, "sd15").tokenize(prompt)["l"][0]
    com = align.align_clip(clip, "sd15", prompt_syntax="comfyui").tokenize(prompt)["l"][0]
    sub = clip.tokenizer.clip_l
    assert all(isinstance(t, int) for t, _ in lit)
    assert sub.tokenizer.decode([t for t, _ in lit[1:] if t != sub.end_token]).startswith("embedding : tiny _ emb")
    assert sum(isinstance(t, torch.Tensor) for t, _ in com) == 2  # the two vectors of the file
    assert clip.tokenize(prompt)["l"][0][1][0].shape == (768,)  # ComfyUI's default reads it as an embedding too
