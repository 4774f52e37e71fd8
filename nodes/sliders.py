"""Nodes: concept sliders (Slider Prompts feeds Train Init; Slider Sweep previews strengths). See docs/sliders.md."""
from __future__ import annotations

import json

from comfy_api.latest import io, ui

from ..aligned_trainer.sampling import plans, slider_sweep
from ..aligned_trainer.train import slider
from ._common import NodeProgress, category, node_id
from .sampling import NEGATIVE, TRAIN_RUN, sampler_inputs, settings

TRAINING_SET = io.Custom("AT_TRAINING_SET")


class SliderPrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("SliderPrompts"), display_name="Slider Prompts", category=category("Training"),
            description="A concept slider (LECO) from prompts alone, no images: the LoRA at +strength moves the "
                        "target prompt's prediction toward positive, at -strength toward negative; the anchor "
                        "prompt stays as the base model draws it. Connect to Train Init's training_set.",
            inputs=[
                io.Model.Input("model", tooltip="The model the slider is trained for (gives the latent shape)."),
                io.Clip.Input("clip", tooltip="The aligned CLIP (Load Aligned Text Encoders): prompts are encoded "
                                              "once, read literally as captions are."),
                io.String.Input("target", default="a photo of a person",
                                tooltip="What the slider acts on (the prompt it is trained on), e.g. 'a photo of a "
                                        "person'."),
                io.String.Input("positive", default="a photo of a smiling person",
                                tooltip="The +strength end: the target with the concept, e.g. 'a photo of a smiling "
                                        "person'."),
                io.String.Input("negative", default="a photo of a frowning person",
                                tooltip="The -strength end: the target with the opposite concept."),
                io.String.Input("anchor", default="", tooltip="Optional prompt that must not change (e.g. 'a photo'); "
                                                              "empty: no anchor loss."),
                io.Float.Input("guidance_scale", default=1.0, min=-20.0, max=20.0, step=0.1,
                               tooltip="How far each end lies from the target: target + scale x (positive - "
                                       "negative). 1-4 is usual (ai-toolkit/LECO)."),
                io.Float.Input("anchor_weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Weight of the anchor loss (0 = off); only with an anchor prompt."),
                io.Float.Input("strength", default=1.0, min=0.01, max=10.0, step=0.05,
                               tooltip="LoRA strength at which the positive end is trained (the negative end at "
                                       "minus it). 1.0 is usual."),
                io.Boolean.Input("bidirectional", default=True,
                                 tooltip="Also train the negative end at -strength (a two-way slider); off: only "
                                         "+strength (LECO's one-way enhance)."),
                io.Int.Input("width", default=512, min=8, max=4096, step=8,
                             tooltip="Training resolution width in pixels (SD1.5 512, SDXL/FLUX 1024)."),
                io.Int.Input("height", default=512, min=8, max=4096, step=8, tooltip="Training resolution height."),
                io.Int.Input("denoise_steps", default=4, min=0, max=1000,
                             tooltip="Base-model steps from pure noise to each drawn noise level, making the noisy "
                                     "latent the slider trains at (0: pure noise; 4-10 usual; each costs a forward)."),
                io.Float.Input("denoise_cfg", default=3.0, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG of those steps (target vs empty prompt); 3 is usual, 1 for "
                                       "guidance-distilled models (FLUX dev)."),
            ],
            outputs=[TRAINING_SET.Output("training_set", tooltip="For Train Init's training_set (no images).")],
        )

    @classmethod
    def execute(cls, model, clip, target, positive, negative, anchor, guidance_scale, anchor_weight, strength,
                bidirectional, width, height, denoise_steps, denoise_cfg) -> io.NodeOutput:
        cfg = slider.SliderConfig(target, positive, negative, anchor, guidance_scale, anchor_weight, strength,
                                  bidirectional, width, height, denoise_steps, denoise_cfg)
        return io.NodeOutput(slider.prompt_set(cfg, model, clip))


class SliderSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("SliderSweep"), display_name="Slider Sweep", category=category("Sampling"),
            description="Samples prompts (rows) with a trained slider LoRA at several strengths (columns, e.g. -2 "
                        "... +2) through ComfyUI's LoRA loader and sampler, one seed everywhere.",
            inputs=[TRAIN_RUN.Input("run", tooltip="The trained slider run (Train Steps' trained_run)."),
                    io.Clip.Input("clip", tooltip="CLIP to encode the prompts (the aligned one)."),
                    io.Vae.Input("vae", tooltip="VAE to decode."),
                    io.String.Input("prompts", multiline=True, default="a photo of a person",
                                    tooltip="One prompt per line; each becomes a row (the slider's target prompt "
                                            "first)."),
                    io.String.Input("strengths", default="-2, -1, 0, 1, 2",
                                    tooltip="LoRA strengths, comma-separated; each becomes a column (0 = the base "
                                            "model)."),
                    NEGATIVE, *sampler_inputs()],
            outputs=[io.Image.Output("grid", tooltip="Prompts x strengths."),
                     io.String.Output("columns", tooltip="The strengths of the columns (JSON).")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, run, clip, vae, prompts, strengths, negative, **kw) -> io.NodeOutput:
        ws = slider_sweep.parse_strengths(strengths)
        g, _ = slider_sweep.sweep(run, clip, vae, plans.prompt_list(prompts), ws, negative, settings(kw),
                                  NodeProgress(len(ws)))
        return io.NodeOutput(g, json.dumps(ws), ui=ui.PreviewImage(g, cls=cls))


NODES = [SliderPrompts, SliderSweep]
