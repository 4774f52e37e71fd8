"""Nodes: sampling and comparison (Sample Preview, Preview Plan, A/B Compare, Checkpoint Grid, Loss Graph).
See docs/sampling.md."""
from __future__ import annotations

import json
import comfy.samplers
from comfy_api.latest import io, ui

from ..aligned_trainer import imaging, plot
from ..aligned_trainer.sampling import animation, checkpoints, compare, history, plans
from ..aligned_trainer.sampling.render import SampleSettings
from ._common import NodeProgress, category, node_id

CAT = category("Sampling")
PREVIEW_PLAN = io.Custom("AT_PREVIEW_PLAN")
TRAIN_RUN = io.Custom("AT_TRAIN_RUN")


def sampler_inputs(default_steps: int = 20):
    return [
        io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=False, tooltip="Base seed."),
        io.Combo.Input("seed_mode", options=["fixed", "walk"], default="fixed",
                       tooltip="fixed: the same seed every time; walk: seed + training step."),
        io.Int.Input("steps", default=default_steps, min=1, max=1000, tooltip="Sampling steps."),
        io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, tooltip="Classifier-free guidance scale."),
        io.Float.Input("guidance", default=3.5, min=0.0, max=100.0, step=0.1,
                       tooltip="Distilled guidance (FLUX dev); ignored by models that do not use it."),
        io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler", tooltip="Sampler."),
        io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal", tooltip="Scheduler."),
        io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="Image width."),
        io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="Image height."),
    ]


def settings(kw: dict, frames: int = 1) -> SampleSettings:
    return SampleSettings(kw["steps"], kw["cfg"], kw["guidance"], kw["sampler_name"], kw["scheduler"], kw["width"],
                          kw["height"], kw["seed"], kw["seed_mode"], frames)


CONTROL = io.Image.Input("control_image", optional=True,
                         tooltip="Image-edit models (FLUX.1 Kontext, Qwen-Image-Edit): the input image to edit. Each image "
                                 "of the batch is VAE-encoded and attached to every prompt and the negative as a "
                                 "reference latent, as VAE Encode -> ReferenceLatent do. Scale it first (e.g. "
                                 "FluxKontextImageScale) as the model's template does. With a CLIP aligned to a spec "
                                 "that reads images in its prompt (qwen-image-edit) every prompt and the negative are "
                                 "also encoded with the image in the text (required there). Leave empty for other "
                                 "models.")


def video_inputs():
    """Optional inputs of the nodes that can sample video models (Wan): frames per clip and playback rate."""
    return [io.Int.Input("frames", default=1, min=1, max=257, optional=True,
                         tooltip="1 for image models. Video models (Wan): frames per clip, rounded down to 4k+1 "
                                 "(17, 33, 81); the preview is saved as an animated WebP in the output folder."),
            io.Float.Input("fps", default=16.0, min=0.5, max=120.0, step=0.5, optional=True,
                           tooltip="Playback rate of animated previews (Wan 2.1/2.2: 16).")]


PROMPTS = io.String.Input("prompts", multiline=True, default="ohwx, a photo",
                          tooltip="One prompt per line; each becomes a column.")
NEGATIVE = io.String.Input("negative", default="", tooltip="Negative prompt (used when cfg > 1).")


class SamplePreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("SamplePreview"), display_name="Sample Preview", category=CAT,
            description="Renders prompts with ComfyUI's own sampler path into a labelled grid.",
            inputs=[io.Model.Input("model", tooltip="Model (with or without LoRA)."),
                    io.Clip.Input("clip", tooltip="CLIP to encode the prompts."),
                    io.Vae.Input("vae", tooltip="VAE to decode."), PROMPTS, NEGATIVE, *sampler_inputs(),
                    io.Int.Input("step", default=0, min=0, max=10**9, tooltip="Training step label (and walk offset)."),
                    *video_inputs(), CONTROL],
            outputs=[io.Image.Output("grid", tooltip="Labelled grid (prompt, seed, step); one grid per frame for "
                                                     "video (connect Save Animated WEBP to keep it)."),
                     io.Image.Output("images", tooltip="The cells as a batch (video: every clip's frames in turn).")],
        )

    @classmethod
    def execute(cls, model, clip, vae, prompts, negative, step, frames=1, fps=16.0, control_image=None,
                **kw) -> io.NodeOutput:
        g, cells, _ = plans.preview_grid(model, clip, vae, plans.prompt_list(prompts), negative, settings(kw, frames),
                                         step, control=control_image)
        view = animation.ui([animation.save_webp(g, "sample", fps)]) if g.shape[0] > 1 else ui.PreviewImage(g, cls=cls)
        return io.NodeOutput(g, cells, ui=view)


class PreviewPlan(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("PreviewPlan"), display_name="Preview Plan", category=CAT,
            description="Previews for Train Steps: rendered every N steps with the LoRA being trained (on a "
                        "text-encoder swap run: the prompts projected as Apply Text Encoder Swap does, by the "
                        "projection of that step).",
            inputs=[io.Clip.Input("clip", tooltip="CLIP to encode the prompts (encoded once, now). For a text-encoder "
                                                  "swap run: the new encoder (e.g. T5) given to Text Encoder Swap "
                                                  "Setup."),
                    io.Vae.Input("vae", tooltip="VAE to decode."), PROMPTS, NEGATIVE, *sampler_inputs(),
                    io.Int.Input("every_n", default=100, min=1, max=10**6, tooltip="Render every N training steps."),
                    *video_inputs(), CONTROL],
            outputs=[PREVIEW_PLAN.Output("preview_plan", tooltip="For Train Steps' preview_plan input.")],
        )

    @classmethod
    def execute(cls, clip, vae, prompts, negative, every_n, frames=1, fps=16.0, control_image=None,
                **kw) -> io.NodeOutput:
        return io.NodeOutput(plans.make_plan(clip, vae, plans.prompt_list(prompts), negative, settings(kw, frames),
                                             every_n, fps, control=control_image))


class ABCompare(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("ABCompare"), display_name="A/B Compare", category=CAT,
            description="The same prompts, seed and noise through A and B: two CLIPs (aligned vs unaligned) "
                        "and/or two models (two LoRA states).",
            inputs=[io.Model.Input("model", tooltip="Model for A (and B unless model_b is given)."),
                    io.Vae.Input("vae", tooltip="VAE to decode."),
                    io.Clip.Input("clip_a", tooltip="CLIP of column A (e.g. aligned)."),
                    io.Clip.Input("clip_b", tooltip="CLIP of column B (e.g. ComfyUI default)."),
                    PROMPTS, NEGATIVE, *sampler_inputs(),
                    io.String.Input("label_a", default="aligned", tooltip="Label of column A."),
                    io.String.Input("label_b", default="unaligned", tooltip="Label of column B."),
                    io.Model.Input("model_b", optional=True, tooltip="Optional second model for column B.")],
            outputs=[io.Image.Output("grid", tooltip="Rows = prompts; columns A, B and |A-B| (x4) with the mean absolute difference."),
                     io.Image.Output("images_a", tooltip="Column A images."),
                     io.Image.Output("images_b", tooltip="Column B images."),
                     io.String.Output("differences", tooltip="Per pair: mean/max absolute pixel difference, RMSE, PSNR (JSON).")],
        )

    @classmethod
    def execute(cls, model, vae, clip_a, clip_b, prompts, negative, label_a, label_b, model_b=None, **kw) -> io.NodeOutput:
        g, a, b, diffs, _ = compare.ab_compare(model, model_b or model, clip_a, clip_b, vae, plans.prompt_list(prompts),
                                             negative, settings(kw), (label_a, label_b))
        view = {"images": ui.PreviewImage(g, cls=cls).values, "a_images": ui.PreviewImage(a, cls=cls).values,
                "b_images": ui.PreviewImage(b, cls=cls).values, "ab_labels": [label_a, label_b]}
        return io.NodeOutput(g, a, b, json.dumps(compare.json_safe(diffs), indent=1), ui=view)


class CheckpointGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("CheckpointGrid"), display_name="Checkpoint Grid", category=CAT,
            description="Every saved checkpoint (rows) x prompts (columns), to pick the best step.",
            inputs=[io.Model.Input("model", tooltip="Base model (without LoRA)."),
                    io.Clip.Input("clip", tooltip="CLIP to encode the prompts."), io.Vae.Input("vae", tooltip="VAE."),
                    io.String.Input("folder", default="", tooltip="A folder of LoRA files / a run's checkpoints folder (a sub-folder of models/loras, or a path inside a registered loras folder or output/aligned_trainer/runs), or file names one per line. Rows are sorted by training step (metadata or trailing digits of the name)."),
                    PROMPTS, NEGATIVE, *sampler_inputs(),
                    io.Float.Input("strength", default=1.0, min=-5, max=5, step=0.05, tooltip="LoRA strength.")],
            outputs=[io.Image.Output("grid", tooltip="Checkpoints x prompts."),
                     io.String.Output("rows", tooltip="Row labels (JSON).")],
        )

    @classmethod
    def execute(cls, model, clip, vae, folder, prompts, negative, strength, **kw) -> io.NodeOutput:
        files = checkpoints.resolve(folder)
        g, labels, _ = checkpoints.checkpoint_grid(model, clip, vae, files, plans.prompt_list(prompts), negative,
                                                   settings(kw), strength, NodeProgress(len(files)))
        return io.NodeOutput(g, json.dumps(labels), ui=ui.PreviewImage(g, cls=cls))


class LossGraph(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("LossGraph"), display_name="Loss Graph", category=CAT,
            description="Training and validation loss with smoothing; local minima marked.",
            inputs=[TRAIN_RUN.Input("run", optional=True, tooltip="A training run (reads its loss history)."),
                    io.String.Input("history_json", multiline=True, default="", optional=True,
                                    tooltip="Or a JSON list of {step, loss, val_loss?} records."),
                    io.Float.Input("smoothing", default=0.9, min=0.0, max=0.999, step=0.01, tooltip="EMA smoothing.")],
            outputs=[io.Image.Output("plot", tooltip="The loss plot."),
                     io.String.Output("summary", tooltip="Smoothed minima, best validation step (JSON).")],
        )

    @classmethod
    def execute(cls, smoothing, run=None, history_json="") -> io.NodeOutput:
        img, info = plot.loss_plot(history.history_from(run, history_json), smoothing)
        t = imaging.to_tensor(img)
        summary = {k: info[k] for k in ("smoothed_minima_steps", "val", "val_minima_steps", "best_val_step",
                                         "non_finite_loss_steps")}
        summary["steps"] = len(info["steps"])
        return io.NodeOutput(t, json.dumps(summary), ui=ui.PreviewImage(t, cls=cls))


NODES = [SamplePreview, PreviewPlan, ABCompare, CheckpointGrid, LossGraph]
