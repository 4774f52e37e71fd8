"""Sampling through ComfyUI's own sampler path: previews, preview plans for training, A/B, checkpoint grids."""
