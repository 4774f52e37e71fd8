"""Helpers shared by the tiny-model factories: deterministic weights and a source-keyed file cache."""
from __future__ import annotations

import hashlib
import inspect
import math
import os
import tempfile
from pathlib import Path
from types import ModuleType

import torch

from ..paths import MODEL_CACHE


def source_key(*modules: ModuleType, extra: str = "") -> str:
    """Hash of the generators' own source: the cache key of what they produce."""
    h = hashlib.sha256(extra.encode())
    for m in (*modules, inspect.getmodule(source_key)):
        h.update(inspect.getsource(m).encode())
    return h.hexdigest()[:16]


def cached_file(name: str, key: str, suffix: str = ".safetensors") -> Path:
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    return MODEL_CACHE / f"{name}-{key}{suffix}"


@torch.no_grad()
def seeded_init_(module: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    """Give every parameter and floating buffer a deterministic value.

    ComfyUI's ``comfy.ops`` layers skip initialisation, so a model built from a config holds garbage
    until weights are loaded. Matrices and kernels get N(0, gain/fan_in); norms get weight 1, bias 0;
    other vectors get small noise so nothing is exactly zero (a zero output layer would hide bugs).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        if p.ndim >= 2:
            fan_in = math.prod(p.shape[1:])
            std = gain / math.sqrt(max(1, fan_in))
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        elif "norm" in name.lower() or name.endswith("ln.weight") or ".ln_" in name:
            p.fill_(1.0 if name.endswith("weight") or name.endswith("scale") else 0.0)
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return module


def atomic_save(tensors: dict, path: Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def seeded_llm_(model, seed: int):
    """``seeded_init_`` for a tiny LLM text encoder, with its norm weights perturbed away from 1 (generator
    ``seed + 1``) so that a norm applied in the wrong place changes the output."""
    seeded_init_(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model
