"""Text-encoder swap (issue #22) on the tiny SD1.5 with a tiny T5 (the Chroma bundle's, 128 wide) as the new encoder:
the measured CLIP-L spread matches diffusers' SD1.5 encode_prompt on the same weights; the projection's output spread
matches the measurement within 5 %; each reset mode re-initialises exactly the layers it names (by name and by the
weights ComfyUI computes) with PyTorch's default Linear init; training the swapped model (full cross-attention
weights + projection) lowers the validation loss; Train Steps' previews sample the projected prompts as the stock
graph does; resume is bit-exact; the saved UNet file (stock LoRA loader, or the whole UNet through the stock
UNETLoader) plus the saved projection (Apply Text Encoder Swap) give the trained model's outputs; on tiny SDXL the
training hook and the Apply node give the adm the same zero pooled vector, and a swapped SDXL run lowers the validation
loss."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

P = "AlignedTrainer_"
CAPTIONS = ["a photo of a woman, solo", "ohwx, green triangle"]
LN = "clip_l.transformer.text_model.final_layer_norm.weight"


@pytest.fixture(scope="module")
def clips(comfy, sd15):
    """(aligned old CLIP-L of the tiny SD1.5, aligned tiny T5 of the Chroma bundle)."""
    from support.factories import families

    align = comfy.engine("te.align")
    return align.align_clip(sd15[1], "sd15"), align.align_clip(families.build_clip("chroma"), "chroma")


@pytest.fixture(scope="module")
def t5_set(comfy, sd15, clips, tmp_path_factory):
    """2 captioned 64 px images: SD1.5 latents, captions encoded by the new (T5) encoder."""
    from support.factories.dataset import make_dataset

    base = tmp_path_factory.mktemp("swapset")
    folder = make_dataset(base / "data", n=2, sizes=((64, 64),))
    D, caps, bk, cache = (comfy.engine(m) for m in ("data.dataset", "data.captions", "data.buckets", "data.cache"))
    ds = D.from_folder(folder.parent, caps.CaptionConfig(trigger_word="ohwx"),
                       bk.BucketConfig(resolution=64, min_side=64, max_side=64, step=64))
    lc = cache.cache_latents(ds, sd15[2], base / "cache")
    ts, _ = cache.cache_text(lc, clips[1], base / "cache", unload=False)
    return ds, ts


# the tiny CLIP's final layer norm has unit weights, which makes every token's std 1: a seeded patch on that weight
# (ComfyUI's own patching; the same change on the diffusers side) gives tokens different spreads
DELTA = torch.randn(768, generator=torch.Generator().manual_seed(4)) * 0.3 - 0.75


@pytest.fixture(scope="module")
def old_clip(clips):
    """The aligned CLIP-L with DELTA added to its final layer norm's weight."""
    old = clips[0].clone()
    old.add_patches({LN: ("diff", (DELTA,))}, 1.0, 1.0)
    return old


EXTRA = "ohwx, a caption past the cap"  # with MAX_CAPTIONS = 2 in the fixture: 3 distinct captions, 2 measured


def _setup_captions(t5_set) -> list[str]:
    return [c for item in t5_set[0].items for c in item.captions] + [EXTRA]


@pytest.fixture(scope="module")
def swapped(S, M, sd15, clips, old_clip, t5_set):
    """(MODEL with the cross-attention reset and the swap, Swap) from the dataset's captions and EXTRA, of which
    MAX_CAPTIONS = 2 are measured, on the patched CLIP-L (the only full-size CLIP-L encodes of this file; the
    diffusers comparison reads their figure)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(M, "MAX_CAPTIONS", 2)
        return S.setup(sd15[0], clips[1], old_clip, _setup_captions(t5_set), reset="cross_attention", kind="linear",
                       seed=3)


def _diffusers_sd15(checkpoint):
    """diffusers' StableDiffusionPipeline around the tiny SD1.5 checkpoint's own CLIP-L weights (read from the file,
    fp32; a tiny UNet/VAE: only encode_prompt is used)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors import safe_open
    from support.factories import text_encoders as te
    from support.factories.loaded import no_random_init
    from support.factories.sd15 import CLIP_L
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with no_random_init():
        model = CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval()
    own = model.state_dict()
    prefix = "cond_stage_model.transformer."
    with safe_open(str(checkpoint), framework="pt") as f:
        sd = {k[len(prefix):]: f.get_tensor(k).float() for k in f.keys() if k.startswith(prefix)}
    missing, _ = model.load_state_dict({k if k in own else k.removeprefix("text_model."): v for k, v in sd.items()},
                                       strict=False)
    assert not [m for m in missing if "position_ids" not in m], missing
    tok = CLIPTokenizer.from_pretrained(str(te.comfy_tokenizer_dir("sd1")), model_max_length=77)
    unet = UNet2DConditionModel(block_out_channels=(32,), layers_per_block=1, cross_attention_dim=768,
                                down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                                norm_num_groups=8, attention_head_dim=8, sample_size=8)
    return StableDiffusionPipeline(vae=te._tiny_vae(), text_encoder=model, tokenizer=tok, unet=unet,
                                   scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def test_measured_std_matches_diffusers_and_projection_matches_within_5pct(S, M, clips, swapped, t5_set,
                                                                            sd15_checkpoint):
    """CLIP-L's spread as SD1.5 saw it: diffusers' StableDiffusionPipeline.encode_prompt (77 padded positions, no
    mask) on the checkpoint's CLIP-L weights gives the per-token std that the swap setup measured (``token_std``
    on the aligned ComfyUI CLIP of the same checkpoint, all 77 positions counted) on the dataset's captions. The
    fitted projection's output on the captions (also through ``Projection.project``, the Apply node's path, on
    captions it was not fitted on) is within 5 % of the old encoder's spread."""
    _, swap = swapped
    texts = M.measured_captions(_setup_captions(t5_set), 2)
    assert swap.captions == len(texts) == 2 and swap.tokens_old == 77 * 2
    got = swap.std_old
    pipe = _diffusers_sd15(sd15_checkpoint.resolve())
    with torch.no_grad():
        pipe.text_encoder.get_submodule("final_layer_norm").weight.add_(DELTA)  # transformers 5: no text_model
    with torch.no_grad():
        ref = pipe.encode_prompt(texts, "cpu", 1, False)[0].float()
    assert ref.shape[1] == 77
    want = float(ref.std(dim=-1, unbiased=False).mean())
    print(f"te_swap: CLIP-L token std ours {got:.6f}, diffusers {want:.6f}")
    assert got == pytest.approx(want, rel=1e-4)
    first8 = float(ref[:, :8].std(dim=-1, unbiased=False).mean())  # counting other tokens would show
    assert abs(first8 - want) > 20 * abs(got - want)

    assert swap.std_old > 0 and swap.std_new > 0
    assert abs(swap.scale - 1) > 0.1  # the unscaled projection would miss the target: the scale matters
    assert swap.std_projected == pytest.approx(swap.std_old, rel=0.05)
    held_out = M.encode(clips[1], CAPTIONS)
    proj = swap.module()
    out, _ = M.token_std([proj.project(c) for c in held_out])
    assert out == pytest.approx(swap.std_old, rel=0.05)
    assert swap.out_dim == 768 and swap.in_dim == held_out[0][0][0].shape[-1] == 128


def test_setup_measures_at_most_max_captions(S, M, swapped, t5_set):
    """A dataset with more distinct captions than MAX_CAPTIONS is measured on MAX_CAPTIONS of them, evenly spaced
    over the sorted captions (first and last kept), each encoded once by each encoder (a large dataset's every
    caption would cost minutes): the swap fixture's setup, with MAX_CAPTIONS = 2, measured 2 of its 3 captions."""
    texts = [f"ohwx, a photo number {i}" for i in range(9)]
    assert M.MAX_CAPTIONS == 64
    assert M.measured_captions(texts + texts[:3], 64) == sorted(texts)
    assert M.measured_captions(texts, 3) == sorted(texts)[0::4]
    assert M.measured_captions(texts, 1) == sorted(texts)[:1]
    assert len(set(_setup_captions(t5_set))) == 3
    swap = swapped[1]
    assert swap.captions == 2 and swap.tokens_old == 2 * 77  # 3 captions would be 231 tokens


def _effective(model):
    """The weights ComfyUI computes for the patched keys of ``model`` (base + its patches), without loading it;
    every other key is the base weight (ComfyUI only rewrites keys that have patches)."""
    import comfy.lora

    kp = model.get_key_patches("diffusion_model.")
    return {k: comfy.lora.calculate_weight(v[1:], v[0][0].detach().float().clone(), k)
            for k, v in kp.items() if len(v) > 1}


@pytest.mark.parametrize("mode, where, parts", [
    ("none", (), ()),
    ("cross_attention", ("attn2",), ("to_q", "to_k", "to_v", "to_out.0")),
    ("qk", ("attn2",), ("to_q", "to_k")),
    ("all_attention", ("attn1", "attn2"), ("to_q", "to_k", "to_v", "to_out.0")),
])
def test_reset_mode_changes_exactly_its_layers(S, R, sd15, mode, where, parts):
    """Each reset mode names exactly the attention layers it should (by the UNet's CrossAttention modules), and
    the weights ComfyUI computes for the swapped MODEL differ from the base in exactly those layers' weights
    (and to_out.0's bias), nothing else; the new values follow PyTorch's nn.Linear default init (uniform within
    1/sqrt(fan_in), std bound/sqrt(3)); the base model's own weights are unchanged."""
    model = sd15[0]
    dm = model.model.diffusion_model
    names = R.reset_layers(dm, mode)
    crossattn = [n for n, m in dm.named_modules() if type(m).__name__ == "CrossAttention"]
    want = sorted(f"{a}.{p}" for a in crossattn if a.rpartition(".")[2] in where for p in parts)
    assert names == want
    assert mode == "none" or len(names) >= 4
    diffs = R.reset_diffs(model, names, seed=7)
    swap = S.Swap("linear", 128, 768, {}, mode, tuple(names), diffs)
    base = model.model.state_dict()
    before = {k: base[k].detach().float().clone() for k in diffs}
    after = _effective(S.with_swap(model, swap))
    assert set(after) == set(before)  # ComfyUI patches exactly these keys; every other weight stays the base's
    changed = sorted(k for k in after if not torch.equal(before[k], after[k]))
    expect = sorted([f"diffusion_model.{n}.weight" for n in names] +
                    [f"diffusion_model.{n}.bias" for n in names if n.endswith("to_out.0")])
    assert changed == expect
    for n in names:
        w = after[f"diffusion_model.{n}.weight"]
        bound = 1 / math.sqrt(w.shape[1])
        assert float(w.abs().max()) <= bound * 1.001
        assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert all(torch.equal(before[k], base[k].detach().float()) for k in before)  # the shared base was not written
    if names:  # seeded: the same seed draws the same layers, another seed others
        again = R.reset_diffs(model, names, seed=7)
        other = R.reset_diffs(model, names, seed=8)
        k = f"diffusion_model.{names[0]}.weight"
        assert torch.equal(again[k], diffs[k]) and not torch.equal(other[k], diffs[k])



def _hook_and_apply_kwargs(T, S, model, swap, t5, applied) -> tuple[dict, dict]:
    """The model's keyword arguments for the new encoder's conditioning ``t5`` as the training hook projects it, and
    for ``applied`` (Apply Text Encoder Swap's output) as inference passes it (Trainer.model_conds on one 8x8 latent)."""
    from types import SimpleNamespace

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    adapter = S.ProjectionAdapter(swap.module().float())

    def kwargs(context, cond):
        fake = SimpleNamespace(patcher=model, run=SimpleNamespace(settings=SimpleNamespace(guidance=3.5)),
                               context=context)
        return T.loop.concat_conds(T.loop.Trainer.model_conds(fake, [cond], x))

    with torch.no_grad():
        return kwargs(adapter.context, t5), kwargs(T.loop.Trainer.context, applied)

STEPS = 3  # the direction test's run; bench/te_swap_val_figure.py gives the 50-step figure


def _init(T, model, tset, root, name, resume="none", ema=0.0):
    return T.loop.init_run(model, tset, T.C.LoraConfig(algorithm="full", rank=1, alpha=1, preset="cross-attention"),
                           T.C.TimestepConfig(weighting="min_snr"),
                           T.C.OptimizerConfig(lr=1e-3, weight_decay=0.0),
                           T.st.RunSettings(run_name=name, seed=5, val_timesteps=2, ema_decay=ema),
                           resume=resume, runs_root=root)


def test_memory_plan_counts_full_weights_with_their_optimizer_state(comfy, T, swapped, t5_set, tmp_path):
    """A full-weights run is planned for its whole weights: every cross-attention weight (the trained differences;
    biases keep their reset) and the projection's layers, each in fp32 with its gradient and adamw's two moments."""
    memory = comfy.engine("train.memory")
    run = _init(T, swapped[0], t5_set[1], tmp_path / "runs", "mem")
    dm = swapped[0].model.diffusion_model
    attn2 = sum(m.weight.numel() for n, m in dm.named_modules() if ".attn2." in n and isinstance(m, torch.nn.Linear))
    proj = sum(v.numel() for k, v in swapped[1].projection.items() if k.startswith("net."))  # (scale: a buffer)
    with torch.inference_mode(False), torch.enable_grad():
        tr = T.loop.Trainer(run)
        try:
            assert sum(p.numel() for p in tr.params) == attn2 + proj
            assert memory.adapter_bytes(tr) == (attn2 + proj) * 4 * (1 + 2)
        finally:
            tr.release()


PREVIEW = dict(seed=7, seed_mode="fixed", steps=1, cfg=2.0, guidance=3.5, sampler_name="euler", scheduler="normal",
               width=64, height=64)
PREVIEW_PROMPT = "ohwx a red circle"


class SpyPlan:
    """A real Preview Plan (its conditionings, projected by Train Steps through ``with_conditioning``) whose render
    keeps the image a preview sampled (``render.sample``, what the plan's grid cell holds before 8-bit) in ``shown``
    and returns it as the shown image."""

    def __init__(self, plan, sample, shown: dict):
        self.p, self.sample, self.shown = plan, sample, shown
        self.every_n, self.fps, self.positives, self.negative = plan.every_n, plan.fps, plan.positives, plan.negative

    def with_conditioning(self, fn):
        return SpyPlan(self.p.with_conditioning(fn), self.sample, self.shown)

    def check(self, m):
        self.p.check(m)

    def render(self, m, step):
        p = self.p
        self.shown[step] = self.sample(m, p.vae, p.positives[0], p.negative, p.settings, p.settings.seed_for(step))
        return self.shown[step]


@pytest.fixture(scope="module")
def trained(comfy, T, sd15, clips, swapped, t5_set, tmp_path_factory):
    """(runs folder, run at 0 steps, run after STEPS steps with a checkpoint one step before the end, Train Steps'
    MODEL, {step: preview image}): Train Steps (the node, as ComfyUI runs it) with a Preview Plan of the new
    encoder rendering at the last step."""
    root = tmp_path_factory.mktemp("swap_runs")
    run0 = _init(T, swapped[0], t5_set[1], root, "swap")
    (plan,) = comfy.call(P + "PreviewPlan", clip=clips[1], vae=sd15[2], prompts=PREVIEW_PROMPT, negative="",
                         every_n=STEPS, **PREVIEW)
    shown = {}
    with torch.inference_mode():
        run, model, _ = comfy.call(P + "TrainSteps", run=run0, steps=STEPS, checkpoint_every=STEPS - 1, keep_last=5,
                                   val_every=0, preview_plan=SpyPlan(plan, comfy.engine("sampling.render").sample,
                                                                     shown))
    return root, run0, run, model, shown


def test_training_lowers_validation_loss_and_trains_projection(S, T, swapped, trained):
    """Full cross-attention weights + projection, through the ordinary Train Init / Train Steps with min-SNR: the
    validation loss (fixed noise and timesteps) falls within STEPS steps, the projection changed and is in the
    run's state and checkpoints; only the named layers have trained differences."""
    _, run0, run, _, _ = trained
    before, after = T.loop.validation_loss(run0), T.loop.validation_loss(run)
    print(f"te_swap: validation loss {before:.5f} -> {after:.5f} in {STEPS} steps")
    assert after < before
    proj = S.trained_projection(run, ema=False)
    init = swapped[1].projection
    assert set(proj) == set(init) and not torch.equal(proj["net.0.weight"], init["net.0.weight"])
    assert torch.equal(proj["scale"], init["scale"])  # fixed: the layers learn, the measured scale stays
    diffs = S.without_projection(run.state["adapters"])
    assert {k.rpartition(".")[0] for k in diffs} == {n for n in swapped[1].reset_layers}
    assert all(float(v.abs().max()) > 0 for v in diffs.values())  # every full weight trained (W + D reaches the model)


def _stock_swap_render(comfy, model, clip, vae, swap, prompt: str, seed: int):
    """The stock inference graph of a swap: CLIPTextEncode (new encoder) -> Apply Text Encoder Swap (prompt and
    negative) -> EmptyLatentImage -> KSampler -> VAEDecode."""
    n = comfy.nodes
    (pos,) = n.CLIPTextEncode().encode(clip, prompt)
    (neg,) = n.CLIPTextEncode().encode(clip, "")
    (ppos,) = comfy.call(P + "ApplyTextEncoderSwap", conditioning=pos, swap=swap)
    (pneg,) = comfy.call(P + "ApplyTextEncoderSwap", conditioning=neg, swap=swap)
    (lat,) = n.EmptyLatentImage().generate(64, 64, 1)
    (out,) = n.common_ksampler(model, seed, PREVIEW["steps"], PREVIEW["cfg"], "euler", "normal", ppos, pneg, lat)
    return n.VAEDecode().decode(vae, out)[0]


def test_previews_of_a_swap_run_sample_the_projected_prompts(comfy, S, T, sd15, clips, swapped, trained):
    """Train Steps (the node) with a Preview Plan of the new encoder on a swap run: the last step's preview image
    equals the stock KSampler + VAEDecode on the Apply node's conditioning (the run's projection at that step) with
    Train Steps' MODEL and the same seed (atol 1e-5); a plan of the old encoder's width (768) is refused with the
    fix before any step."""
    _, run0, run, model, shown = trained
    assert list(shown) == [STEPS]
    import time

    t0 = time.perf_counter()
    with torch.inference_mode():  # as ComfyUI runs nodes
        want = _stock_swap_render(comfy, model, clips[1], sd15[2], S.trained_swap(run, ema=False), PREVIEW_PROMPT, 7)
    got = shown[STEPS]
    print(f"te_swap preview: max |preview - stock| {float((got - want).abs().max()):.2e} "
          f"(stock render {time.perf_counter() - t0:.1f}s)")
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    # the trained projection and weights matter: the server test shows the step-2 preview differing from step 1's

    (plan,) = comfy.call(P + "PreviewPlan", clip=clips[1], vae=sd15[2], prompts="x", negative="", every_n=1,
                         **PREVIEW)
    old_plan = plan.with_conditioning(lambda c: [[torch.zeros(1, 77, 768), dict(c[0][1])]])  # CLIP-L's width
    with pytest.raises(S.SwapError, match="encoded 768 wide.*connect the new text encoder"):
        comfy.call(P + "TrainSteps", run=run0, steps=1, checkpoint_every=0, keep_last=1, val_every=0,
                   preview_plan=old_plan)


def test_resume_is_bit_exact(T, S, swapped, t5_set, trained):
    """Resuming the checkpoint one step before the end and training that step gives bit-identical layer differences, projection
    and optimizer state."""
    root, _, run, _, _ = trained
    half = sorted((root / "swap" / "checkpoints").glob("step_*.safetensors"))[0]
    resumed = _init(T, swapped[0], t5_set[1], root, "swap", resume=str(half.relative_to(root)))
    assert resumed.step == STEPS - 1
    done = T.loop.train_steps(resumed, 1)
    a, b = run.state["adapters"], done.state["adapters"]
    assert set(a) == set(b) and any(k.startswith(S.ADAPTER) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_preservation_base_prediction_reads_the_projection_as_trained(T, S, swapped, t5_set, tmp_path):
    """Differential output preservation on a swap run (docs/te_swap.md): the "base" prediction turns the trainer's
    adapters off, but the projection adapter ignores ``enabled``, so the base is the UNet without its trained
    differences (the reset stays: it is a patch of the swapped MODEL) reading the preservation prompt through the
    projection as it is at that step (the UNet cannot read T5 without a projection). Pinned on a run whose UNet
    differences and projection both moved: the preservation term equals mean((prediction - base)^2) with that base
    (rel 1e-5), and not the one with the step-0 projection in the base; the projection's ``enabled`` is back on after."""
    from test_pin_loop import live  # a Trainer as train_steps builds it

    out, swap = swapped
    pres = t5_set[1].samples[0].captions[0].conditioning  # a T5 prompt (the preservation prompt of a swap run)
    run = T.loop.init_run(out, t5_set[1], T.C.LoraConfig(algorithm="full", rank=1, alpha=1, preset="cross-attention"),
                          T.C.TimestepConfig(), T.C.OptimizerConfig(lr=1e-3),
                          T.st.RunSettings(run_name="swap_dop", seed=5, dop_weight=1.0), runs_root=tmp_path / "runs",
                          preservation=pres)
    g = torch.Generator().manual_seed(11)
    x0, noise = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(2))
    with live(T, run) as tr:
        proj = tr.adapters[S.ADAPTER]
        layers = [a for k, a in tr.adapters.items() if k != S.ADAPTER]
        with torch.no_grad():  # a run that has learned something: UNet differences and a projection off their init
            for prm in (q for a in layers for q in a.parameters()):  # (zero at the start)
                prm.add_(0.01 * torch.randn(prm.shape, generator=g))
            for prm in proj.inner.net.parameters():
                prm.add_(0.1 * prm.detach().abs().mean() * torch.randn(prm.shape, generator=g))
        sigma = tr.ms.sigmas[600].reshape(1).to(x0)
        term = float(tr.preservation_loss(x0, noise, sigma))
        assert proj.enabled and all(a.enabled for a in layers)
        with torch.no_grad():
            pred, _ = tr.predict(x0, noise, sigma, [pres])
            for a in layers:
                a.enabled = False
            base_now, _ = tr.predict(x0, noise, sigma, [pres])  # the projection as trained so far
            tr.context = S.ProjectionAdapter(swap.module().float()).context  # the step-0 projection
            base_init, _ = tr.predict(x0, noise, sigma, [pres])
    now, init = float(((pred - base_now) ** 2).mean()), float(((pred - base_init) ** 2).mean())
    print(f"te_swap preservation term {term:.6g}: base through the trained projection {now:.6g}, through the step-0 "
          f"projection {init:.6g}")
    assert now > 0 and abs(init - now) > 0.05 * now  # the two choices differ on this run
    assert term == pytest.approx(now, rel=1e-5)


def test_saved_unet_and_projection_reload_to_the_trained_outputs(comfy, T, S, sd15, clips, trained, tmp_path):
    """Save Text Encoder Swap (the node) writes the UNet's changed weights and the projection; the stock
    LoraLoaderModelOnly applies the UNet file to the ORIGINAL checkpoint's MODEL, Load + Apply Text Encoder Swap
    project a prompt of the new encoder, and the prediction equals the trained run's own (its trainer's forward,
    projection inside) for the same latent, sigma and prompt. The base model stays unchanged."""
    import comfy.model_management as mm
    import folder_paths

    _, _, run, _, _ = trained
    unet_file, proj_file, _ = comfy.call(P + "SaveTextEncoderSwap", run=run, name="swap_test", dtype="fp32",
                                         use_ema=True, if_exists="overwrite")
    assert unet_file.endswith("swap_test.safetensors") and proj_file.endswith("swap_test.safetensors")
    assert "te_projections" in proj_file and unet_file.startswith(folder_paths.get_folder_paths("loras")[0])
    (loaded,) = comfy.call(P + "LoadTextEncoderSwap", projection_name="swap_test.safetensors")
    (lora_model,) = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(sd15[0], "swap_test.safetensors", 1.0)
    prompt = clips[1].encode_from_tokens_scheduled(clips[1].tokenize("ohwx a red circle"))
    (projected,) = comfy.call(P + "ApplyTextEncoderSwap", conditioning=prompt, swap=loaded)
    assert projected[0][0].shape[-1] == 768
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    sigma = torch.tensor([2.0])
    with torch.inference_mode(False):
        tr = T.loop.Trainer(run)
        tr.load()
        try:
            for a in tr.adapters.values():
                a.eval()
            with torch.no_grad():
                want = tr.denoised_at(x.to(tr.device), sigma.to(tr.device), [prompt]).cpu()
        finally:
            tr.release()
    mm.load_models_gpu([lora_model])
    with torch.no_grad():
        got = lora_model.model.apply_model(x, sigma, c_crossattn=projected[0][0]).float()
        base = sd15[0].clone()
        mm.load_models_gpu([base])
        plain = base.model.apply_model(x, sigma, c_crossattn=projected[0][0]).float()
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), float((got - want).abs().max())
    assert not torch.allclose(plain, want, atol=1e-3)  # the saved UNet file matters
    # Train Steps' MODEL output applies the run's differences through the stock loader too (kohya keys '.diff')
    import comfy.lora

    kd = T.export.kohya_state_dict(run, dtype=torch.float32)
    assert kd and all(k.endswith(".diff") for k in kd)
    assert len(comfy.lora.load_lora(kd, comfy.lora.model_lora_keys_unet(sd15[0].model, {}), log_missing=False)) == len(kd)


def test_new_name_keeps_the_unet_and_its_projection_under_one_name(F, trained, tmp_path):
    """if_exists 'new_name' picks a name free in BOTH folders: with swap.safetensors taken only among the
    projections and swap_2.safetensors only among the UNet files, both files become swap_3.safetensors (a name
    per folder would pair swap_2's projection with swap_3's UNet); nothing existing is touched; a name free in both
    folders is kept without a suffix."""
    _, _, run, _, _ = trained
    loras, projs = tmp_path / "loras", tmp_path / "te_projections"
    loras.mkdir(), projs.mkdir()
    (projs / "swap.safetensors").write_bytes(b"p1")
    (loras / "swap_2.safetensors").write_bytes(b"u2")
    from safetensors import safe_open

    unet, proj, _ = F.save(run, "swap", if_exists="new_name", loras_folder=loras, projections_folder=projs)
    assert Path(unet) == loras / "swap_3.safetensors" and Path(proj) == projs / "swap_3.safetensors", (unet, proj)
    assert (projs / "swap.safetensors").read_bytes() == b"p1" and (loras / "swap_2.safetensors").read_bytes() == b"u2"
    with safe_open(unet, framework="pt") as f:
        assert f.metadata()["aligned_trainer.te_swap_projection"] == "swap_3.safetensors"
    unet, proj, _ = F.save(run, "fresh", if_exists="new_name", loras_folder=loras, projections_folder=projs)
    assert (Path(unet).name, Path(proj).name) == ("fresh.safetensors",) * 2  # a free name is kept as given


def _is_pure_safetensors(path) -> bool:
    """The file is an 8-byte little-endian header length, a JSON header of tensor entries, then raw bytes (no
    pickle: safetensors' own layout, nothing else)."""
    import json
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return len(data) == 8 + n + max(ends) and b"\x80\x02" not in data[:2] and not data.startswith(b"PK")


def test_full_unet_export_loads_in_the_stock_unet_loader(comfy, T, S, F, sd15, clips, swapped, trained, comfy_dirs):
    """Save Text Encoder Swap with unet_format 'full' writes the whole retrained UNet (base + reset + trained, in the
    base's dtype) as a pure safetensors file into models/diffusion_models only (nothing new in loras); the stock
    UNETLoader loads it alone and its prediction on a projected prompt equals the in-memory swapped model's (Train
    Steps' MODEL: the run's differences on the swap model) within 1e-4. A quantized (fp8) base is refused with the
    fix."""
    import dataclasses

    import comfy.model_management as mm
    import folder_paths

    _, _, run, memory, _ = trained
    folders = {f: folder_paths.get_folder_paths(f)[0] for f in ("loras", "diffusion_models")}
    before = {f: set(os.listdir(d)) if os.path.isdir(d) else set() for f, d in folders.items()}
    unet_file, proj_file, swap = comfy.call(P + "SaveTextEncoderSwap", run=run, name="swap_full", dtype="fp32",
                                            use_ema=True, if_exists="overwrite", unet_format="full")
    path = Path(unet_file)
    assert path.parent == Path(folders["diffusion_models"]) and path.name == "swap_full.safetensors"
    assert set(os.listdir(folders["loras"])) == before["loras"]  # nothing written next to the LoRAs
    assert set(os.listdir(folders["diffusion_models"])) - before["diffusion_models"] == {path.name}
    assert _is_pure_safetensors(path)
    from safetensors.torch import load_file

    sd = load_file(str(path))
    base = {k[len("diffusion_model."):]: v[0][0] for k, v in sd15[0].get_key_patches("diffusion_model.").items()}
    assert set(sd) == set(base) and {v.dtype for v in sd.values()} == {v.dtype for v in base.values()}
    changed = {k for k in sd if not torch.equal(sd[k], base[k].cpu())}
    assert changed == {k[len("diffusion_model."):] for k in swap.reset_diffs}  # reset + trained layers only

    (loaded,) = comfy.nodes.UNETLoader().load_unet(path.name, "default")
    prompt = clips[1].encode_from_tokens_scheduled(clips[1].tokenize("ohwx a red circle"))
    (projected,) = comfy.call(P + "ApplyTextEncoderSwap", conditioning=prompt, swap=swap)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([2.0])
    outs = []
    for m in (loaded, memory, sd15[0]):
        mm.load_models_gpu([m])
        with torch.no_grad():
            outs.append(m.model.apply_model(x, sigma, c_crossattn=projected[0][0]).float().cpu())
    got, want, plain = outs
    print(f"te_swap full export: max |loaded - in memory| {float((got - want).abs().max()):.2e}")
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), float((got - want).abs().max())
    assert not torch.allclose(plain, want, atol=1e-3)  # the trained and reset weights are in the file

    (fp8,) = comfy.nodes.UNETLoader().load_unet(path.name, "fp8_e4m3fn")
    q_run = dataclasses.replace(run, model=S.with_swap(fp8, S.of(run.model)))
    with pytest.raises(S.SwapError, match="quantized .* Load the checkpoint unquantized"):
        F.save(q_run, "swap_fp8", unet_format="full", unet_folder=str(path.parent))
    assert not (path.parent / "swap_fp8.safetensors").exists()


def test_hostile_inputs_are_refused_with_the_fix(comfy, S, F, T, swapped, t5_set, tmp_path):
    """A CLIP-L prompt into Apply Text Encoder Swap, a training set cached with the old encoder, a file that is not a
    projection, and a swap setup without captions: each one error naming the value and the fix, before any
    computation with it."""
    import dataclasses

    _, swap = swapped
    clip_l_prompt = [[torch.zeros(1, 77, 768), {}]]
    with pytest.raises(S.SwapError, match="768 wide, the swap's projection reads 128: encode the prompt with the new"):
        comfy.call(P + "ApplyTextEncoderSwap", conditioning=clip_l_prompt, swap=swap)
    ts = t5_set[1]
    old_set = dataclasses.replace(ts, samples=tuple(
        dataclasses.replace(s, captions=tuple(dataclasses.replace(c, conditioning=clip_l_prompt) for c in s.captions))
        for s in ts.samples))
    with pytest.raises(S.SwapError, match=f"captions were encoded {clip_l_prompt[0][0].shape[-1]} wide, the swap's "
                                          f"projection reads {swap.in_dim}: cache the captions .* with the new text"):
        _init(T, swapped[0], old_set, tmp_path / "runs", "wrong_set")
    bad = tmp_path / "not_a_projection.safetensors"
    from safetensors.torch import save_file

    save_file({"diffusion_model.x.diff": torch.zeros(2)}, str(bad))
    with pytest.raises(S.SwapError, match="not a text-encoder swap projection"):
        F.load_projection(bad)
    with pytest.raises(S.SwapError, match="no captions"):
        S.setup(swapped[0], None, None, [], "none")


@pytest.fixture(scope="module")
def sdxl_swapped(S, family_bundle, clips):
    """(MODEL with the cross-attention reset and the swap, Swap, VAE) of the tiny SDXL swapped to the tiny T5."""
    model, old_clip, vae = family_bundle("sdxl")
    out, swap = S.setup(model, clips[1], old_clip, CAPTIONS, reset="cross_attention", kind="linear", seed=3)
    return out, swap, vae


def test_sdxl_swap_gives_the_adm_a_zero_pooled_vector_in_training_and_at_inference(comfy, S, M, T, sdxl_swapped, clips):
    """Tiny SDXL (CLIP-L + CLIP-G 320: context 1088, pooled 320 in its adm ``y``) swapped to the tiny T5: the setup
    reads the context width from the UNet and the pooled width from the old encoder's conditioning, the projection's
    spread matches within 5 %; Apply Text Encoder Swap's conditioning carries a zero pooled vector of that width, and
    the trainer's context hook gives the model exactly the kwargs (c_crossattn and y) that the Apply node's
    conditioning gives through ComfyUI's cond machinery; the stock KSampler samples it. Without the pooled vector
    ComfyUI's SDXL cannot build its adm."""
    out, swap, _ = sdxl_swapped
    assert (swap.in_dim, swap.out_dim, swap.pooled_dim) == (128, 1088, 320)
    assert swap.std_projected == pytest.approx(swap.std_old, rel=0.05) and len(swap.reset_layers) >= 4
    t5 = M.encode(clips[1], ["ohwx a red circle"])[0]
    (applied,) = comfy.call(P + "ApplyTextEncoderSwap", conditioning=t5, swap=swap)
    assert applied[0][0].shape[-1] == 1088 and torch.equal(applied[0][1]["pooled_output"], torch.zeros(1, 320))
    train, infer = _hook_and_apply_kwargs(T, S, out, swap, t5, applied)
    assert set(train) >= {"c_crossattn", "y"} and train["y"].shape[-1] == 320 + 6 * 256
    for k in ("c_crossattn", "y"):
        torch.testing.assert_close(train[k].float(), infer[k].float(), atol=1e-6, rtol=1e-6)
    assert torch.count_nonzero(train["y"][:, :320]) == 0
    with torch.inference_mode():
        n = comfy.nodes
        (neg,) = comfy.call(P + "ApplyTextEncoderSwap", conditioning=M.encode(clips[1], [""])[0], swap=swap)
        (lat,) = n.EmptyLatentImage().generate(64, 64, 1)
        (res,) = n.common_ksampler(out, 7, 1, 2.0, "euler", "normal", applied, neg, lat)
        assert torch.isfinite(res["samples"]).all()
        bare = [[applied[0][0], {k: v for k, v in applied[0][1].items() if k != "pooled_output"}]]
        with pytest.raises(KeyError, match="pooled_output"):
            n.common_ksampler(out, 7, 1, 2.0, "euler", "normal", bare, neg, lat)




SDXL_STEPS = 3  # the direction tests' runs; bench/te_swap_val_figure.py --model sdxl gives the 50-step figure


@pytest.fixture(scope="module")
def sdxl_set(comfy, sdxl_swapped, clips, tmp_path_factory):
    """One captioned 64 px image: tiny SDXL VAE latents, the caption encoded by the tiny T5 (no pooled vector)."""
    from support.factories.dataset import make_dataset

    base = tmp_path_factory.mktemp("sdxl_swapset")
    folder = make_dataset(base / "data", n=1, sizes=((64, 64),))
    D, caps, bk, cache = (comfy.engine(m) for m in ("data.dataset", "data.captions", "data.buckets", "data.cache"))
    ds = D.from_folder(folder.parent, caps.CaptionConfig(trigger_word="ohwx"),
                       bk.BucketConfig(resolution=64, min_side=64, max_side=64, step=64))
    tset, _ = cache.cache_text(cache.cache_latents(ds, sdxl_swapped[2], base / "cache"), clips[1], base / "cache",
                               unload=False)
    assert tset.samples[0].captions[0].conditioning[0][1].get("pooled_output") is None
    return tset


def _sdxl_trains(S, T, model, swap, tset, root, name):
    """Train SDXL_STEPS steps (full cross-attention + projection, min-SNR): (val before, val after, projection)."""
    run0 = _init(T, model, tset, root, name)
    before = T.loop.validation_loss(run0)
    run = T.loop.train_steps(run0, SDXL_STEPS)
    after = T.loop.validation_loss(run)
    print(f"te_swap sdxl ({name}): validation loss {before:.5f} -> {after:.5f} in {SDXL_STEPS} steps")
    assert after < before
    proj = S.trained_projection(run, ema=False)
    assert not torch.equal(proj["net.0.weight"], swap.projection["net.0.weight"])
    assert torch.equal(proj["scale"], swap.projection["scale"])
    assert {k.rpartition(".")[0] for k in S.without_projection(run.state["adapters"])} == set(swap.reset_layers)
    return proj


def test_sdxl_swap_training_lowers_validation_loss(S, T, sdxl_swapped, sdxl_set, tmp_path):
    """Tiny SDXL swapped to the tiny T5 trains through the ordinary Train Init / Train Steps engine (full
    cross-attention weights + projection, min-SNR): one captioned 64 px image (SDXL VAE latents, a T5 caption without
    a pooled vector: the trainer's hook gives the adm its zero one), the validation loss at fixed noise and timesteps
    falls within SDXL_STEPS steps; the projection trains, its scale stays; only the reset layers carry differences."""
    out, swap, _ = sdxl_swapped
    _sdxl_trains(S, T, out, swap, sdxl_set, tmp_path / "runs", "swap_sdxl")


def test_sdxl_projected_pooled_vector_trains_and_applies(comfy, S, M, T, F, sd15, family_bundle, clips, sdxl_set,
                                                         tmp_path):
    """Setup ``pooled = projected`` on the tiny SDXL: the adm's pooled input is the tiny T5's own pooled vector (the
    mean of its valid token states: T5 has no pooled output) through a Linear 128 -> 320 scaled to the old CLIP-G
    pooled vector's spread (within 5 %); Apply Text Encoder Swap's conditioning carries it (not zero) and the trainer's
    hook gives the model the same c_crossattn and y (1e-6); the stock KSampler samples it; the pooled Linear trains
    with the projection while the validation loss falls; the saved projection file reads back with it; SD1.5 (no
    adm) refuses the option with the fix."""
    model, old_clip, _ = family_bundle("sdxl")
    out, swap = S.setup(model, clips[1], old_clip, CAPTIONS, reset="cross_attention", kind="linear", seed=3,
                        pooled="projected")
    assert (swap.in_dim, swap.out_dim, swap.pooled_dim, swap.pooled_in) == (128, 1088, 320, 128)
    assert swap.std_pooled_projected == pytest.approx(swap.std_pooled_old, rel=0.05) and swap.std_pooled_old > 0
    assert "pooled 128->320 projected" in swap.report()
    t5 = M.encode(clips[1], ["ohwx a red circle"])[0]
    (applied,) = comfy.call(P + "ApplyTextEncoderSwap", conditioning=t5, swap=swap)
    pooled = applied[0][1]["pooled_output"]
    assert pooled.shape == (1, 320) and float(pooled.abs().max()) > 0
    mask = t5[0][1]["attention_mask"].reshape(-1) > 0
    m = swap.module()
    with torch.no_grad():  # the new encoder's mean valid token through the pooled Linear, scaled
        expect = m.pooled(t5[0][0][0][mask].float().mean(0, keepdim=True)) * m.pooled_scale
    torch.testing.assert_close(pooled.float(), expect, atol=1e-6, rtol=1e-6)
    train, infer = _hook_and_apply_kwargs(T, S, out, swap, t5, applied)
    for k in ("c_crossattn", "y"):
        torch.testing.assert_close(train[k].float(), infer[k].float(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(train["y"][:, :320].float(), expect, atol=1e-6, rtol=1e-6)
    with torch.inference_mode():
        n = comfy.nodes
        (neg,) = comfy.call(P + "ApplyTextEncoderSwap", conditioning=M.encode(clips[1], [""])[0], swap=swap)
        (lat,) = n.EmptyLatentImage().generate(64, 64, 1)
        (res,) = n.common_ksampler(out, 7, 1, 2.0, "euler", "normal", applied, neg, lat)
        assert torch.isfinite(res["samples"]).all()
    proj = _sdxl_trains(S, T, out, swap, sdxl_set, tmp_path / "runs", "swap_sdxl_pooled")
    assert not torch.equal(proj["pooled.weight"], swap.projection["pooled.weight"])
    assert torch.equal(proj["pooled_scale"], swap.projection["pooled_scale"])
    from dataclasses import replace

    from safetensors.torch import save_file

    tensors, meta = F.projection_file_state(replace(swap, projection=proj))
    save_file(tensors, str(tmp_path / "p.safetensors"), metadata=meta)
    back = F.load_projection(tmp_path / "p.safetensors")
    assert back.pooled_in == 128 and back.pooled_dim == 320
    torch.testing.assert_close(back.module().project(t5)[0][1]["pooled_output"],
                               swap.module(proj).project(t5)[0][1]["pooled_output"], atol=0, rtol=0)
    with pytest.raises(S.SwapError, match="pooled 'projected' is for a model that reads a pooled text vector"):
        S.setup(sd15[0], clips[1], old_clip, CAPTIONS, pooled="projected")


@pytest.mark.server
def test_damaged_projection_files_are_refused_at_load_through_the_server(server, comfy_dirs):
    """Projection files (models/te_projections, next to the loras folder) that carry the format tag but a broken
    record, tensors that do not fit it or NaN weights: Load Text Encoder Swap refuses each naming the file (before:
    bare JSONDecodeError / KeyError / TypeError / 'Error(s) in loading state_dict'; the NaN file loaded and sampled
    black images). The intact file loads (its error comes later, at Apply, for a CLIP-L prompt)."""
    from safetensors.torch import save_file

    from support.api_nodes import execution_error, node

    folder = comfy_dirs["models"] / "te_projections"
    folder.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {"net.0.weight": torch.randn(16, 8, generator=g), "net.0.bias": torch.randn(16, generator=g),
               "scale": torch.tensor(0.5)}
    record = {"kind": "linear", "in_dim": 8, "out_dim": 16}
    fmt = {"format": "aligned_trainer.te_swap.projection.v1"}
    files = {"intact": (tensors, json.dumps(record)), "bad_json": (tensors, "{not json"),
             "no_kind": (tensors, "{}"), "a_list": (tensors, "[1]"),
             "other_dims": (tensors, json.dumps({**record, "in_dim": 7})),
             "nan": ({**tensors, "net.0.weight": torch.full((16, 8), math.nan)}, json.dumps(record))}
    for name, (t, rec) in files.items():
        save_file(t, str(folder / f"at_test_{name}.safetensors"), metadata={**fmt, "aligned_trainer.te_swap": rec})

    def prompt(name):
        return {"1": node(server, "AlignedTrainer_LoadTextEncoderSwap", projection_name=f"at_test_{name}.safetensors"),
                "2": node(server, "CheckpointLoaderSimple", ckpt_name="tiny-sd15.safetensors"),
                "3": node(server, "CLIPTextEncode", clip=["2", 1], text="ohwx"),
                "4": node(server, "AlignedTrainer_ApplyTextEncoderSwap", conditioning=["3", 0], swap=["1", 0]),
                "5": node(server, "ConditioningZeroOut", conditioning=["4", 0]),
                "6": node(server, "PreviewAny", source=["5", 0])}

    err = execution_error(server, prompt("intact"))
    assert err["node_type"] == "AlignedTrainer_ApplyTextEncoderSwap", err
    for name in files.keys() - {"intact"}:
        err = execution_error(server, prompt(name))
        assert err["node_type"] == "AlignedTrainer_LoadTextEncoderSwap", (name, err)
        assert f"at_test_{name}.safetensors is a damaged text-encoder swap projection" in err["exception_message"], \
            (name, err["exception_message"])
