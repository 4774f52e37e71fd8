"""The tiny SDXL/SD3/FLUX.1/Z-Image/Chroma/Qwen-Image/Lumina 2/HiDream/FLUX.2 bundles behave like the real families in ComfyUI's stock nodes: the family's
supported_models config and text-encoder classes, stock encode -> KSampler -> VAE decode, trainable
(finite gradients), and deterministic (same seed, same weights)."""
from __future__ import annotations

import pytest
import torch

from support.factories import families

CONFIG = {"sdxl": "SDXL", "sd3": "SD3", "flux1-dev": "Flux", "flux1-schnell": "FluxSchnell", "z-image": "ZImage",
          "chroma": "Chroma", "qwen-image": "QwenImage", "lumina2": "Lumina2", "hidream": "HiDream",
          "flux2-dev": "Flux2"}
TEXT_ENCODER = {"sdxl": "SDXLClipModel", "sd3": "SD3ClipModel", "flux1-dev": "FluxClipModel",
                "flux1-schnell": "FluxClipModel", "z-image": "ZImageTEModel", "chroma": "PixArtT5XXL",
                "qwen-image": "QwenImageTEModel", "lumina2": "LuminaModel", "hidream": "HiDreamTEModel",
                "flux2-dev": "Flux2TEModel"}


def expected_cond_dims(model) -> tuple[int, int | None]:
    """(context width, pooled width) the diffusion model itself is built to take (None: no pooled input)."""
    dm, cfg = model.model.diffusion_model, model.model.model_config.unet_config
    if hasattr(dm, "caption_projection"):  # HiDream: T5 through the last caption projection; pooled CLIP-L + CLIP-G
        return dm.caption_projection[-1].linear.in_features, cfg["text_emb_dim"]
    if hasattr(dm, "cap_embedder"):  # Lumina 2 / Z-Image NextDiT: caption features only
        return dm.cap_embedder[1].in_features, None
    if hasattr(dm, "context_embedder"):  # SD3 MMDiT
        return dm.context_embedder.in_features, cfg["adm_in_channels"]
    if hasattr(dm, "txt_in"):  # FLUX; Chroma has no pooled input (its modulations come from the Approximator)
        vector_in = getattr(dm, "vector_in", None)  # FLUX.2: None (no pooled vector)
        return dm.txt_in.in_features, vector_in.in_layer.in_features if vector_in is not None else None
    return cfg["context_dim"], cfg["adm_in_channels"] - 6 * 256  # SDXL: pooled + 6 size embeddings of 256


@pytest.fixture(scope="module", params=families.NAMES)
def bundle(request, family_bundle):
    return request.param, family_bundle(request.param)


def test_bundle_is_what_loaders_return(comfy, bundle):
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models as sm

    name, (model, clip, vae) = bundle
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert type(model.model.model_config) is getattr(sm, CONFIG[name])
    assert isinstance(clip, comfy.sd.CLIP) and isinstance(vae, comfy.sd.VAE)
    assert TEXT_ENCODER[name] in [c.__name__ for c in type(clip.cond_stage_model).__mro__]
    assert vae.latent_channels == model.model.latent_format.latent_channels
    if name.startswith("flux1"):
        assert model.model.diffusion_model.params.guidance_embed == (name == "flux1-dev")
    # ComfyUI's Qwen2.5-VL builds its vision tower unloaded (text prompts never run it; te_qwen_image explains)
    te = {k: v for k, v in clip.cond_stage_model.state_dict().items() if ".visual." not in k}
    for t in [*model.model.diffusion_model.state_dict().values(), *te.values()]:
        assert torch.isfinite(t).all()


def test_stock_encode_sample_decode(comfy, bundle):
    name, (model, clip, vae) = bundle
    n = comfy.nodes
    (pos,) = n.CLIPTextEncode().encode(clip, "ohwx, a red circle on a blue square")
    (neg,) = n.CLIPTextEncode().encode(clip, "")
    context, pooled = expected_cond_dims(model)
    got_pooled = pos[0][1].get("pooled_output")
    assert pos[0][0].shape[-1] == context
    assert (got_pooled is None) if pooled is None else (got_pooled.shape[-1] == pooled)
    if model.model.latent_format.latent_channels == 4:
        (lat,) = n.EmptyLatentImage().generate(64, 64, 1)
    elif model.model.latent_format.latent_channels == 128:  # FLUX.2: the VAE's 32 channels patchified 2x2
        (lat,) = comfy.call("EmptyFlux2LatentImage", width=64, height=64, batch_size=1)
    else:
        (lat,) = comfy.call("EmptySD3LatentImage", width=64, height=64, batch_size=1)
    (out,) = n.common_ksampler(model, 7, 2, 1.0 if name.startswith("flux") else 3.0, "euler", "simple", pos, neg, lat)
    s = out["samples"]
    frames = (1,) * (model.model.latent_format.latent_dimensions - 2)  # Qwen-Image: one-frame latents of a video VAE
    side = 64 // vae.spacial_compression_encode()  # FLUX.2: 16 (8 x the 2x2 patchify)
    assert s.shape == (1, vae.latent_channels, *frames, side, side) and torch.isfinite(s).all() and s.abs().sum() > 0
    (img,) = n.VAEDecode().decode(vae, out)
    assert img.shape == (1, 64, 64, 3) and torch.isfinite(img).all()


def test_forward_backward_gives_finite_grads(comfy, bundle):
    name, (model, clip, vae) = bundle
    base = model.model
    cond = clip.encode_from_tokens(clip.tokenize("ohwx, a red circle"), return_pooled=True, return_dict=True)
    params = list(base.diffusion_model.parameters())
    frames = (1,) * (base.latent_format.latent_dimensions - 2)
    was = [p.requires_grad for p in params]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
                p.grad = None
            pooled = cond.get("pooled_output")
            extra = {k: v.clone() for k, v in cond.items() if k.startswith("conditioning_")}  # HiDream's Llama stack
            c = base.extra_conds(cross_attn=cond["cond"].clone(),
                                 pooled_output=pooled.clone() if pooled is not None else None, **extra,
                                 width=64, height=64, guidance=3.5, device="cpu",
                                 noise=torch.zeros(1, vae.latent_channels, *frames, 8, 8))
            kwargs = {k: v.cond for k, v in c.items()}
            x = torch.randn(1, vae.latent_channels, *frames, 8, 8, generator=torch.Generator().manual_seed(0))
            sigma = base.model_sampling.percent_to_sigma(0.5) * torch.ones(1)

            def step():
                out = base.apply_model(x, sigma, **kwargs)
                assert out.shape == x.shape
                out.square().mean().backward()

            try:
                step()
            except RuntimeError as e:
                # ComfyUI's FLUX blocks (FLUX.1, Chroma) add into activations in place (``img += ...``); the
                # trainer then keeps copies of saved tensors, as here. Any other model must not need it.
                flux_blocks = hasattr(base.diffusion_model, "double_blocks")
                assert flux_blocks and "modified by an inplace operation" in str(e), e
                for p in params:
                    p.grad = None
                with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
                    step()
            grads = [p.grad for p in params if p.grad is not None]
            assert len(grads) > 0.9 * len(params)
            assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    finally:
        for p, w in zip(params, was):
            p.grad = None
            p.requires_grad_(w)


@pytest.mark.parametrize("name", families.NAMES)
def test_same_seed_same_weights(comfy, family_bundle, name):
    a, b, c = (families.diffusion_state_dict(name, s) for s in (0, 0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    built = family_bundle(name)[0].model.diffusion_model.state_dict()  # seed 0, loaded from the cache
    assert all(torch.equal(built[k], a[k]) for k in a)


def test_comfy_detects_tiny_sd3_as_sd3(comfy):
    """SD3's tiny MMDiT is recognised by ComfyUI's own checkpoint detection (sizes follow from the weights)."""
    import comfy.model_detection
    import comfy.supported_models as sm

    cfg = comfy.model_detection.model_config_from_unet(families.diffusion_state_dict("sd3"), "")
    assert type(cfg) is sm.SD3 and cfg.unet_config["depth"] == families.SD3_MMDIT["depth"]
