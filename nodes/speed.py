"""Nodes: Speed Options (how a training step is computed; train/speed.py). See docs/training.md."""
from __future__ import annotations

from comfy_api.latest import io

from ..aligned_trainer.train import speed as speed_mod
from ._common import category, node_id

CAT = category("Training")
SPEED = io.Custom("AT_SPEED")


class SpeedOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("SpeedOptions"), display_name="Speed Options", category=CAT,
            description="How a training step is computed (not what it computes): each option gives the same LoRA "
                        "within float rounding. Connect to Train Init; without it every option is off. See "
                        "docs/training.md.",
            inputs=[
                io.Combo.Input("optimizer_impl", options=list(speed_mod.OPTIMIZER_IMPLS), default="default",
                               tooltip="How AdamW updates the LoRA (same result): default (torch's choice: "
                                       "foreach on a GPU, one tensor at a time on the CPU), foreach (a few "
                                       "multi-tensor kernels per step), fused (one fused kernel; fewest launches on "
                                       "a GPU). AdamW only: other optimizers keep their own code, as Train Init "
                                       "says. A run may switch it on resume."),
                io.Boolean.Input("channels_last", default=False,
                                 tooltip="Run UNet convolutions in channels-last (NHWC) memory layout, which GPU "
                                         "tensor cores prefer (same result). SD1.5/SDXL; on a model without 2-D "
                                         "convolutions (FLUX) it changes nothing, as Train Init says. The model is "
                                         "back in its usual layout after Train Steps."),
                io.Combo.Input("lora_math", options=list(speed_mod.LORA_MATH), default="activation",
                               tooltip="activation (default): the LoRA adds up(down(x)) beside each layer, no weight "
                                       "copy. merged: each LoRA/LoCon layer computes with W + up @ down, built at "
                                       "each forward; meant for layers that see many tokens (large batches or "
                                       "resolutions; a GPU measurement decides), keeps a weight-sized tensor per "
                                       "layer for backward instead of the LoRA's per-token ones. Not with "
                                       "network_dropout, rank_dropout or quantize (Train Init refuses them)."),
                io.Combo.Input("attention", options=list(speed_mod.ATTENTION), default="comfy", optional=True,
                               tooltip="The attention kernel while training: comfy (ComfyUI's choice: PyTorch SDPA "
                                       "on GPUs, chunked on a CPU); pytorch, sub_quad, split, or flash/sage/xformers "
                                       "when installed (ComfyUI's functions); sdpa_flash/sdpa_efficient/sdpa_cudnn/"
                                       "sdpa_math hold PyTorch's SDPA to one kernel. Same math; speed and memory "
                                       "differ. Train Init refuses one this machine lacks."),
            ],
            outputs=[SPEED.Output("speed", tooltip="For Train Init.")],
        )

    @classmethod
    def execute(cls, optimizer_impl, channels_last, lora_math, attention="comfy") -> io.NodeOutput:
        cfg = speed_mod.SpeedConfig(optimizer_impl, channels_last, lora_math, attention)
        cfg.validate()
        return io.NodeOutput(cfg)


NODES = [SpeedOptions]
