"""Quantized base weights on request (Train Init ``quantize``): the frozen diffusion model's Linear weights
are replaced, for the duration of training, by optimum-quanto weight tensors (``qint8``: one byte per weight
and a scale per output row; ``qint4``: two weights per byte, scale and shift per group of up to 128 inputs).
The layers keep their ComfyUI class, so adapter targets, key names, hooks and ComfyUI's forward stay as they
are; quanto's tensors implement ``F.linear`` with a gradient for the input, which is all LoRA needs.

Why quanto and not torchao: docs/memory.md (measured on the tiny FLUX.1: same int8 accuracy, but torchao's
4-/6-bit weights that run on the CPU are stored unpacked, one byte per weight, and its packed int4 needs an
extra CUDA kernel package).

The model is shared with every other user (samplers, previews, other runs), so :class:`Swapped` keeps the
original weights and puts them back afterwards (train/placement.py makes it a scope around the training steps). Layers that ComfyUI casts on the fly (an fp8 model's ``manual_cast`` layers, partially loaded
layers) or that a weight-side adapter patches (LoHa, LoKr, DoRA) are left as loaded."""
from __future__ import annotations

import contextlib

import torch

from .config import ConfigError

MODES = ("none", "int8", "int4")
BITS = {"int8": 8, "int4": 4}
GROUP = 128  # quanto's group size for 4-bit weights (reduced to a divisor of the layer's width)


def _qtype(mode: str):
    from optimum.quanto import qint4, qint8

    _torch_unpack_on_cuda()
    return {"int8": qint8, "int4": qint4}[mode]


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """quanto's packed sub-byte layout read back: byte ``j`` of the packed rows holds, in its bit field ``i``,
    the value of row ``i * len(packed) + j``; plain tensor ops, so it runs on any device."""
    fields = [(packed >> (bits * i)) & ((1 << bits) - 1) for i in range(8 // bits)]
    return torch.cat(fields).to(torch.uint8)


_UNPACK_LIB = []


def _torch_unpack_on_cuda() -> None:
    """quanto registers its CUDA (and CPU) ``unpack`` as a kernel of its own C++/CUDA extension, which it compiles at
    first use with nvcc (minutes, and impossible on the many ComfyUI installs without a CUDA toolkit: an H200 run
    of ``quantize=int4`` hung there). Every 4-bit weight is unpacked once when it is created, so 4-bit training
    on a GPU would need that compiler. The op gets the same computation in plain tensor ops for CUDA instead
    (the packed 4-bit matmuls themselves are PyTorch's own tinygemm kernels, which need no compilation)."""
    if _UNPACK_LIB:
        return
    lib = torch.library.Library("quanto", "IMPL")
    for key in ("CUDA", "CPU"):  # the CPU kernel is a C++ extension compiled at first use too (g++/MSVC)
        try:
            lib.impl("unpack", unpack_bits, key, allow_override=True)
        except TypeError:  # a torch without allow_override
            lib.impl("unpack", unpack_bits, key)
    _UNPACK_LIB.append(lib)  # the registration lives as long as this object


def group_size(in_features: int) -> int | None:
    """quanto's rule for 4-bit weights: 128, lowered by 32 until it divides ``in_features``; None (per row)
    when nothing does or the layer is narrower."""
    g = GROUP
    if in_features <= g:
        return None if in_features % 32 else in_features
    while in_features % g and g > 32:
        g -= 32
    return g if in_features % g == 0 else None


def eligible(layer: torch.nn.Module) -> bool:
    """A Linear whose weight ComfyUI uses as it is (not cast per call, not patched by a weight function)."""
    w = getattr(layer, "weight", None)
    return (isinstance(layer, torch.nn.Linear) and isinstance(w, torch.Tensor) and w.ndim == 2
            and w.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and not getattr(layer, "comfy_cast_weights", False) and not getattr(layer, "weight_function", None))


def quantize_weight(w: torch.Tensor, mode: str) -> torch.Tensor:
    from optimum.quanto.tensor import quantize_weight as q
    from optimum.quanto.tensor.optimizers import AbsmaxOptimizer, MaxOptimizer

    qt = _qtype(mode)
    w = w.detach()
    if qt.bits == 8:
        return q(w, qtype=qt, axis=0, scale=AbsmaxOptimizer()(w, qtype=qt, axis=0), shift=None)
    gs = group_size(w.shape[1])
    scale, shift = MaxOptimizer()(w, qtype=qt, axis=0, group_size=gs)
    return q(w, qtype=qt, axis=0, scale=scale, shift=shift, group_size=gs)


def quantized_bytes(numel: int, rows: int, in_features: int, mode: str, dtype_size: int = 4) -> int:
    """Bytes of one quantized weight: the packed values plus quanto's scales (and 4-bit shifts)."""
    if mode == "int8":
        return numel + rows * dtype_size
    gs = group_size(in_features) or in_features
    return numel // 2 + 2 * (numel // gs) * dtype_size


def check(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"quantize must be one of {MODES} (got {mode!r})")
    if mode != "none":
        try:
            import optimum.quanto  # noqa: F401
        except ImportError:
            raise ConfigError(f"quantize '{mode}' needs optimum-quanto: pip install -r requirements.txt "
                              "(with ComfyUI's Python), or set quantize to 'none'") from None


def _input_in_weight_dtype(layer, args):
    """A quantized layer's input in its weight's compute dtype. quanto's tensors take ``F.linear`` before autocast
    casts its input, and autocast runs norms in fp32, so a bf16 model's Linear can be handed fp32 activations;
    quanto's packed 4-bit CUDA kernel (tinygemm, bf16 weights) accepts only bf16 (an H200 run failed with
    "Expected A.dtype() == at::kBFloat16"). The output is in the dtype autocast would give the layer anyway."""
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != layer.weight.dtype:
        return (x.to(layer.weight.dtype), *args[1:])
    return None


class _CastBack:
    """Hooks of one layer ComfyUI casts per call (``manual_cast``: the weight is cast to the input's dtype, so the
    output comes in the input's dtype): the input goes to the quantized weight's compute dtype, and the output
    comes back in the caller's dtype. The dtype is recorded before the cast (forward hooks see the arguments as
    the pre-hooks left them)."""

    def __init__(self):
        self.dtype = None

    def pre(self, layer, args):
        x = args[0] if args else None
        self.dtype = x.dtype if isinstance(x, torch.Tensor) and x.is_floating_point() else None
        return _input_in_weight_dtype(layer, args)

    def post(self, layer, args, out):
        if self.dtype is not None and isinstance(out, torch.Tensor) and out.dtype != self.dtype:
            return out.to(self.dtype)
        return None


class Swapped:
    """The training scope's quantization (Train Init ``quantize``), made around ComfyUI's loader:

    1. ``Swapped(dm, mode, skip)``: the full weights of the eligible Linears (except the module names in ``skip``)
       are taken out of the model and kept where they are; an empty placeholder takes their place, so that
       ComfyUI's loader moves everything else (quanto tensors cannot be moved by ``Module.to``);
    2. ``quantize(device)``: each full weight is copied to ``device`` one at a time and quantized there; the
       layer computes with the quantized weight (the full weights never sit on the device together);
    3. ``unquantize()``: placeholders again (before ComfyUI unloads the model), ``restore()``: the originals back.
    """

    def __init__(self, diffusion_model: torch.nn.Module, mode: str, skip: set[str] = frozenset(),
                 is_eligible=eligible, compute_dtype: torch.dtype | None = None):
        """``compute_dtype``: quantize (and compute) in this dtype instead of the weight's, with outputs given back
        in the caller's dtype (text encoders, which ComfyUI runs in fp32 whatever their weights' dtype)."""
        self.mode = mode
        self.hooks: list = []
        self.compute_dtype = compute_dtype
        self.layers = [(layer, layer.weight) for name, layer in diffusion_model.named_modules()
                       if mode != "none" and name not in skip and is_eligible(layer)]
        self.unquantize()

    def __len__(self) -> int:
        return len(self.layers)

    def quantize(self, device=None) -> None:
        with torch.no_grad():
            for layer, w in self.layers:
                full = w.to(device=device or w.device, dtype=self.compute_dtype or w.dtype)
                layer.weight = torch.nn.Parameter(quantize_weight(full, self.mode), requires_grad=False)
                del full
                if self.compute_dtype is None:
                    self.hooks.append(layer.register_forward_pre_hook(_input_in_weight_dtype))
                else:
                    cb = _CastBack()
                    self.hooks += [layer.register_forward_pre_hook(cb.pre), layer.register_forward_hook(cb.post)]

    def unquantize(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        for layer, w in self.layers:
            layer.weight = torch.nn.Parameter(torch.empty(0, dtype=w.dtype, device=w.device), requires_grad=False)

    def restore(self) -> None:
        for layer, w in self.layers:
            layer.weight = w


class ScaledWeight:
    """A weight-side adapter (LoHa, LoKr, DoRA) on a scaled-fp8 layer (``comfy.ops.scaled_fp8_ops``): ComfyUI's
    cast path hands weight functions the stored fp8 weight ``W / s`` and multiplies by ``scale_weight`` ``s``
    afterwards, so the adapter gets ``W`` and its result is divided by ``s`` again: it trains on, and its saved
    file applies to, the real weight."""

    def __init__(self, layer: torch.nn.Module, adapter):
        self.layer = layer
        self.adapter = adapter

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        s = self.layer.scale_weight.to(device=w.device, dtype=w.dtype)
        return self.adapter(w * s) / s

    def move_to(self, device) -> int:
        return self.adapter.move_to(device)


def weight_wrapper(layer: torch.nn.Module, adapter):
    """What to register as ``layer``'s weight function for a weight-side ``adapter``."""
    if isinstance(getattr(layer, "scale_weight", None), torch.Tensor):
        return ScaledWeight(layer, adapter)
    return adapter


def text_encoder_eligible(layer: torch.nn.Module) -> bool:
    """A text encoder's Linear: ComfyUI builds its text encoders with ``manual_cast`` operations (a class-level
    ``comfy_cast_weights``: the weight is cast to the input's dtype and device per call); those are quantized too,
    with the cast turned off while they are. Layers cast per call for another reason (a partial load sets it on
    the layer itself), weight functions and non-float (fp8) weights stay as loaded."""
    w = getattr(layer, "weight", None)
    return (isinstance(layer, torch.nn.Linear) and isinstance(w, torch.Tensor) and w.ndim == 2
            and w.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and "comfy_cast_weights" not in layer.__dict__ and not getattr(layer, "weight_function", None))


@contextlib.contextmanager
def quantized_text_encoder(clip, mode: str, unload_patcher):
    """Inside: ``clip``'s text encoders run with ``mode`` (int8/int4) weights, quantized around ComfyUI's load as
    for the diffusion model (the full weights never sit on the load device together); on exit ComfyUI unloads the
    encoder and the original weights are back, so the shared CLIP is exactly as loaded. ``unload_patcher`` is
    ``data.cache.unload_patcher`` (ComfyUI's unload through model management)."""
    if mode == "none":
        yield clip
        return
    check(mode)
    patcher = clip.patcher
    unload_patcher(patcher)  # full weights back to the offload device before anything loads
    sw = Swapped(patcher.model, mode, is_eligible=text_encoder_eligible, compute_dtype=torch.float32)
    cast = [layer for layer, _ in sw.layers]
    try:
        clip.load_model()  # ComfyUI's loader moves the rest (embeddings, norms, biases)
        for layer in cast:
            if "comfy_cast_weights" in layer.__dict__:  # a partial load: this layer stays cast per call
                raise RuntimeError("partially loaded")
            layer.comfy_cast_weights = False
        sw.quantize(patcher.load_device)
        yield clip
    finally:
        sw.unquantize()
        unload_patcher(patcher)
        for layer in cast:
            layer.__dict__.pop("comfy_cast_weights", None)
        sw.restore()
