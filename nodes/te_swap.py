"""Nodes: text-encoder swap (Text Encoder Swap Setup, Save / Load / Apply Text Encoder Swap). See docs/te_swap.md."""
from __future__ import annotations

import json

from comfy_api.latest import io

from ..aligned_trainer.te import specs
from ..aligned_trainer.train import loop
from ..aligned_trainer.train import te_swap as engine
from ..aligned_trainer.train import te_swap_files as swap_files
from ..aligned_trainer.train import te_swap_pooled, te_swap_reset
from ._common import category, node_id

CAT = category("Text Encoder Swap")
TE_SWAP = io.Custom("AT_TE_SWAP")
DATASET = io.Custom("AT_DATASET")
TRAIN_RUN = io.Custom("AT_TRAIN_RUN")


def _spec_input(name: str, tooltip: str):
    return io.Combo.Input(name, options=[engine.AS_CONNECTED, "auto", *specs.list_spec_ids()],
                          default=engine.AS_CONNECTED, tooltip=tooltip)


class TextEncoderSwapSetup(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("TextEncoderSwapSetup"), display_name="Text Encoder Swap Setup", category=CAT,
            description="Prepares a UNet (SD1.5, SDXL) to be retrained on another text encoder (e.g. T5): measures "
                        "both encoders' per-token spread on the dataset's captions, adds a projection scaled to the "
                        "old encoder's spread, and resets the chosen attention layers (as patches; the loaded "
                        "model is not changed). Train the MODEL with Train Init (LoRA Config algorithm 'full').",
            inputs=[
                io.Model.Input("model", tooltip="The UNet model to retrain (SD1.5 or SDXL checkpoint's MODEL)."),
                io.Clip.Input("new_clip", tooltip="The new text encoder (e.g. T5-XXL from CLIPLoader). Cache the "
                                                  "training captions with the same encoder."),
                _spec_input("new_spec", "Align the new encoder to this spec first (e.g. sd3 or flux1-dev for a T5); "
                                        "as_connected: use it as connected (already aligned)."),
                io.Clip.Input("old_clip", tooltip="The encoder the model was trained with (its checkpoint's CLIP): "
                                                  "its spread on the captions is the target."),
                _spec_input("old_spec", "Align the old encoder to this spec first (sd15 for SD1.5, sdxl for SDXL); "
                                        "as_connected: use it as connected."),
                DATASET.Input("dataset", tooltip="From Dataset: its distinct captions (at most 64, evenly spread "
                                                 "over them sorted) are encoded by both encoders to measure their "
                                                 "spread."),
                io.Combo.Input("reset", options=list(te_swap_reset.RESET_MODES), default="cross_attention",
                               tooltip="Layers re-initialised (PyTorch's default Linear init, as first trained): "
                                       "cross_attention (attn2 q/k/v/out; the seed's useful mode at lr 1e-5), qk "
                                       "(attn2 q/k only), all_attention (attn1 + attn2; needs ~5e-5, more data and "
                                       "steps), none."),
                io.Combo.Input("projection", options=list(engine.PROJECTIONS), default="linear",
                               tooltip="linear: one Linear from the new width to the UNet's context width; mlp: "
                                       "Linear-GELU-Linear."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the projection's and the reset layers' initial weights."),
                io.Combo.Input("pooled", options=list(te_swap_pooled.POOLED), default="zero", optional=True,
                               tooltip="SDXL only (a UNet that reads a pooled text vector): zero gives it a zero "
                                       "vector; projected gives it the new encoder's own pooled vector (its pooled "
                                       "output, or the mean of its valid token states for T5) through a trainable "
                                       "Linear scaled to the old encoder's pooled spread. Refused on SD1.5."),
            ],
            outputs=[io.Model.Output("swap_model", tooltip="The model with the reset layers and the swap attached: "
                                                           "connect to Train Init."),
                     TE_SWAP.Output("swap", tooltip="The untrained projection (for Apply Text Encoder Swap)."),
                     io.String.Output("info", tooltip="Measured spreads (old, new, projected) and the output scale.")],
        )

    @classmethod
    def execute(cls, model, new_clip, new_spec, old_clip, old_spec, dataset, reset, projection,
                seed, pooled="zero") -> io.NodeOutput:
        out, swap = engine.setup_from_dataset(model, new_clip, old_clip, dataset, reset, projection, seed,
                                              new_spec, old_spec, pooled)
        text = swap.report()
        return io.NodeOutput(out, swap, text, ui={"text": [text]})


class SaveTextEncoderSwap(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("SaveTextEncoderSwap"), display_name="Save Text Encoder Swap", category=CAT,
            description="Writes the retrained UNet (unet_format diff: its changed weights as .diff keys that the stock "
                        "Load LoRA nodes apply to the original checkpoint, into the loras folder; full: the whole "
                        "diffusion model for the stock Load Diffusion Model node, into models/diffusion_models) and "
                        "the trained projection into models/te_projections, under one name.",
            inputs=[TRAIN_RUN.Input("run", tooltip="The trained run (its MODEL came from Text Encoder Swap Setup)."),
                    io.String.Input("name", default="my_te_swap",
                                    tooltip="File name (no folders, no '..', at most 120 characters)."),
                    io.Combo.Input("dtype", options=["fp32", "fp16", "bf16"], default="fp32",
                                   tooltip="Stored precision of the UNet differences with unet_format diff (fp32 "
                                           "reloads exactly); full keeps the base's dtype."),
                    io.Boolean.Input("use_ema", default=True,
                                     tooltip="Save the EMA-averaged weights when the run keeps an EMA."),
                    io.Combo.Input("if_exists", options=["new_name", "overwrite"], default="new_name",
                                   tooltip="When the files exist: new_name ('<name>_2', ...) or overwrite."),
                    io.Combo.Input("unet_format", options=list(swap_files.UNET_FORMATS), default="diff",
                                   tooltip="diff: only the changed weights (reset + trained differences, about 80 MB "
                                           "for SD1.5 cross-attention in fp32), in the loras folder: Load "
                                           "LoRA (model only, strength 1) on the original checkpoint. full: the "
                                           "whole retrained UNet in the base's dtype (SD1.5 ~1.7 GB fp16, SDXL ~5 "
                                           "GB), in models/diffusion_models: Load Diffusion Model (UNETLoader) "
                                           "alone. full refuses a quantized (fp8, GGUF) base.")],
            outputs=[io.String.Output("unet_file", tooltip="The UNet file: in the loras folder (diff: Load LoRA, model "
                                                           "only, strength 1, on the original checkpoint) or in "
                                                           "diffusion_models (full: Load Diffusion Model)."),
                     io.String.Output("projection_file", tooltip="The projection file (Load Text Encoder Swap)."),
                     TE_SWAP.Output("swap", tooltip="The trained projection (for Apply Text Encoder Swap).")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, run, name, dtype, use_ema, if_exists, unet_format="diff") -> io.NodeOutput:
        unet, proj, swap = swap_files.save(run, name, loop.DTYPES[dtype], use_ema, if_exists, unet_format=unet_format)
        text = json.dumps({"unet_file": unet, "projection_file": proj, "unet_format": unet_format, **swap.record()})
        return io.NodeOutput(unet, proj, swap, ui={"text": [text]})


class LoadTextEncoderSwap(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("LoadTextEncoderSwap"), display_name="Load Text Encoder Swap", category=CAT,
            description="Reads a projection written by Save Text Encoder Swap (models/te_projections).",
            inputs=[io.Combo.Input("projection_name", options=swap_files.projection_files(),
                                   tooltip="A projection file from models/te_projections.")],
            outputs=[TE_SWAP.Output("swap", tooltip="The projection (for Apply Text Encoder Swap).")],
        )

    @classmethod
    def execute(cls, projection_name) -> io.NodeOutput:
        swap = swap_files.load_projection_named(projection_name)
        return io.NodeOutput(swap, ui={"text": [swap.report()]})


class ApplyTextEncoderSwap(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("ApplyTextEncoderSwap"), display_name="Apply Text Encoder Swap", category=CAT,
            description="Turns the new encoder's CONDITIONING into the retrained UNet's context (projection and "
                        "scale), for stock samplers.",
            inputs=[io.Conditioning.Input("conditioning", tooltip="A prompt encoded by the new text encoder."),
                    TE_SWAP.Input("swap", tooltip="From Save or Load Text Encoder Swap (trained), or the Setup "
                                                  "(untrained).")],
            outputs=[io.Conditioning.Output("projected", tooltip="Conditioning for the swapped UNet's sampler.")],
        )

    @classmethod
    def execute(cls, conditioning, swap) -> io.NodeOutput:
        return io.NodeOutput(swap.module().project(conditioning))


NODES = [TextEncoderSwapSetup, SaveTextEncoderSwap, LoadTextEncoderSwap, ApplyTextEncoderSwap]
