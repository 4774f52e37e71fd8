"""Shrinking the shipped family workflows (train_lora_sd15 / _sd2 / _sdxl / _sd35 / _flux1 / _wan / _wan22 /
_hunyuan_video15 / _zimage /
_chroma / _qwen_image / _qwen_image_edit / _lumina2 / _hidream / _flux2) so they run on tiny
generated models in seconds, and the real ComfyUI server they run on. Used by
tests/test_browser.py (the changes made in the frontend's graph before queueing it; the runs checked by
support.workflow_checks) and tests/test_workflows_families.py (the same changes on API prompts, as a guard).

What is changed in each shipped workflow, and nothing else (checked by
tests/test_workflows_families.py::test_substitutions_touch_only_loaders_and_sizes):

1. Loader nodes, because the shipped ones name real model files (``v1-5-pruned-emaonly.safetensors``,
   ``flux1-dev.safetensors``...). Where a stock loader detects a tiny model, the loader stays and only its
   file name is rewritten to a generated file in the server's model folders:
   - SD1.5: ``CheckpointLoaderSimple`` <- ``tiny-sd15.safetensors`` (one-level 320-channel UNet, CLIP-L,
     SD VAE: ``support.factories.sd15``);
   - SD3.5: ``CheckpointLoaderSimple`` <- ``tiny-sd3.safetensors`` (tiny SD3 MMDiT + 16-channel VAE, no text
     encoders: ``support.factories.family_files``; detected as SD3 from ``in_channels`` 16);
   - FLUX.1 and FLUX.1 Kontext: ``VAELoader`` <- ``tiny-flux1-ae.safetensors`` (16-channel VAE).
   Where stock detection only accepts full-size models, the loader node's class is replaced by a test-only
   loader with the same output types and slots (tests/support/comfy_nodes/aligned_trainer_tiny_loaders,
   on the server's ``custom_nodes`` path) that loads the tiny bundle of ``support.factories.families`` by
   family name through ComfyUI's own model, text-encoder and VAE classes:
   - SD2.x 768-v: ``CheckpointLoaderSimple`` -> ``TinyCheckpointLoader(sd2-v)`` (``support.factories.sd2``, v from
     ComfyUI's own SD20 detection): SD2 is matched only at model_channels 320 and context_dim 1024;
   - SDXL: ``CheckpointLoaderSimple`` -> ``TinyCheckpointLoader(sdxl)``: SDXL is matched only at its real
     UNet size (model_channels 320, transformer_depth [0, 0, 2, 2, 10, 10], context_dim 2048);
   - SD3.5: ``TripleCLIPLoader`` -> ``TinyTextEncoderLoader(sd3)``;
   - FLUX.1: ``DualCLIPLoader`` -> ``TinyTextEncoderLoader(flux1-dev)``: the CLIP loaders recognise CLIP-G
     by its 31st layer and T5-XXL by its 24th block and build them from full-size configs;
   - FLUX.1: ``UNETLoader`` -> ``TinyDiffusionModelLoader(flux1-dev)``: FLUX detection fixes 24 heads of 128
     (hidden 3072) whatever the file holds.
   - FLUX.1 Kontext: the FLUX.1 loaders (ComfyUI runs Kontext as ``model_base.Flux``); its ``my_dataset_control``
     holds each ``my_dataset`` image mirrored, under the same file name.
   - Z-Image and Chroma: ``UNETLoader`` -> ``TinyDiffusionModelLoader(z-image / chroma)``, ``CLIPLoader`` ->
     ``TinyTextEncoderLoader(z-image / chroma)`` (Qwen3-4B and T5-XXL are built at full size), ``VAELoader`` <-
     ``tiny-flux1-ae.safetensors`` (both use FLUX's 16-channel VAE).
   - Qwen-Image: ``UNETLoader`` -> ``TinyDiffusionModelLoader(qwen-image)`` (Qwen-Image detection reads only the
     input width and block count and builds 24 heads of 128), ``CLIPLoader`` -> ``TinyTextEncoderLoader(qwen-image)``
     (Qwen2.5-VL-7B is built at full size), ``VAELoader`` <- ``tiny-wan21-vae.safetensors`` (Qwen-Image's VAE is
     the Wan 2.1 VAE).
   - Qwen-Image-Edit: the Qwen-Image substitutions, with ``CLIPLoader`` -> ``TinyTextEncoderLoader(qwen-image-edit)``
     (the same tiny language model with a seeded tiny vision tower: ComfyUI builds Qwen2.5-VL-7B's tower at full
     size); its ``my_dataset_control`` and ``example.png`` are the Kontext workflow's.
   - Lumina 2: ``UNETLoader`` -> ``TinyDiffusionModelLoader(lumina2)`` (Lumina 2 detection sets 24 heads unless the
     width is 2304), ``CLIPLoader`` -> ``TinyTextEncoderLoader(lumina2)`` (Gemma-2 2B is built at full size),
     ``VAELoader`` <- ``tiny-flux1-ae.safetensors`` (FLUX's 16-channel VAE, as Lumina 2's).
   - HiDream-I1: ``UNETLoader`` -> ``TinyDiffusionModelLoader(hidream)`` (HiDream detection fixes 20 heads of
     128, 16 double- and 32 single-stream blocks), ``QuadrupleCLIPLoader`` -> ``TinyTextEncoderLoader(hidream)``
     (CLIP-G, T5-XXL and Llama-3.1-8B are built at full size), ``VAELoader`` <- ``tiny-flux1-ae.safetensors``
     (HiDream's VAE is FLUX's). The ModelSamplingSD3 node (shift 3) between the model and Train Init stays.
   - FLUX.2 [dev]: ``UNETLoader`` -> ``TinyDiffusionModelLoader(flux2-dev)`` (FLUX.2 detection fixes 48 heads and
     four rope axes of 32), ``CLIPLoader`` -> ``TinyTextEncoderLoader(flux2-dev)`` (CLIPLoader type flux2 recognises
     the Mistral only at 40 layers of 5120), ``VAELoader`` <- ``tiny-flux2-vae.safetensors`` (the stock loader
     detects the FLUX.2 VAE by its batch-norm statistics: ``families.flux2_vae_file``).
   - Wan 2.1: ``UNETLoader`` -> ``TinyDiffusionModelLoader(wan2.1)`` (Wan detection gives dim/128 heads),
     ``CLIPLoader`` -> ``TinyTextEncoderLoader(wan2.1)`` (UMT5-XXL is built at full size), ``VAELoader`` <-
     ``tiny-wan21-vae.safetensors`` (the stock loader detects the tiny Wan 2.1 VAE: ``support.factories.wan``).
   - Wan 2.2 A14B (one expert): the same with ``wan2.2-t2v-high`` (the tiny high-noise expert of
     ``support.factories.wan22``, a ``WAN21_T2V`` as ComfyUI loads the real expert files) and the Wan 2.1 VAE.
   - HunyuanVideo 1.5: ``UNETLoader`` -> ``TinyDiffusionModelLoader(hunyuan-video-1.5)``, ``DualCLIPLoader`` ->
     ``TinyTextEncoderLoader(hunyuan-video-1.5)`` (Qwen2.5-VL 7B is built at full size), ``VAELoader`` ->
     ``TinyVAELoader(hunyuan-video-1.5)``: ComfyUI's detection builds the HunyuanVideo 1.5 VAE at fixed full-size
     widths whatever the file holds, so the test-only loader hands out the ``comfy.sd.VAE`` it detects holding the
     tiny module (``support.factories.hunyuan_video15``). Shrunk as Wan 2.2 (5 frames, 2 steps, no validation,
     the preview only at the end).
2. Sizes and step counts, so that each run takes seconds on a CPU (``SHRINK``): dataset resolution and bucket
   sides 64; 4 training steps with a checkpoint and a validation pass every 2 (``total_steps`` of the
   optimizer 4); preview plan and final sample preview 2 sampling steps at 64x64, the plan rendering every 2
   steps, the final preview labelled step 4. The dataset folder keeps the shipped name ``my_dataset``
   (4 generated 64 px captioned images in the server's input folder). Per workflow (``SHRINK_MORE``): Wan's
   (2.1 and 2.2) clips sampled and previewed at 5 frames, one preview and one validation pass; its ``my_videos``
   folder holds a 6-frame 64 px clip and a still image; Wan 2.2 trains 2 steps with no validation and previews
   only at the end;
   Z-Image, Chroma and FLUX.2 render one preview and one validation pass; Qwen-Image trains 2 steps with one checkpoint,
   one validation pass and one preview; Lumina 2 (256 masked caption tokens) 2 steps, no validation, only the final
   preview.

Everything else is the shipped workflow: the aligned text-encoder node with its spec, dataset and caches,
LoRA config (rank, targets), timestep strategy, optimizer, Train Init, Train Steps, Save LoRA, sample preview,
loss graph and the Save/Preview Image nodes, with their links.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

from PIL import Image, ImageOps

from . import demo
from .factories import clips, families, family_files, sd15, wan
from .factories.dataset import make_dataset
from .server import ComfyServer

TEST_NODES = Path(__file__).resolve().parent / "comfy_nodes"
TINY = "AlignedTrainerTests_Tiny"
WAN_VAE = "tiny-wan21-vae.safetensors"
FLUX2_VAE = "tiny-flux2-vae.safetensors"

# workflow -> (family of support.factories.families whose LoRA keys the saved file must map to, or "sd15";
#              loader substitutions: class_type -> (new class_type or None to keep, inputs))
FAMILIES = {
    "train_lora_sd15": ("sd15", {"CheckpointLoaderSimple": (None, {"ckpt_name": "tiny-sd15.safetensors"})}),
    "train_lora_sd2": ("sd2-v", {"CheckpointLoaderSimple": (f"{TINY}CheckpointLoader", {"family": "sd2-v"})}),
    "train_lora_sdxl": ("sdxl", {"CheckpointLoaderSimple": (f"{TINY}CheckpointLoader", {"family": "sdxl"})}),
    "train_lora_sd35": ("sd3", {"CheckpointLoaderSimple": (None, {"ckpt_name": "tiny-sd3.safetensors"}),
                                "TripleCLIPLoader": (f"{TINY}TextEncoderLoader", {"family": "sd3"})}),
    "train_lora_flux1": ("flux1-dev", {"UNETLoader": (f"{TINY}DiffusionModelLoader", {"family": "flux1-dev"}),
                                       "DualCLIPLoader": (f"{TINY}TextEncoderLoader", {"family": "flux1-dev"}),
                                       "VAELoader": (None, {"vae_name": "tiny-flux1-ae.safetensors"})}),
    "train_lora_flux1_kontext": ("flux1-dev", {"UNETLoader": (f"{TINY}DiffusionModelLoader", {"family": "flux1-dev"}),
                                               "DualCLIPLoader": (f"{TINY}TextEncoderLoader", {"family": "flux1-dev"}),
                                               "VAELoader": (None, {"vae_name": "tiny-flux1-ae.safetensors"})}),
    "train_lora_wan": ("wan2.1", {"UNETLoader": (f"{TINY}DiffusionModelLoader", {"family": "wan2.1"}),
                                  "CLIPLoader": (f"{TINY}TextEncoderLoader", {"family": "wan2.1"}),
                                  "VAELoader": (None, {"vae_name": WAN_VAE})}),
    "train_lora_wan22": ("wan2.2-t2v-high", {"UNETLoader": (f"{TINY}DiffusionModelLoader", {"family": "wan2.2-t2v-high"}),
                                             "CLIPLoader": (f"{TINY}TextEncoderLoader", {"family": "wan2.2-t2v-high"}),
                                             "VAELoader": (None, {"vae_name": WAN_VAE})}),
    "train_lora_hunyuan_video15": ("hunyuan-video-1.5", {
        "UNETLoader": (f"{TINY}DiffusionModelLoader", {"family": "hunyuan-video-1.5"}),
        "DualCLIPLoader": (f"{TINY}TextEncoderLoader", {"family": "hunyuan-video-1.5"}),
        "VAELoader": (f"{TINY}VAELoader", {"family": "hunyuan-video-1.5"})}),
    "train_lora_zimage": ("z-image", {"UNETLoader": (f"{TINY}DiffusionModelLoader", {"family": "z-image"}),
                                      "CLIPLoader": (f"{TINY}TextEncoderLoader", {"family": "z-image"}),
                                      "VAELoader": (None, {"vae_name": "tiny-flux1-ae.safetensors"})}),
    "train_lora_qwen_image": ("qwen-image", {"UNETLoader": (f"{TINY}DiffusionModelLoader", {"family": "qwen-image"}),
                                             "CLIPLoader": (f"{TINY}TextEncoderLoader", {"family": "qwen-image"}),
                                             "VAELoader": (None, {"vae_name": WAN_VAE})}),
    "train_lora_qwen_image_edit": ("qwen-image", {
        "UNETLoader": (f"{TINY}DiffusionModelLoader", {"family": "qwen-image"}),
        "CLIPLoader": (f"{TINY}TextEncoderLoader", {"family": "qwen-image-edit"}),
        "VAELoader": (None, {"vae_name": WAN_VAE})}),
    "train_lora_lumina2": ("lumina2", {"UNETLoader": (f"{TINY}DiffusionModelLoader", {"family": "lumina2"}),
                                       "CLIPLoader": (f"{TINY}TextEncoderLoader", {"family": "lumina2"}),
                                       "VAELoader": (None, {"vae_name": "tiny-flux1-ae.safetensors"})}),
    "train_lora_chroma": ("chroma", {"UNETLoader": (f"{TINY}DiffusionModelLoader", {"family": "chroma"}),
                                     "CLIPLoader": (f"{TINY}TextEncoderLoader", {"family": "chroma"}),
                                     "VAELoader": (None, {"vae_name": "tiny-flux1-ae.safetensors"})}),
    "train_lora_hidream": ("hidream", {"UNETLoader": (f"{TINY}DiffusionModelLoader", {"family": "hidream"}),
                                       "QuadrupleCLIPLoader": (f"{TINY}TextEncoderLoader", {"family": "hidream"}),
                                       "VAELoader": (None, {"vae_name": "tiny-flux1-ae.safetensors"})}),
    "train_lora_flux2": ("flux2-dev", {"UNETLoader": (f"{TINY}DiffusionModelLoader", {"family": "flux2-dev"}),
                                       "CLIPLoader": (f"{TINY}TextEncoderLoader", {"family": "flux2-dev"}),
                                       "VAELoader": (None, {"vae_name": FLUX2_VAE})}),
}
STEPS = 2  # one checkpoint, one validation pass and one preview at step 2 (4 steps repeated each: suite time)
SHRINK = {
    "AlignedTrainer_Dataset": {"resolution": 64, "min_side": 64, "max_side": 64},
    "AlignedTrainer_TrainSteps": {"steps": STEPS, "checkpoint_every": 2, "val_every": 2},
    "AlignedTrainer_Optimizer": {"total_steps": STEPS},
    "AlignedTrainer_PreviewPlan": {"steps": 2, "width": 64, "height": 64, "every_n": 2},
    "AlignedTrainer_SamplePreview": {"steps": 2, "width": 64, "height": 64, "step": STEPS},
    "ImageScaleToTotalPixels": {"megapixels": 0.01},  # the Kontext previews' input image: ~100 px, not 1 megapixel
}
# Per workflow, on top of SHRINK: the Wan clips sampled and previewed at 5 frames (2 latent frames), one
# preview and one validation pass during training (clip decodes and bf16 passes are the slow parts on a CPU).
SHRINK_MORE = {"train_lora_wan": {"AlignedTrainer_Dataset": {"frames": 5},
                                   "AlignedTrainer_PreviewPlan": {"frames": 5, "every_n": STEPS},
                                   "AlignedTrainer_SamplePreview": {"frames": 5},
                                   "AlignedTrainer_TrainSteps": {"val_every": STEPS}},
               # Wan 2.2 (one expert): 2 bf16 steps, no validation, no preview during training (the final Sample
               # Preview is its animated preview; Train Steps' previews and validation of a Wan run are checked on
               # train_lora_wan), since a clip decode and a bf16 step each take seconds on a CPU
               "train_lora_wan22": {"AlignedTrainer_Dataset": {"frames": 5},
                                    "AlignedTrainer_PreviewPlan": {"frames": 5, "every_n": STEPS},
                                    "AlignedTrainer_SamplePreview": {"frames": 5, "step": 2},
                                    "AlignedTrainer_TrainSteps": {"steps": 2, "checkpoint_every": 2, "val_every": 0},
                                    "AlignedTrainer_Optimizer": {"total_steps": 2}},
               # HunyuanVideo 1.5: as Wan 2.2 (2 bf16 steps, no validation, the final Sample Preview only; 5 frames)
               "train_lora_hunyuan_video15": {"AlignedTrainer_Dataset": {"frames": 5},
                                              "AlignedTrainer_PreviewPlan": {"frames": 5, "every_n": STEPS},
                                              "AlignedTrainer_SamplePreview": {"frames": 5, "step": 2},
                                              "AlignedTrainer_TrainSteps": {"steps": 2, "checkpoint_every": 2,
                                                                            "val_every": 0},
                                              "AlignedTrainer_Optimizer": {"total_steps": 2}},
               # Z-Image (a 256-wide DiT: ComfyUI's z_image_modulation needs 256) and Chroma in bf16 on a CPU: one
               # preview and one validation pass, as for Wan
               **{name: {"AlignedTrainer_PreviewPlan": {"every_n": STEPS},
                         "AlignedTrainer_TrainSteps": {"val_every": STEPS}}
                  for name in ("train_lora_zimage", "train_lora_chroma")},
               # Qwen-Image (LLM text encoder, bf16): 2 steps with one checkpoint, one validation pass and one preview
               # during training
               "train_lora_qwen_image": {"AlignedTrainer_TrainSteps": {"steps": 2, "checkpoint_every": 2, "val_every": 2},
                                         "AlignedTrainer_Optimizer": {"total_steps": 2},
                                         "AlignedTrainer_SamplePreview": {"step": 2}},
               # Qwen-Image-Edit: the same (each caption and preview prompt holds ~1300 vision tokens)
               "train_lora_qwen_image_edit": {"AlignedTrainer_TrainSteps": {"steps": 2, "checkpoint_every": 2,
                                                                            "val_every": 2},
                                              "AlignedTrainer_Optimizer": {"total_steps": 2},
                                              "AlignedTrainer_SamplePreview": {"step": 2}},
               # SD2.x 768-v: 2 steps with one checkpoint, no validation, only the final Sample Preview (the v target
               # and its loss are checked in test_train_sd2.py)
               "train_lora_sd2": {"AlignedTrainer_TrainSteps": {"steps": 2, "checkpoint_every": 2, "val_every": 0},
                                  "AlignedTrainer_Optimizer": {"total_steps": 2},
                                  "AlignedTrainer_PreviewPlan": {"every_n": STEPS},
                                  "AlignedTrainer_SamplePreview": {"step": 2}},
               # Lumina 2: its aligned captions are 256 masked tokens, so each pass of the DiT is several times the
               # others' on a CPU: 2 steps with one checkpoint, no validation, only the final Sample Preview (as Wan 2.2)
               "train_lora_lumina2": {"AlignedTrainer_TrainSteps": {"steps": 2, "checkpoint_every": 2, "val_every": 0},
                                      "AlignedTrainer_Optimizer": {"total_steps": 2},
                                      "AlignedTrainer_PreviewPlan": {"every_n": STEPS},
                                      "AlignedTrainer_SamplePreview": {"step": 2}},
               # HiDream: four text encoders per caption and a mixture of experts in every block: 2 steps with one
               # checkpoint, no validation, only the final Sample Preview (as Lumina 2)
               "train_lora_hidream": {"AlignedTrainer_TrainSteps": {"steps": 2, "checkpoint_every": 2, "val_every": 0},
                                      "AlignedTrainer_Optimizer": {"total_steps": 2},
                                      "AlignedTrainer_PreviewPlan": {"every_n": STEPS},
                                      "AlignedTrainer_SamplePreview": {"step": 2}},
               # FLUX.2: a 31-layer Mistral per caption (512 aligned tokens) and a full-width VAE: one preview and
               # one validation pass, as Z-Image and Chroma
               "train_lora_flux2": {"AlignedTrainer_PreviewPlan": {"every_n": STEPS},
                                    "AlignedTrainer_TrainSteps": {"val_every": STEPS}}}


# The text-encoder swap workflows (tests/test_browser.py makes these changes in the frontend's graph, queues them and
# checks each run with support.workflow_checks.check_te_swap_run): name -> (loader substitutions as in FAMILIES,
# sizes: class_type -> inputs). CLIPLoader builds T5-XXL at full size, so the tiny T5 of the Chroma bundle comes
# from the test-only loader; the SDXL checkpoint is the tiny SDXL bundle (CLIP-L + a 320-wide CLIP-G, context 1088,
# pooled 320) from the test-only checkpoint loader, as for train_lora_sdxl. 64 px, 2 steps at batch 1, no validation
# pass (tests/test_te_swap.py checks the validation loss), one sampling step; the dataset is TE_SWAP_DATASET (2
# captioned 64 px images, written by family_server): every caption costs a full-size CLIP-L encode on the CPU in Text
# Encoder Swap Setup. Everything else (reset, pooled, precision, lr schedule, links) is the shipped workflow's.
TE_SWAP_STEPS = 2
TE_SWAP_DATASET = "te_swap_dataset"
_TE_SWAP_SHRINK = {
    "AlignedTrainer_Dataset": {"folder": TE_SWAP_DATASET, "resolution": 64, "min_side": 64, "max_side": 64},
    "AlignedTrainer_TrainInit": {"batch_size": 1, "grad_accum": 1, "gradient_checkpointing": False},
    "AlignedTrainer_TrainSteps": {"steps": TE_SWAP_STEPS, "checkpoint_every": TE_SWAP_STEPS, "val_every": 0},
    "AlignedTrainer_Optimizer": {"total_steps": TE_SWAP_STEPS, "learning_rate": 1e-3},
    "AlignedTrainer_PreviewPlan": {"every_n": 1, "steps": 1, "width": 64, "height": 64},
    "EmptyLatentImage": {"width": 64, "height": 64},
    "KSampler": {"steps": 1}}
_TINY_T5 = {"CLIPLoader": (f"{TINY}TextEncoderLoader", {"family": "chroma"})}
TE_SWAP = {"train_te_swap_sd15": ({"CheckpointLoaderSimple": (None, {"ckpt_name": "tiny-sd15.safetensors"}),
                                   **_TINY_T5}, _TE_SWAP_SHRINK),
           "train_te_swap_sdxl": ({"CheckpointLoaderSimple": (f"{TINY}CheckpointLoader", {"family": "sdxl"}),
                                   **_TINY_T5}, _TE_SWAP_SHRINK)}
# the tiny base each swap workflow runs on (support.factories: "sd15" or a families bundle) and its UNet's context
# width (the projection's output)
TE_SWAP_BASES = {"train_te_swap_sd15": ("sd15", 768), "train_te_swap_sdxl": ("sdxl", 1088)}


def shrink_for(name: str) -> dict:
    """SHRINK with the workflow's own additions (SHRINK_MORE)."""
    out = {t: dict(v) for t, v in SHRINK.items()}
    for t, v in SHRINK_MORE.get(name, {}).items():
        out.setdefault(t, {}).update(v)
    return out


def steps_for(name: str) -> int:
    """Training steps of the shrunk workflow ``name`` (STEPS unless SHRINK_MORE sets its own)."""
    return shrink_for(name)["AlignedTrainer_TrainSteps"]["steps"]


def tiny_prompt(api: dict, name: str) -> dict:
    """The shipped API prompt with its loaders pointed at the tiny models and its sizes shrunk (see above)."""
    out = copy.deepcopy(api)
    _, loaders = FAMILIES[name]
    for node in out.values():
        t = node["class_type"]
        if t in loaders:
            new_type, inputs = loaders[t]
            if new_type is not None:
                node["class_type"], node["inputs"] = new_type, {}
            node["inputs"].update(inputs)
        for k, v in shrink_for(name).get(t, {}).items():
            assert k in node["inputs"], f"{name}: {t} has no input {k}"
            node["inputs"][k] = v
    return out



@contextlib.contextmanager
def family_server(base: Path):
    """A real ComfyUI server with the tiny model files in its model folders, the test-only loaders on its
    ``custom_nodes`` path, the family workflows' dataset (``my_dataset``: 4 captioned 64 px images), the swap
    workflow's (``TE_SWAP_DATASET``: 2) and the demo workflows' inputs (tiny SD1.5 checkpoint, ``demo_dataset``); always stopped."""
    models = base / "models"
    folders = {k: models / k for k in ("checkpoints", "vae", "loras")}
    for d in folders.values():
        d.mkdir(parents=True)
    srv = ComfyServer(base, model_folders={**folders, "custom_nodes": TEST_NODES}, log_name="family-server.log")
    srv.launch()  # boots while the model files are generated (a fresh clone has none) and linked
    try:
        for link, src in ((folders["checkpoints"] / "tiny-sd15.safetensors", sd15.checkpoint()),
                          (folders["checkpoints"] / "tiny-sd3.safetensors", family_files.sd3_checkpoint()),
                          (folders["vae"] / "tiny-flux1-ae.safetensors", family_files.vae_file("flux1-dev")),
                          (folders["vae"] / WAN_VAE, wan.vae_file()),
                          (folders["vae"] / FLUX2_VAE, families.flux2_vae_file())):
            link.symlink_to(src)
        make_dataset(srv.input_dir / "my_dataset", n=4, sizes=((64, 64),))
        # the Kontext workflow's control images: each my_dataset image mirrored, under its file stem
        (srv.input_dir / "my_dataset_control").mkdir()
        for p in sorted((srv.input_dir / "my_dataset").rglob("*.png")):
            ImageOps.mirror(Image.open(p)).save(srv.input_dir / "my_dataset_control" / p.name)
        # ComfyUI's own input/example.png, which the Kontext workflow's previews edit: here the first image, flipped
        ImageOps.flip(Image.open(sorted((srv.input_dir / "my_dataset").rglob("*.png"))[0])).save(srv.input_dir / "example.png")
        make_dataset(srv.input_dir / TE_SWAP_DATASET, n=2, sizes=((64, 64),))  # the text-encoder swap workflow's
        # the Wan workflow's my_videos: a 6-frame 64 px clip at 16 fps and a still image (a one-frame sample)
        clips.write_clip(srv.input_dir / "my_videos" / "clip.mp4", 6, 16, size=(64, 64), caption="ohwx walking")
        Image.fromarray(clips.frame(3, (64, 64))).save(srv.input_dir / "my_videos" / "still.png")
        (srv.input_dir / "my_videos" / "still.txt").write_text("ohwx standing", encoding="utf-8")
        demo.prepare_inputs(srv.input_dir, folders["checkpoints"])
        srv.wait_ready()
        srv.info = srv.get("/object_info")
        yield srv
    finally:
        srv.stop()
