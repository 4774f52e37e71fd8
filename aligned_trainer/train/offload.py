"""Block offload (Train Init ``offload_blocks``): the weights of the last N blocks of the diffusion model live on
the offload device (pinned CPU memory on CUDA) and are streamed to the training device for each forward,
including a gradient-checkpointing recomputation in backward; after a block runs its device copy is dropped.
On CUDA the next offloaded block is copied on a side stream while the current one computes (overlapped
copies); elsewhere the same code path copies synchronously, so it also runs (and is tested) on the CPU, where
the offload device is the training device.

The memory saved is the offloaded blocks' weights minus one or two blocks in flight. Without gradient
checkpointing autograd keeps each block's device weights alive until backward (they are saved for the input
gradient), so offload needs ``gradient_checkpointing`` to save memory; Train Init's memory plan counts it so.

Like the trainer's other hooks this is a scope: the blocks' own parameters are restored on exit."""
from __future__ import annotations

import contextlib

import torch


class _Streamer:
    def __init__(self, blocks: list[torch.nn.Module], device: torch.device, offload_device: torch.device):
        self.device = torch.device(device)
        self.blocks = blocks
        self.index = {id(b): i for i, b in enumerate(blocks)}
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.host: list[dict[str, torch.Tensor]] = []      # per block: name -> offload-device tensor
        self.ready: dict[int, tuple[dict, object]] = {}    # prefetched copies (and their event)
        for b in blocks:
            host = {}
            for name, p in _tensors(b):
                t = p.detach().to(offload_device)
                if self.cuda and t.device.type == "cpu" and type(t) is torch.Tensor:
                    t = t.pin_memory()
                host[name] = t
            self.host.append(host)

    def _copy(self, i: int) -> dict[str, torch.Tensor]:
        # quantized weights (quanto tensor subclasses) move with a plain .to(): some of them (the int4 layout
        # for bf16) fail on copy=True; on one device they are then shared rather than copied
        return {n: t.to(self.device, non_blocking=self.cuda, copy=True) if type(t) is torch.Tensor else
                t.to(self.device) for n, t in self.host[i].items()}

    def prefetch(self, i: int) -> None:
        if i >= len(self.blocks) or i in self.ready:
            return
        if self.cuda:
            with torch.cuda.stream(self.stream):
                copies = self._copy(i)
                event = torch.cuda.Event()
                event.record(self.stream)
            self.ready[i] = (copies, event)

    def before(self, block):
        i = self.index[id(block)]
        if i in self.ready:
            copies, event = self.ready.pop(i)
            torch.cuda.current_stream(self.device).wait_event(event)
            for t in copies.values():
                _record_stream(t, torch.cuda.current_stream(self.device))
        else:
            copies = self._copy(i)
        _assign(block, copies)
        self.prefetch(i + 1)

    def after(self, block):
        _assign(block, self.host[self.index[id(block)]])


def _record_stream(t: torch.Tensor, stream) -> None:
    """Mark ``t``'s memory as used by ``stream``; a quantized weight (a quanto tensor subclass, which would answer
    ``record_stream`` by dequantizing into a temporary) marks its inner tensors instead."""
    if type(t) is torch.Tensor or not hasattr(t, "__tensor_flatten__"):
        t.record_stream(stream)
        return
    for name in t.__tensor_flatten__()[0]:
        _record_stream(getattr(t, name), stream)


def _tensors(block: torch.nn.Module):
    for mname, m in block.named_modules():
        for pname, p in m._parameters.items():
            if p is not None:
                yield f"{mname}.{pname}" if mname else pname, p


def _assign(block: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        mname, _, pname = name.rpartition(".")
        m = block.get_submodule(mname) if mname else block
        m._parameters[pname] = torch.nn.Parameter(t, requires_grad=False)


def units(checkpoint_units: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """What is streamed: each checkpoint unit, except that a UNet block (``TimestepEmbedSequential``, run by
    ComfyUI's ``forward_timestep_embed`` layer by layer, never by its own forward) contributes its layers."""
    from comfy.ldm.modules.diffusionmodules import openaimodel

    out = []
    for u in checkpoint_units:
        if isinstance(u, openaimodel.TimestepEmbedSequential):
            out += [c for c in u if any(True for _ in c.parameters())]
        else:
            out.append(u)
    return out


class Offloaded:
    """Handle of an offload scope: ``pause()`` puts the blocks' own parameters back on their device (the wrapped
    forwards then pass through), ``resume()`` offloads them again."""

    def __init__(self, blocks, device, offload_device):
        self.blocks = blocks
        self.originals = [dict(_tensors(b)) for b in blocks]
        self.homes = [{n: p.device for n, p in orig.items()} for orig in self.originals]
        self.streamer = _Streamer(blocks, device, offload_device)
        self.active = False

    def resume(self) -> None:
        s = self.streamer
        for b, orig, host in zip(self.blocks, self.originals, s.host):
            for n, p in orig.items():  # the blocks' own parameters give up their device memory
                p.data = host[n]
            _assign(b, host)
        self.active = True

    def pause(self) -> None:
        self.active = False
        self.streamer.ready.clear()
        for b, orig, home in zip(self.blocks, self.originals, self.homes):
            for name, p in orig.items():
                p.data = p.data.to(home[name])
                mname, _, pname = name.rpartition(".")
                (b.get_submodule(mname) if mname else b)._parameters[pname] = p


@contextlib.contextmanager
def offloaded(blocks: list[torch.nn.Module], device, offload_device):
    """Inside: ``blocks`` keep their weights on ``offload_device`` and get device copies for each call of their
    ``forward`` (wrapped, so a gradient-checkpointing recomputation, which calls the forward it was given,
    streams them in again). Enter this before ``loop.checkpointed_blocks``. Yields an :class:`Offloaded`."""
    h = Offloaded(blocks, device, offload_device)
    wrapped = []
    try:
        for b in blocks:
            wrapped.append((b, "forward" in b.__dict__, b.__dict__.get("forward")))
            b.forward = _streamed(b, b.forward, h)
        h.resume()
        yield h
    finally:
        h.pause()
        for b, had, fwd in wrapped:
            if had:
                b.forward = fwd
            else:
                del b.forward


def _streamed(block, fwd, h: Offloaded):
    def call(*args, **kwargs):
        if not h.active:
            return fwd(*args, **kwargs)
        h.streamer.before(block)
        try:
            return fwd(*args, **kwargs)
        finally:
            h.streamer.after(block)
    return call


def block_bytes(blocks: list[torch.nn.Module]) -> list[int]:
    return [sum(p.numel() * p.element_size() for _, p in _tensors(b)) for b in blocks]
