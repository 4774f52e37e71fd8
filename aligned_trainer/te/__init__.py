"""Aligned text encoders: te_specs loading/validation, applying a spec to a ComfyUI CLIP, and
inspection/report tools."""
