"""Node: Load LoRA (aligned): the stock LoRA loader plus the text-encoder recipe the LoRA was trained with.
See docs/text_encoders.md."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..aligned_trainer.sampling import lora_recipe
from ._common import category, node_id

CAT = category("Text Encoders")


class LoadLoraAligned(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("LoadLoraAligned"), display_name="Load LoRA (aligned)", category=CAT,
            description="Applies a LoRA like the stock Load LoRA node and returns a CLIP aligned to the text-encoder "
                        "spec and prompt syntax recorded in the LoRA (Aligned Trainer LoRAs record them). Warns when "
                        "the base model or the CLIP's family differs from the recorded one.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the LoRA was trained for."),
                io.Clip.Input("clip", tooltip="Its CLIP (aligned or not: the recorded recipe decides)."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A LoRA file from models/loras."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="LoRA strength on the model (usually 0-1)."),
                io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="LoRA strength on the text encoders (usually 0-1)."),
            ],
            outputs=[io.Model.Output("lora_model", tooltip="The model with the LoRA applied."),
                     io.Clip.Output("aligned_clip", tooltip="The CLIP with the LoRA applied, aligned as recorded in the LoRA."),
                     io.String.Output("info", tooltip="The recorded recipe and any mismatch warnings.")],
        )

    @classmethod
    def execute(cls, model, clip, lora_name, strength_model, strength_clip) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        done = lora_recipe.apply(model, clip, path, strength_model, strength_clip)
        text = done.report()
        return io.NodeOutput(done.model, done.clip, text, ui={"text": [text]})


NODES = [LoadLoraAligned]
