"""Previews of image-edit models (FLUX.1 Kontext on the tiny FLUX.1): Sample Preview and Preview Plan take a control
image and render exactly what ComfyUI's own edit graph renders (VAE Encode -> ReferenceLatent on the prompt and the
negative -> KSampler -> VAE Decode), through the real server and in process; several control images are several
reference latents, in batch order."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

P = "AlignedTrainer_"
FLUX = "flux1-dev"
KW = dict(seed=7, seed_mode="fixed", steps=2, cfg=2.0, guidance=3.5, sampler_name="euler", scheduler="normal",
          width=64, height=64)


def _image(seed: int, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((1, size, size, 3), generator=g)


def _stock(comfy, model, clip, vae, prompt: str, controls: list[torch.Tensor]) -> torch.Tensor:
    """ComfyUI's own graph: CLIPTextEncode (prompt, negative "") -> one VAEEncode + ReferenceLatent per control image,
    chained, on both -> FluxGuidance -> EmptyLatentImage -> KSampler -> VAEDecode."""
    import node_helpers
    from comfy_extras.nodes_edit_model import ReferenceLatent

    nodes = comfy.nodes
    conds = [nodes.CLIPTextEncode().encode(clip, text)[0] for text in (prompt, "")]
    for img in controls:
        (latent,) = nodes.VAEEncode().encode(vae, img)
        conds = [ReferenceLatent.execute(c, latent).result[0] for c in conds]
    pos, neg = (node_helpers.conditioning_set_values(c, {"guidance": KW["guidance"]}) for c in conds)
    (lat,) = nodes.EmptyLatentImage().generate(64, 64, 1)
    (out,) = nodes.common_ksampler(model, KW["seed"], KW["steps"], KW["cfg"], "euler", "normal", pos, neg, lat)
    return nodes.VAEDecode().decode(vae, out)[0]


def test_sample_preview_and_plan_with_control_images_equal_comfyuis_edit_graph(comfy, family_bundle):
    model, clip, vae = family_bundle(FLUX)
    plans, render = comfy.engine("sampling.plans"), comfy.engine("sampling.render")
    a, b = _image(1), _image(2)
    prompts = ["make it blue", "ohwx"]

    def preview(control):
        return comfy.call(P + "SamplePreview", model=model, clip=clip, vae=vae, prompts="\n".join(prompts),
                          negative="", step=0, control_image=control, **KW)[1]

    plain, one, two = preview(None), preview(a), preview(torch.cat([a, b]))
    for j, prompt in enumerate(prompts):
        for cells, controls in ((one, [a]), (two, [a, b])):
            ref = _stock(comfy, model, clip, vae, prompt, controls)
            assert torch.allclose(cells[j:j + 1], ref, atol=1e-5), (prompt, len(controls), (cells[j:j + 1] - ref).abs().max())
    # the control reaches the model, and a second control image is a second reference, not a replacement
    assert (one - plain).abs().max() > 1e-3 and (two - one).abs().max() > 1e-3
    assert not torch.allclose(preview(b), one, atol=1e-3)

    # Preview Plan encodes the control once, with the prompts, and renders what Sample Preview renders
    plan = comfy.call(P + "PreviewPlan", clip=clip, vae=vae, prompts="\n".join(prompts), negative="", every_n=1,
                      control_image=torch.cat([a, b]), **KW)[0]
    refs = plan.positives[0][0][1]["reference_latents"]
    assert len(refs) == 2 and plan.negative[0][1]["reference_latents"] is not None
    assert torch.equal(refs[1], vae.encode(b))
    g_plan = plan.render(model, 3)
    g_node = plans.preview_grid(model, clip, vae, prompts, "", render.SampleSettings(
        steps=2, cfg=2.0, width=64, height=64, seed=7), step=3, control=torch.cat([a, b]))[0]
    assert torch.equal(g_plan, g_node)


def test_a_control_image_that_is_not_an_image_batch_is_refused(comfy, family_bundle):
    _, _, vae = family_bundle(FLUX)
    render = comfy.engine("sampling.render")
    assert render.reference_latents(vae, None) == ()
    for bad in (torch.zeros(64, 64, 3), torch.zeros(0, 64, 64, 3), torch.zeros(1, 64, 64, 1)):
        try:
            render.reference_latents(vae, bad)
        except ValueError as e:
            assert "control_image" in str(e) and str(tuple(bad.shape)) in str(e)
        else:
            raise AssertionError(f"shape {tuple(bad.shape)} accepted")


def test_edit_preview_through_the_server_equals_the_stock_edit_graph(family_server):
    """Queued on the real server: Load Image -> Sample Preview's control_image, and beside it ComfyUI's own Kontext
    graph (VAE Encode -> ReferenceLatent -> FluxGuidance -> KSampler -> VAE Decode) on the same image; the saved PNGs
    agree to 8-bit rounding, and differ from the preview without the control."""
    srv = family_server
    Image.fromarray((_image(3)[0].numpy() * 255).round().astype(np.uint8)).save(srv.input_dir / "edit_control.png")
    loaders = {"1": {"class_type": "AlignedTrainerTests_TinyDiffusionModelLoader", "inputs": {"family": FLUX}},
               "2": {"class_type": "AlignedTrainerTests_TinyTextEncoderLoader", "inputs": {"family": FLUX}},
               "3": {"class_type": "VAELoader", "inputs": {"vae_name": "tiny-flux1-ae.safetensors"}},
               "4": {"class_type": "LoadImage", "inputs": {"image": "edit_control.png"}}}
    preview = dict(model=["1", 0], clip=["2", 0], vae=["3", 0], prompts="make it blue", negative="", step=0, **KW)
    prompt = {
        **loaders,
        "5": {"class_type": P + "SamplePreview", "inputs": dict(preview, control_image=["4", 0])},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 1], "filename_prefix": "edit_preview"}},
        "7": {"class_type": P + "SamplePreview", "inputs": preview},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 1], "filename_prefix": "edit_plain"}},
        "10": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "make it blue"}},
        "11": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": ""}},
        "12": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["3", 0]}},
        "13": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["10", 0], "latent": ["12", 0]}},
        "14": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["11", 0], "latent": ["12", 0]}},
        "15": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["13", 0], "guidance": 3.5}},
        "16": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["14", 0], "guidance": 3.5}},
        "17": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "18": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 7, "steps": 2, "cfg": 2.0,
                                                    "sampler_name": "euler", "scheduler": "normal", "positive": ["15", 0],
                                                    "negative": ["16", 0], "latent_image": ["17", 0], "denoise": 1.0}},
        "19": {"class_type": "VAEDecode", "inputs": {"samples": ["18", 0], "vae": ["3", 0]}},
        "20": {"class_type": "SaveImage", "inputs": {"images": ["19", 0], "filename_prefix": "edit_stock"}},
    }
    out = srv.run(prompt, timeout=300)["outputs"]

    def saved(node: str) -> np.ndarray:
        (img,) = out[node]["images"]
        return np.asarray(Image.open(srv.output_dir / img["subfolder"] / img["filename"]).convert("RGB"), dtype=np.int16)

    edit, plain, stock = saved("6"), saved("8"), saved("20")
    assert np.abs(edit - stock).max() <= 1, np.abs(edit - stock).max()
    assert np.abs(edit - plain).max() > 3, np.abs(edit - plain).max()


QKW = dict(KW, cfg=2.0, guidance=1.0)


@torch.no_grad()
def _stock_qwen_edit(comfy, model, clip, vae, prompt: str, control: torch.Tensor) -> torch.Tensor:
    """ComfyUI's own Qwen-Image-Edit graph around the aligned CLIP, each step a stock call (what
    TextEncodeQwenImageEdit does after its 1-megapixel resize, which a preview leaves to the workflow's
    ImageScaleToTotalPixels): clip.tokenize(text, images=[control]) -> encode_from_tokens_scheduled, for the prompt
    and the negative "" -> VAEEncode + ReferenceLatent on both -> EmptySD3LatentImage -> KSampler -> VAEDecode."""
    from comfy_extras.nodes_edit_model import ReferenceLatent
    from comfy_extras.nodes_sd3 import EmptySD3LatentImage

    nodes = comfy.nodes
    conds = [clip.encode_from_tokens_scheduled(clip.tokenize(text, images=[control])) for text in (prompt, "")]
    (latent,) = nodes.VAEEncode().encode(vae, control)
    pos, neg = (ReferenceLatent.execute(c, latent).result[0] for c in conds)
    lat = EmptySD3LatentImage.execute(64, 64, 1).result[0]
    (out,) = nodes.common_ksampler(model, QKW["seed"], QKW["steps"], QKW["cfg"], "euler", "normal", pos, neg, lat)
    return nodes.VAEDecode().decode(vae, out)[0]


def test_qwen_image_edit_preview_encodes_the_prompts_with_the_control_image(comfy, family_bundle):
    """With the aligned ``qwen-image-edit`` CLIP (the tiny Qwen2.5-VL with its vision tower) Sample Preview and
    Preview Plan encode each prompt and the negative with the control image in the text (as training encodes a
    caption with its control) and attach its reference latent: a cell equals ComfyUI's own graph on the same CLIP
    within 1e-5, and differs from the same preview with the text encoded without the image (the text-to-image
    ``qwen-image`` spec on the same weights). Without a control image the edit spec is refused."""
    import pytest
    from support.factories import te_qwen_image

    model, _, vae = family_bundle("qwen-image")
    align = comfy.engine("te.align").align_clip
    base = te_qwen_image.qwen_image_clip(te_qwen_image.qwen25vl_edit_tiny_file(41), vision=True)
    edit, text_only = align(base, "qwen-image-edit"), align(base, "qwen-image")
    control = _image(4)
    prompt = "make it blue"

    def preview(clip, control_image):
        return comfy.call(P + "SamplePreview", model=model, clip=clip, vae=vae, prompts=prompt, negative="", step=0,
                          control_image=control_image, **QKW)[1]

    cell = preview(edit, control)
    ref = _stock_qwen_edit(comfy, model, edit, vae, prompt, control)
    assert torch.allclose(cell, ref, atol=1e-5), (cell - ref).abs().max()
    plain = preview(text_only, control)  # reference latent alone, text without the image
    print("qwen-image-edit preview: |edit - stock| max", float((cell - ref).abs().max()),
          "|edit - text-only| max", float((cell - plain).abs().max()))
    assert (cell - plain).abs().max() > 1e-3

    # Preview Plan encodes the prompt and the negative with the image (vision tokens in both) and renders the same
    plan = comfy.call(P + "PreviewPlan", clip=edit, vae=vae, prompts=prompt, negative="", every_n=1,
                      control_image=control, **QKW)[0]
    want = edit.encode_from_tokens_scheduled(edit.tokenize("", images=[control]))
    assert torch.equal(plan.negative[0][0], want[0][0]) and plan.negative[0][0].shape[1] > 1000
    g_node = comfy.engine("sampling.plans").preview_grid(model, edit, vae, [prompt], "", plan.settings, step=0,
                                                         control=control)[0]
    assert torch.equal(plan.render(model, 0), g_node)

    # the edit spec never encodes a preview prompt without its image, and Qwen-Image-Edit's template has one image
    with pytest.raises(Exception, match=r"'qwen-image-edit'.*control_image"):
        preview(edit, None)
    with pytest.raises(Exception, match=r"'qwen-image-edit'.*1 input image.*2 were given"):
        preview(edit, torch.cat([control, _image(5)]))
