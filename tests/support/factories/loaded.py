"""Building reference models (transformers, diffusers) whose weights are all loaded from a tiny model's file
right after construction. Kept apart from ``common`` so that changing it does not change the cache key of every
generated file (``common.source_key`` hashes ``common``)."""
from __future__ import annotations

from contextlib import contextmanager

import torch

_TORCH_INITS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


@contextmanager
def no_random_init():
    """Inside, torch's layer initialisers and transformers' ``initialize_weights`` do nothing: the random init of a
    32k- or 49k-token embedding costs seconds per model on this machine, and every value is overwritten by the load
    that follows. Buffers computed in ``__init__`` (position ids, rotary frequencies) and transformers' weight tying
    are kept. The caller must check that its load covered every parameter (``strict=True``, or the missing keys
    asserted to be tied ones), or an unloaded parameter holds uninitialised memory."""
    from transformers import PreTrainedModel

    saved = {name: getattr(torch.nn.init, name) for name in _TORCH_INITS}
    initialize_weights = PreTrainedModel.initialize_weights
    try:
        for name in _TORCH_INITS:
            setattr(torch.nn.init, name, _keep)
        PreTrainedModel.initialize_weights = _skip
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)
        PreTrainedModel.initialize_weights = initialize_weights


def _keep(tensor, *args, **kwargs):
    return tensor


def _skip(self):
    return None
