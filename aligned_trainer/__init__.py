"""Engine of ComfyUI Aligned Trainer.

Imports ComfyUI's model code (``comfy``) and ``folder_paths`` where needed, never the node API
(``comfy_api``) or the server. Only relative imports inside the package: ComfyUI loads the pack under a
path-derived module name.
"""
