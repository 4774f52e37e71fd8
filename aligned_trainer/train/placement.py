"""Where the frozen base sits while the trainer runs: quantized (``quantize``) and/or partly on the offload
device (``offload_blocks``), as Train Init asked. A scope around the training steps; suspended around previews
(which load the shared model through ComfyUI's own machinery) and restored on exit."""
from __future__ import annotations

import contextlib

from . import offload, quantize


@contextlib.contextmanager
def _quantized(trainer):
    dm = trainer.patcher.model.diffusion_model
    off_dev = trainer.patcher.offload_device if trainer.device != trainer.patcher.offload_device else None
    with quantize.quantized(dm, trainer.run.settings.quantize, off_dev) as n:
        yield n


class Placed:
    def __init__(self, trainer):
        self.trainer = trainer
        self.stack = contextlib.ExitStack()
        self.quant: contextlib.ExitStack | None = None
        self.offloaded: offload.Offloaded | None = None

    def __enter__(self):
        t = self.trainer
        n = t.run.settings.offload_blocks
        try:
            self._quantize()
            if n:
                from .loop import checkpoint_units

                blocks = offload.units(checkpoint_units(t.patcher.model.diffusion_model))[-n:]
                self.offloaded = self.stack.enter_context(
                    offload.offloaded(blocks, t.device, t.patcher.offload_device))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _quantize(self):
        self.quant = contextlib.ExitStack()
        self.quant.enter_context(_quantized(self.trainer))

    def __exit__(self, *exc):
        self.stack.close()  # offload first (it holds the quantized weights), then the quantization
        if self.quant is not None:
            self.quant.close()
            self.quant = None
        return False

    @contextlib.contextmanager
    def suspended(self):
        """The base as loaded (full weights, on its device) inside; placed again afterwards. The offload
        wrappers stay installed (gradient checkpointing wraps them) and pass through meanwhile."""
        if self.offloaded is not None:
            self.offloaded.pause()
        if self.quant is not None:
            self.quant.close()
        try:
            yield
        finally:
            self._quantize()
            if self.offloaded is not None:
                self.offloaded.resume()


def placed(trainer) -> Placed:
    return Placed(trainer)
