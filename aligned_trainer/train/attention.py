"""The attention the training step runs (speed option ``attention``, train/speed.py), through ComfyUI's own
switch: ``transformer_options["optimized_attention_override"]``, which every ComfyUI attention call consults
(``comfy.ldm.modules.attention.wrap_attn``) before running the function ComfyUI chose at start-up.

- ``comfy``: ComfyUI's choice (PyTorch's SDPA on NVIDIA/AMD/Intel GPUs, sub-quadratic chunks on a CPU), no override;
- a function ComfyUI registers (``pytorch``, ``sub_quad``, ``split``; ``flash``, ``sage``, ``xformers`` when their
  packages are installed): that function, as ComfyUI's own ``--use-*-attention`` flags would pick it;
- ``sdpa_flash`` / ``sdpa_efficient`` / ``sdpa_cudnn`` / ``sdpa_math``: ComfyUI's PyTorch attention with SDPA held
  to that one kernel (``torch.nn.attention.sdpa_kernel``); PyTorch otherwise picks per call.

The math is the same attention in every case (softmax(QK^T/sqrt(d))V); kernels differ in summation order and in
the memory they keep (sub_quad and split hold chunks of the score matrix, SDPA's fused kernels none)."""
from __future__ import annotations

from .config import ConfigError

SDPA = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
        "sdpa_math": "MATH"}
COMFY_FUNCTIONS = ("pytorch", "sub_quad", "split", "flash", "sage", "xformers")
CHOICES = ("comfy", *COMFY_FUNCTIONS, *SDPA)


def _function(name: str):
    from comfy.ldm.modules import attention as comfy_attention

    return comfy_attention.get_attention_function("pytorch" if name in SDPA else name, default=None)


def override(name: str):
    """The ``optimized_attention_override`` for ``name`` (None for ``comfy``). ComfyUI calls it with the function
    it chose and that function's arguments (already marked as inside its wrapper)."""
    if name == "comfy":
        return None
    fn = _function(name)
    if name not in SDPA:
        def run(_chosen, *args, **kwargs):
            return fn(*args, **kwargs)
        return run
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA[name])

    def run_sdpa(_chosen, *args, **kwargs):
        try:
            with sdpa_kernel([backend]):
                return fn(*args, **kwargs)
        except RuntimeError as e:
            if "no viable backend" not in str(e).lower():
                raise
            mask = kwargs.get("mask", args[4] if len(args) > 4 else None)
            q = args[0]
            raise ConfigError(f"attention {name}: PyTorch's {SDPA[name]} kernel cannot run this model's attention "
                              f"(q {tuple(q.shape)} {q.dtype} on {q.device}, {'with' if mask is not None else 'no'} "
                              "mask): choose attention 'pytorch' (PyTorch picks a kernel per call) or "
                              "'comfy'") from None
    return run_sdpa


def transformer_options(name: str) -> dict:
    """What the trainer passes the model's forward: ``{"optimized_attention_override": ...}``, or nothing."""
    fn = override(name)
    return {} if fn is None else {"optimized_attention_override": fn}


def check(name: str, device) -> None:
    """Refuse, before training, an attention this ComfyUI or this device does not have."""
    if name not in CHOICES:
        raise ConfigError(f"attention must be one of {CHOICES} (got {name!r})")
    if name == "comfy":
        return
    if _function(name) is None:
        raise ConfigError(f"attention '{name}' is not available in this ComfyUI: it registers that function only "
                          "when its package is installed (flash: flash-attn, sage: sageattention, xformers: "
                          "xformers). Install it, or choose 'pytorch' or 'comfy'.")
    if name in SDPA:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
        q = torch.zeros(1, 1, 8, 64, device=device, dtype=dtype)
        try:
            with sdpa_kernel([getattr(SDPBackend, SDPA[name])]):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
        except RuntimeError:
            raise ConfigError(f"attention '{name}' (PyTorch's {SDPA[name]} kernel) is not available on "
                              f"{torch.device(device)} with this PyTorch: choose 'pytorch' (PyTorch picks a "
                              "kernel per call) or 'comfy'.") from None
