"""Node: Token Heatmaps (DAAM). See docs/heatmaps.md."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..aligned_trainer.sampling import heatmaps
from ._common import category, node_id
from .sampling import NEGATIVE, sampler_inputs, settings

CAT = category("Sampling")


class TokenHeatmaps(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("TokenHeatmaps"), display_name="Token Heatmaps (DAAM)", category=CAT,
            description="Samples a prompt with ComfyUI's sampler and shows, per chosen word, where it acts in the "
                        "image (cross-attention maps summed over heads, layers and steps, as DAAM). Use it to see "
                        "whether a trigger word bleeds into outfit or background; compare base vs LoRA, aligned vs "
                        "default encoders. UNet models (SD1.x, SD2.x, SDXL) and DiTs (FLUX.1, Chroma, SD3, "
                        "Qwen-Image, Z-Image, Lumina 2, HiDream, HunyuanVideo 1.5, Wan; video models sample one "
                        "frame).",
            inputs=[io.Model.Input("model", tooltip="The model, with or without a LoRA."),
                    io.Clip.Input("clip", tooltip="The CLIP that encodes the prompt (aligned or default)."),
                    io.Vae.Input("vae", tooltip="VAE to decode the image."),
                    io.String.Input("prompt", multiline=True, default="ohwx, a photo of a person in a red coat",
                                    tooltip="The prompt to sample."),
                    io.String.Input("words", default="ohwx, coat",
                                    tooltip="Comma-separated words of the prompt to map (a trigger word, an outfit, "
                                            "a background): one tile each."),
                    NEGATIVE, *sampler_inputs()],
            outputs=[io.Image.Output("grid", tooltip="The image, then one heat-map tile per word."),
                     io.Mask.Output("maps", tooltip="The maps, one per word, in [0, 1] at image size."),
                     io.Image.Output("image", tooltip="The sampled image (identical to sampling without maps).")],
        )

    @classmethod
    def execute(cls, model, clip, vae, prompt, words, negative, **kw) -> io.NodeOutput:
        chosen = [w.strip() for w in words.split(",") if w.strip()]
        if not chosen:
            raise ValueError("Token Heatmaps: list at least one word of the prompt in 'words' (comma-separated).")
        image, maps = heatmaps.heatmaps(model, clip, vae, prompt, negative, chosen, settings(kw))
        grid = heatmaps.heatmap_grid(image, maps, chosen)
        return io.NodeOutput(grid, maps, image, ui=ui.PreviewImage(grid, cls=cls))


NODES = [TokenHeatmaps]
