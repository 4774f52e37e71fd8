"""Node: A/B Training Report (aligned vs unaligned text encoders: both validation-loss curves on one chart, a
LoRA x CLIP sample grid, and the two runs' recorded configs). See docs/text_encoders.md."""
from __future__ import annotations

import json

from comfy_api.latest import io, ui

from ..aligned_trainer.sampling import ab_training
from .sampling import NEGATIVE, TRAIN_RUN, sampler_inputs, settings
from ._common import category, node_id

CAT = category("Sampling")


class ABTrainingReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("ABTrainingReport"), display_name="A/B Training Report", category=CAT,
            description="Compares two training runs on the same data and seed, one trained with the aligned and one "
                        "with the unaligned text encoders: validation loss of both on one chart, a sample grid "
                        "(rows: A LoRA + A CLIP, B LoRA + B CLIP, then the crossed pairs) and the recorded configs.",
            inputs=[TRAIN_RUN.Input("run_a", tooltip="Run A (e.g. trained with the aligned CLIP)."),
                    TRAIN_RUN.Input("run_b", tooltip="Run B (e.g. trained with the unaligned CLIP)."),
                    io.Model.Input("model_a", tooltip="Model with LoRA A (Train Steps' model output)."),
                    io.Model.Input("model_b", tooltip="Model with LoRA B."),
                    io.Clip.Input("clip_a", tooltip="CLIP of A (aligned)."),
                    io.Clip.Input("clip_b", tooltip="CLIP of B (unaligned)."),
                    io.Vae.Input("vae", tooltip="VAE to decode."),
                    io.String.Input("prompts", multiline=True, default="ohwx, a photo",
                                    tooltip="One prompt per line; each becomes a column."),
                    NEGATIVE, *sampler_inputs(),
                    io.String.Input("label_a", default="aligned", tooltip="Name of A in the chart and grid."),
                    io.String.Input("label_b", default="unaligned", tooltip="Name of B in the chart and grid.")],
            outputs=[io.Image.Output("loss_chart", tooltip="Validation loss of both runs on one chart."),
                     io.Image.Output("grid", tooltip="Rows: LoRA/CLIP pairs; columns: prompts; same seed everywhere."),
                     io.String.Output("record", tooltip="Both runs' configs and text-encoder records, and the fields "
                                                        "where they differ (JSON).")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, run_a, run_b, model_a, model_b, clip_a, clip_b, vae, prompts, negative, label_a, label_b,
                **kw) -> io.NodeOutput:
        chart, grid, rec = ab_training.report(run_a, run_b, model_a, model_b, clip_a, clip_b, vae,
                                              [p for p in prompts.split("\n") if p.strip()], negative, settings(kw),
                                              (label_a, label_b))
        text = json.dumps(rec, indent=1, default=str)
        shown = {**ui.PreviewImage(chart, cls=cls).as_dict(), "text": [text]}
        return io.NodeOutput(chart, grid, text, ui=shown)


NODES = [ABTrainingReport]
