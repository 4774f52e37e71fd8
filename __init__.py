"""ComfyUI Aligned Trainer: LoRA training inside ComfyUI with text encoders used the way each model
family was trained.

ComfyUI loads this package through its custom-node loader and calls :func:`comfy_entrypoint`
(V3 node API). Node classes live in ``nodes/``; the engine they call lives in ``aligned_trainer/``.
"""
from comfy_api.latest import ComfyExtension

WEB_DIRECTORY = "./js"


class AlignedTrainerExtension(ComfyExtension):
    async def get_node_list(self):
        from .nodes import all_nodes, routes

        routes.register()  # the frontend's dataset picker and pre-queue check (nodes/routes.py)
        return all_nodes()


async def comfy_entrypoint() -> ComfyExtension:
    # ComfyUI 0.3.75 builds FLUX.2's tokenizer with transformers 4's MistralConverter call; adapt it to transformers 5.
    # Done here, when ComfyUI's loader registers the pack (its model management is set up by then), not at import:
    # importing comfy.text_encoders at import time would pick the torch device before ComfyUI's arguments apply.
    from .aligned_trainer.te import mistral_compat

    mistral_compat.apply()
    return AlignedTrainerExtension()
