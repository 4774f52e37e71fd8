"""Where the frozen base sits while the trainer runs: loaded on the training device through ComfyUI's memory
manager, quantized (``quantize``) and/or partly on the offload device (``offload_blocks``), as Train Init asked.
A scope around the training steps; suspended around previews (which load the shared model through ComfyUI's own
machinery) and restored on exit.

With ``quantize`` the full-precision weights of the quantized layers never reach the device together: ComfyUI's
copy of the model is first unloaded (its weights go back to the offload device), those weights are taken out of
the model (``quantize.Swapped``), ComfyUI loads the rest, and each full weight is then copied to the training
device one at a time and quantized there. The load peak is the quantized model's size, not the full one's (a
24 GB bf16 FLUX.1 on a 16 GB card). On exit (and around previews) ComfyUI unloads the model again before the
original weights are put back where they were kept, so its own bookkeeping of what is loaded stays true."""
from __future__ import annotations

import contextlib

from ..data.cache import unload_patcher
from . import offload, quantize


class Placed:
    def __init__(self, trainer):
        self.trainer = trainer
        self.stack = contextlib.ExitStack()
        self.quant: quantize.Swapped | None = None
        self.offloaded: offload.Offloaded | None = None

    @property
    def quantizing(self) -> bool:
        return self.trainer.run.settings.quantize != "none"

    def __enter__(self):
        t = self.trainer
        n = t.run.settings.offload_blocks
        try:
            self._place()
            if n:
                from .loop import checkpoint_units

                blocks = offload.units(checkpoint_units(t.patcher.model.diffusion_model))[-n:]
                self.offloaded = self.stack.enter_context(
                    offload.offloaded(blocks, t.device, t.patcher.offload_device))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _place(self):
        """Quantize (around the load) if asked, and load through ComfyUI's memory manager."""
        t = self.trainer
        if self.quantizing:
            unload_patcher(t.patcher)  # the full weights go back to the offload device first
            # layers whose weight ComfyUI patches (LoRAs applied before training) or that carry a weight-side
            # adapter stay as loaded: their weight is computed at load or per call
            skip = {k[len("diffusion_model."):-len(".weight")] for k in (*t.patcher.patches, *t.patcher.weight_wrapper_patches)
                    if k.startswith("diffusion_model.") and k.endswith(".weight")}
            self.quant = quantize.Swapped(t.patcher.model.diffusion_model, t.run.settings.quantize, skip)
        t.load()
        if self.quant is not None:
            self.quant.quantize(t.device)

    def _unplace(self):
        if self.quant is not None:
            self.quant.unquantize()  # ComfyUI's unload moves the model without the quantized weights ...
            unload_patcher(self.trainer.patcher)
            self.quant.restore()  # ... then the originals go back in, where they were kept
            self.quant = None

    def __exit__(self, *exc):
        self.stack.close()  # offload first (it holds the quantized weights), then the quantization
        self._unplace()
        return False

    @contextlib.contextmanager
    def suspended(self):
        """The base as the user loaded it inside (full weights; previews load it through ComfyUI's own
        machinery); placed and loaded for training again afterwards. The offload wrappers stay installed
        (gradient checkpointing wraps them) and pass through meanwhile."""
        if self.offloaded is not None:
            self.offloaded.pause()
        self._unplace()
        try:
            yield
        finally:
            self._place()
            if self.offloaded is not None:
                self.offloaded.resume()


def placed(trainer) -> Placed:
    return Placed(trainer)
