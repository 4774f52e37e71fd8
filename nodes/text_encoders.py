"""Nodes: aligned text encoders (load/align, alignment report, token inspector). See docs/text_encoders.md."""
from __future__ import annotations

import json

from comfy_api.latest import io

from ..aligned_trainer import imaging
from ..aligned_trainer.te import align, inspect, specs, syntax
from ._common import category, node_id

CAT = category("Text Encoders")


class LoadAlignedTextEncoders(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("LoadAlignedTextEncoders"), display_name="Load Aligned Text Encoders", category=CAT,
            description="Wraps a CLIP so its tokenizer and encoders follow the model family's official usage "
                        "(te_specs/). Use the aligned CLIP for training and sampling; keep the unaligned one for A/B.",
            inputs=[
                io.Clip.Input("clip", tooltip="A CLIP from any ComfyUI loader (checkpoint, CLIPLoader, DualCLIPLoader...)."),
                io.Combo.Input("spec", options=["auto", *specs.list_spec_ids()], default="auto",
                               tooltip="Text-encoder spec. 'auto' detects the family from the CLIP's tokenizer; "
                                       "pick a family or family:variant (e.g. flux1-schnell, sd3:diffusers) to override."),
                io.Combo.Input("prompt_syntax", options=list(syntax.SYNTAXES), default=syntax.LITERAL, optional=True,
                               tooltip="How prompts are read. 'literal' (default): as written, like the official "
                                       "pipelines and trainers, so (object), \\(cat\\) and embedding:name are plain text. "
                                       "'comfyui': ComfyUI's syntax for inference prompts: (word:1.2) weights, "
                                       "((emphasis)), \\( escapes and embedding:name textual inversions. Training "
                                       "captions are always cached literally."),
            ],
            outputs=[
                io.Clip.Output("aligned_clip", tooltip="CLIP that tokenizes/encodes as the spec says."),
                io.Clip.Output("unaligned_clip", tooltip="The input CLIP unchanged (ComfyUI's default behaviour)."),
                io.String.Output("spec_json", tooltip="The spec in use, with the source of every value."),
            ],
        )

    @classmethod
    def execute(cls, clip, spec, prompt_syntax=syntax.LITERAL) -> io.NodeOutput:
        aligned = align.align_clip(clip, spec, prompt_syntax)
        text = json.dumps({**aligned.spec.raw, **aligned.aligned_trainer_spec}, indent=1, ensure_ascii=False)
        return io.NodeOutput(aligned, clip, text, ui={"text": [text]})


class TextEncoderAlignmentReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("TextEncoderAlignmentReport"), display_name="Text Encoder Alignment Report", category=CAT,
            description="Compares two CLIPs (e.g. aligned vs unaligned) on a list of prompts.",
            inputs=[
                io.Clip.Input("clip_a", tooltip="First CLIP (e.g. the aligned one)."),
                io.Clip.Input("clip_b", tooltip="Second CLIP (e.g. ComfyUI's default)."),
                io.String.Input("prompts", multiline=True, default="a photo of a cat\n\nohwx, a red circle",
                                tooltip="One prompt per line; an empty line tests the empty prompt."),
            ],
            outputs=[io.Image.Output("table", tooltip="Readable table of the comparison."),
                     io.String.Output("json", tooltip="The same figures as JSON.")],
        )

    @classmethod
    def execute(cls, clip_a, clip_b, prompts) -> io.NodeOutput:
        lines = prompts.split("\n")
        rows = inspect.compare_clips(clip_a, clip_b, lines)
        headers = ["prompt", "syntax a/b", "positions a/b", "seq cos", "min tok cos", "pooled cos", "std a/b", "pad norm",
                   "truncated a", "ComfyUI syntax changes"]
        table = [[repr(r["prompt"]), f"{r['syntax_a']}/{r['syntax_b']}", f"{r['positions_a']}/{r['positions_b']}", f"{r['seq_cosine']:.5f}",
                  f"{r['min_token_cosine']:.5f}", "-" if r["pooled_cosine"] is None else f"{r['pooled_cosine']:.5f}",
                  f"{r['std_a']:.3f}/{r['std_b']:.3f}", f"{r['extra_positions_norm']:.2f}",
                  str(sum(r["truncated_a"].values())),
                  "; ".join(r["comfyui_syntax_changes"]) or "-"] for r in rows]
        img = imaging.table_image(headers, table, title="Text encoder alignment: A vs B")
        return io.NodeOutput(img, json.dumps(rows, indent=1))


class TokenInspector(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=node_id("TokenInspector"), display_name="Token Inspector", category=CAT,
            description="Shows how each encoder splits a text and warns about trigger words and truncation.",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP whose tokenizers to inspect (aligned or not)."),
                io.String.Input("text", multiline=True, default="ohwx, a photo of a dog",
                                tooltip="A caption or prompt to split into tokens."),
                io.String.Input("trigger_word", default="ohwx",
                                tooltip="Trigger word to check: warns when it splits into several pieces or is an ordinary word."),
            ],
            outputs=[io.String.Output("report", tooltip="Pieces and ids per encoder, then warnings."),
                     io.String.Output("json", tooltip="The same as JSON.")],
        )

    @classmethod
    def execute(cls, clip, text, trigger_word) -> io.NodeOutput:
        rep = inspect.inspect_text(clip, text, trigger_word)
        lines = []
        for name, e in rep["encoders"].items():
            lines.append(f"[{name}] {e['content_tokens']} tokens, {e['positions']} positions, {e['chunks']} chunk(s)")
            lines.append("  " + " | ".join(f"{p}:{i}" for p, i in zip(e["pieces"], e["ids"])))
            if trigger_word:
                lines.append(f"  trigger pieces: {e.get('trigger_pieces')}")
        syn = rep["syntax"]
        if syn["syntax"] == "comfyui":
            lines.append("prompt syntax: comfyui; it changed: " + ("; ".join(syn["changes"]) or "nothing"))
        else:
            lines.append("prompt syntax: literal (text read as written); ComfyUI's syntax would change: "
                         + ("; ".join(syn["comfyui_would"]) or "nothing"))
        lines += [f"WARNING: {w}" for w in rep["warnings"]] or ["no warnings"]
        text_out = "\n".join(lines)
        return io.NodeOutput(text_out, json.dumps(rep, indent=1), ui={"text": [text_out]})


NODES = [LoadAlignedTextEncoders, TextEncoderAlignmentReport, TokenInspector]
