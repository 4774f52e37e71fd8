"""Nodes: dataset tools from the kohya LoRA guide (Clean Dataset, VAE Round-Trip). See docs/dataset_tools.md."""
from __future__ import annotations

import json

import comfy.model_management as mm
from comfy_api.latest import io

from ..aligned_trainer import imaging
from ..aligned_trainer.data import cache, cleaning, vae_roundtrip
from ._common import NodeProgress, category, node_id
from .data import DATASET

CAT = category("Data")


class CleanDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("CleanDataset"), display_name="Clean Dataset (anti-AI filters)", category=CAT,
            description="Re-filters every image into a cleaned copy in the cache (your files are never written) to "
                        "remove anti-AI noise, dithering and fine repeating motifs, and flags suspect images. "
                        "Softens real fine detail too: compare before/after.",
            inputs=[
                DATASET.Input("dataset", tooltip="From the Dataset node; its captions, buckets and repeats are kept."),
                io.Combo.Input("method", options=list(cleaning.METHODS), default="bilateral+jpeg",
                               tooltip="bilateral+jpeg: edge-preserving smoothing, then a JPEG re-encode (the guide's "
                                       "filtering pass; the usual choice). median: strongest against speckle and "
                                       "dithering. gaussian: plain blur (softens edges too). jpeg: re-encode only, the "
                                       "mildest."),
                io.Int.Input("kernel", default=5, min=3, max=15, step=2,
                             tooltip="Filter window in pixels (odd). 3 is mild, 5 usual, 7+ visibly soft."),
                io.Float.Input("sigma_color", default=0.2, min=0.01, max=1.0, step=0.01,
                               tooltip="Bilateral: brightness differences (0-1) still smoothed. 0.1 is gentle, 0.2 "
                                       "removes +-5 % noise and keeps strong edges, 0.3+ smooths texture too."),
                io.Float.Input("sigma_space", default=1.5, min=0.1, max=10.0, step=0.1,
                               tooltip="Bilateral/gaussian: spatial reach in pixels (1-2 usual)."),
                io.Int.Input("jpeg_quality", default=90, min=10, max=100,
                             tooltip="Quality of the JPEG-style re-encode (methods with jpeg): 85-95 removes the "
                                     "finest noise with little visible change."),
                io.Int.Input("preview_rows", default=8, min=1, max=64,
                             tooltip="Images shown before/after in the grid, most suspect first."),
            ],
            outputs=[DATASET.Output("cleaned", tooltip="The dataset reading the cleaned copies (for Cache Latents)."),
                     io.String.Output("report", tooltip="Per image: detector scores before and after, and why it is "
                                                        "suspect; copies written and reused."),
                     io.Image.Output("before_after", tooltip="Original | cleaned | difference x4, most suspect first.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, dataset, method, kernel, sigma_color, sigma_space, jpeg_quality, preview_rows) -> io.NodeOutput:
        cfg = cleaning.CleanConfig(method, kernel, sigma_color, sigma_space, jpeg_quality)
        cfg.validate()
        prog = NodeProgress(len(dataset.items), cls.hidden.unique_id)
        out, rep = cleaning.clean_dataset(dataset, cfg, cache.default_cache_root() / "cleaned",
                                          progress=lambda n, t: (mm.throw_exception_if_processing_interrupted(),
                                                                 prog(n, f"cleaned {n}/{t}")))
        rows = cleaning.preview_rows(dataset, out, rep, preview_rows)
        return io.NodeOutput(out, json.dumps(rep, indent=1),
                             imaging.rows_grid(rows, ["original", "cleaned", "difference"]))


class VAERoundTrip(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("VAERoundTrip"), display_name="VAE Round-Trip", category=CAT,
            description="Encodes and decodes every dataset image with the VAE, as training sees it, and reports PSNR "
                        "and SSIM worst first: a LoRA learns the decoded image, so detail the VAE loses cannot be "
                        "learned with it. Try another VAE (and train with it in Cache Latents) if many are flagged.",
            inputs=[DATASET.Input("dataset", tooltip="From the Dataset (or Clean Dataset) node."),
                    io.Vae.Input("vae", tooltip="Any VAE ComfyUI loads: the model's own, or one you consider "
                                                "training with (connect the same VAE to Cache Latents)."),
                    io.Int.Input("preview_rows", default=8, min=1, max=64,
                                 tooltip="Images shown in the grid, worst first.")],
            outputs=[io.String.Output("report", tooltip="Per image: PSNR (dB), SSIM and flags, worst first."),
                     io.Image.Output("grid", tooltip="Original | decoded | difference x4, worst first.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, dataset, vae, preview_rows) -> io.NodeOutput:
        n = sum(1 for i in dataset.items if not i.flip)
        prog = NodeProgress(n, cls.hidden.unique_id)
        rows = vae_roundtrip.roundtrip(dataset, vae, progress=lambda k, t: prog(k, f"round-trip {k}/{t}"),
                                       interrupted=mm.throw_exception_if_processing_interrupted)
        return io.NodeOutput(json.dumps(vae_roundtrip.report(rows), indent=1),
                             imaging.rows_grid(vae_roundtrip.preview_rows(rows, preview_rows),
                                               ["original", "decoded", "difference"]))


NODES = [CleanDataset, VAERoundTrip]
