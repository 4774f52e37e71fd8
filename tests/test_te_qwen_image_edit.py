"""Qwen-Image-Edit's image-conditioned text encoding: the aligned CLIP (spec ``qwen-image-edit``), built from
ComfyUI's own Qwen-Image text-encoder classes with a seeded tiny Qwen2.5-VL *and* its vision tower, against
diffusers' ``QwenImageEditPipeline.encode_prompt(prompt, image=...)`` on the same weights (fp32), the image resized
as the pipeline's ``__call__`` resizes it; and where ComfyUI's ``TextEncodeQwenImageEdit`` differs.

The reference gives image tokens Qwen2.5-VL's 3-D rotary positions (``te_qwen_image._with_image_token_types``):
with transformers 5.x, diffusers 0.42.1's pipeline as installed numbers them like text (measured below)."""
from __future__ import annotations

import sys

import pytest
import torch

from support.factories import te_qwen_image
from support.te_compare import max_diff as _max

TOL = 1e-4
SIZES = {"landscape": (48, 64), "portrait": (72, 40)}  # source images (h, w); both resized to about 1 MP
PROMPTS = {
    "plain": "make the circle red and the background blue",
    "empty": "",
    "literal-syntax": r"a (word:1.5) in [brackets], \(escaped\) embedding:foo",
    "long": "word, " * 600,  # ~1200 tokens: the edit pipeline never truncates
}
CASES = [("plain", "landscape"), ("plain", "portrait"), ("empty", "landscape"), ("literal-syntax", "portrait"),
         ("long", "landscape")]


@pytest.fixture(scope="module")
def edit(comfy):
    path = te_qwen_image.qwen25vl_edit_tiny_file()
    clip = te_qwen_image.qwen_image_clip(path, vision=True)
    return {"clip": clip, "pipe": te_qwen_image.qwen_image_edit_pipeline(path),
            "aligned": comfy.engine("te.align").align_clip(clip, "qwen-image-edit"), "path": path}


def _image(name: str, seed: int = 0):
    """A seeded 8-bit RGB image: (PIL image, ComfyUI IMAGE [1, H, W, 3] in 0..1 with the same pixels). Smooth
    gradients plus noise, so resizing filters matter."""
    from PIL import Image

    h, w = SIZES[name]
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([yy, xx, (yy + xx) / 2], dim=-1) * 200 + torch.rand(h, w, 3, generator=g) * 55
    u8 = base.round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(u8.numpy()), (u8.float() / 255).unsqueeze(0)


def _edit_module(pipe):
    return sys.modules[type(pipe).__module__]


def _ref(pipe, prompt: str, pil):
    """What QwenImageEditPipeline.__call__ encodes: the image resized to calculate_dimensions(1024 * 1024, ratio)
    by its image processor, then encode_prompt(prompt, image=that)."""
    w, h, _ = _edit_module(pipe).calculate_dimensions(1024 * 1024, pil.width / pil.height)
    resized = pipe.image_processor.resize(pil, h, w)
    with torch.no_grad():
        return pipe.encode_prompt(prompt, image=resized, device="cpu")


def _ours(clip, prompt: str, image):
    with torch.no_grad():
        return clip.encode_from_tokens(clip.tokenize(prompt, images=[image]), return_dict=True)


def test_qwen_image_edit_spec_values_are_the_pipelines(comfy, edit):
    """Template, dropped prefix (exactly the template's tokens before '<|vision_start|>'), placeholder, resize rule
    and the processor's resize bounds are the pipeline's and its processor's own values."""
    pipe = edit["pipe"]
    vision = comfy.engine("te.vision")
    (enc,) = comfy.engine("te.specs").get_spec("qwen-image-edit").encoders
    assert enc["template"] == pipe.prompt_template_encode.replace("{}", "{prompt}")
    assert enc["drop_prefix"] == pipe.prompt_template_encode_start_idx
    assert len(pipe.tokenizer(enc["template"].split("<|vision_start|>")[0]).input_ids) == enc["drop_prefix"]
    assert enc["image_placeholder"] == pipe.processor.image_token
    ip = pipe.processor.image_processor
    proc = enc["image_processor"]
    assert proc["factor"] == ip.patch_size * ip.merge_size
    assert (proc["min_pixels"], proc["max_pixels"]) == (ip.size["shortest_edge"], ip.size["longest_edge"])
    assert proc["resample"] == "bicubic" and int(ip.resample) == 3  # PIL's BICUBIC
    # the processor's smart resize, inside, above and below its pixel bounds
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    for h, w in [(1024, 1024), (1080, 1920), (5000, 4000), (20, 30), (57, 3000), (28, 28)]:
        assert vision.bounded_dims(h, w, proc["factor"], proc["min_pixels"], proc["max_pixels"]) == \
            smart_resize(h, w, factor=proc["factor"], min_pixels=proc["min_pixels"], max_pixels=proc["max_pixels"]), (h, w)
    rule = enc["image_resize"]
    assert pipe.image_processor.config.resample == rule["resample"]
    calc = _edit_module(pipe).calculate_dimensions
    for w, h in [(64, 48), (40, 72), (1920, 1080), (333, 1000), (1024, 1024)]:
        assert vision.area_dims(w, h, rule["target_area"], rule["multiple"]) == calc(1024 * 1024, w / h)[:2]


@pytest.mark.parametrize("prompt_name,size", CASES)
def test_qwen_image_edit_matches_edit_pipeline(comfy, edit, prompt_name, size):
    """Reference: QwenImageEditPipeline.encode_prompt(prompt, image) on the image __call__ resized: the image's
    vision tokens in the edit template, mask in the encoder, hidden_states[-1], the first 64 positions dropped,
    nothing truncated; mask None (every position kept)."""
    pil, image = _image(size)
    prompt = PROMPTS[prompt_name]
    ref, ref_mask = _ref(edit["pipe"], prompt, pil)
    out = _ours(edit["aligned"], prompt, image)
    assert out["cond"].shape == ref.shape
    diff = _max(out["cond"], ref)
    print(f"qwen-image-edit {prompt_name}/{size}: {ref.shape[1]} positions, max abs {diff:.2e}")
    assert diff <= TOL
    mask = out.get("attention_mask")
    assert ref_mask is None and (mask is None or bool(mask.bool().all()))
    if prompt_name == "long":
        assert ref.shape[1] > 1024 + 1000  # ~1200 text tokens after ~1300 image tokens: nothing cut


def test_qwen_image_edit_needs_its_image(comfy, edit):
    """The edit template holds one image: a prompt encoded without it (or with two) is refused with a message
    that says how to give it, never encoded with the bare placeholder token."""
    specs = comfy.engine("te.specs")
    _, image = _image("landscape")
    with pytest.raises(specs.SpecError, match=r"'qwen-image-edit'.*1 input image.*0 were given.*TextEncodeQwenImageEdit"):
        edit["aligned"].tokenize("make it red")
    with pytest.raises(specs.SpecError, match=r"2 were given"):
        edit["aligned"].tokenize("make it red", images=[image, image])


def test_qwen_image_edit_comfy_default_vs_spec(comfy, edit, record_property):
    """ComfyUI's TextEncodeQwenImageEdit (its resize, its tower's window-ordered tokens, its template search)
    against the official encoding, and the token order alone: ComfyUI's default encoder given exactly the
    pipeline's vision input. Same token count and template cut, different values."""
    import comfy_extras.nodes_qwen as nodes_qwen

    vision = comfy.engine("te.vision")
    pipe, default, aligned = edit["pipe"], edit["clip"], edit["aligned"]
    (enc,) = aligned.spec.encoders
    rows = {}
    for size in SIZES:
        pil, image = _image(size)
        prompt = PROMPTS["plain"]
        ref, _ = _ref(pipe, prompt, pil)
        with torch.no_grad():
            node = nodes_qwen.TextEncodeQwenImageEdit.execute(default, prompt, image=image)[0][0][0]
            prepared = vision.vision_image(image, enc)
            order_only = default.encode_from_tokens(default.tokenize(prompt, images=[prepared]), return_dict=True)
            via_node = nodes_qwen.TextEncodeQwenImageEdit.execute(aligned, prompt, image=image)[0][0][0]
        rows[size] = {"ref_len": ref.shape[1], "node_len": node.shape[1],
                      "node_max_abs": _max(node, ref) if node.shape == ref.shape else None,
                      "token_order_only_max_abs": _max(order_only["cond"], ref),
                      "aligned_through_node_max_abs": _max(via_node, ref) if via_node.shape == ref.shape else None}
    record_property("comfy_default_vs_spec", rows)
    print("qwen-image-edit comfy default vs spec", rows)
    for r in rows.values():
        assert r["token_order_only_max_abs"] > 100 * TOL  # the tower's window order alone
        assert r["aligned_through_node_max_abs"] > 100 * TOL  # the node's resize alone (the aligned CLIP orders)
        assert r["node_max_abs"] is None or r["node_max_abs"] > 100 * TOL

    # the template search, on the pipeline's exact vision input: the prompt follows <|vision_end|>, so a leading
    # newline stays its own token and the search finds the same 64 positions (unlike Qwen-Image's template); a
    # prompt that begins with <|im_start|> gets no template, and so no image; ComfyUI's syntax drops backslashes
    _, image = _image("landscape")
    prepared = vision.vision_image(image, enc)
    comfy_syntax = comfy.engine("te.align").align_clip(default, "qwen-image-edit", prompt_syntax="comfyui")
    lens = {}
    for name, prompt in {"leading-newline": "\n make it red", "im_start": "<|im_start|>make it red",
                         "escaped": r"a \(literal\) bracket"}.items():
        with torch.no_grad():
            d = default.encode_from_tokens(default.tokenize(prompt, images=[prepared]), return_dict=True)["cond"]
            c = comfy_syntax.encode_from_tokens(comfy_syntax.tokenize(prompt, images=[image]), return_dict=True)["cond"]
        a = _ours(aligned, prompt, image)["cond"]
        lens[name] = {"default_len": d.shape[1], "aligned_len": a.shape[1],
                      "comfyui_syntax_max_abs": _max(c, a) if c.shape == a.shape else None}
    print("qwen-image-edit template search", lens)
    assert lens["leading-newline"]["default_len"] == lens["leading-newline"]["aligned_len"]
    assert lens["leading-newline"]["comfyui_syntax_max_abs"] <= TOL
    assert lens["im_start"]["default_len"] < 10 < lens["im_start"]["aligned_len"]
    assert lens["escaped"]["comfyui_syntax_max_abs"] is None or lens["escaped"]["comfyui_syntax_max_abs"] > TOL


def test_edit_pipeline_as_installed_numbers_image_tokens_like_text(comfy, edit, record_property):
    """diffusers 0.42.1 with transformers 5.x, as installed: _get_qwen_prompt_embeds passes no mm_token_type_ids,
    so Qwen2.5-VL's image tokens get 1-D text positions instead of their (t, h, w) ones. The spec follows the
    model's 3-D positions (what transformers 4.x computed from input_ids, and what ComfyUI computes); this records
    how far the installed pipeline is from it."""
    as_installed = te_qwen_image.qwen_image_edit_pipeline(edit["path"], mrope=False)
    pil, image = _image("landscape")
    ref, _ = _ref(edit["pipe"], PROMPTS["plain"], pil)
    installed, _ = _ref(as_installed, PROMPTS["plain"], pil)
    diff = _max(installed, ref)
    record_property("installed_pipeline_vs_3d_positions", diff)
    print("qwen-image-edit: diffusers as installed vs 3-D image positions", diff)
    assert diff > 100 * TOL
    assert _max(_ours(edit["aligned"], PROMPTS["plain"], image)["cond"], ref) <= TOL
