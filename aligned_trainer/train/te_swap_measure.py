"""Text-encoder swap, measuring: the captions a swap setup encodes and the spreads it reads off both encoders.

- :func:`measured_captions`: the distinct captions encoded (at most :data:`MAX_CAPTIONS`, evenly spaced).
- :func:`token_std`: the spread the UNet was trained on, measured on captions: the standard deviation over the
  channels of each counted token, averaged over the tokens. Which tokens count: every position of the
  conditioning when it carries no ``attention_mask`` (CLIP-L as SD1.5 saw it: all 77 positions, padding
  included, since SD1.5 was trained on padded, unmasked CLIP states), else the positions the mask marks valid.
- :func:`vector_std`: the same spread for vectors (an adm's pooled text vector).

:class:`SwapError` is the swap's error (every ``te_swap*`` module raises it; ``te_swap`` uses this one).
"""
from __future__ import annotations

import torch

from .config import ConfigError

MAX_CAPTIONS = 64                        # captions measured at most: 64 x 77 CLIP tokens pin the mean spread well


class SwapError(ConfigError):
    pass


def token_std(conditionings: list) -> tuple[float, int]:
    """(mean per-token std, tokens counted) over CONDITIONINGs (``[[cond (1, T, C), extras]]``): each token's
    std over its C channels (population std), averaged over the counted tokens of every caption; a caption's
    ``attention_mask`` (1 = valid) limits the count to its valid tokens."""
    total, n = 0.0, 0
    for c in conditionings:
        x, extras = c[0][0], c[0][1]
        stds = x.detach().float().reshape(-1, x.shape[-1]).std(dim=-1, unbiased=False)
        mask = extras.get("attention_mask") if isinstance(extras, dict) else None
        if isinstance(mask, torch.Tensor) and mask.numel() == stds.numel():
            stds = stds[mask.reshape(-1).to(stds.device) > 0]
        total += float(stds.sum())
        n += int(stds.numel())
    if n == 0:
        raise SwapError("no caption gave any valid token to measure; give the swap setup captions (a dataset "
                        "with at least one captioned item)")
    return total / n, n


def vector_std(vectors: list[torch.Tensor]) -> float:
    """Mean over the vectors (rows) of each one's std over its channels (population std)."""
    rows = torch.cat([v.detach().float().reshape(-1, v.shape[-1]) for v in vectors])
    return float(rows.std(dim=-1, unbiased=False).mean())


def encode(clip, texts: list[str]) -> list:
    """Each text's CONDITIONING as ``clip`` encodes it (an aligned CLIP encodes as its spec says)."""
    return [clip.encode_from_tokens_scheduled(clip.tokenize(t)) for t in texts]


def measured_captions(captions: list, limit: int = MAX_CAPTIONS) -> list[str]:
    """The distinct captions the setup encodes: all of them sorted, or ``limit`` of them evenly spaced over the
    sorted list (first and last included) when there are more; encoding a large dataset's every caption with two
    encoders costs minutes and does not move a mean over thousands of tokens."""
    texts = sorted({t for t in captions if isinstance(t, str)})
    if not texts:
        raise SwapError("the swap setup got no captions: connect a Dataset whose images have captions (.txt files)")
    if len(texts) <= limit:
        return texts
    if limit < 2:
        return texts[:max(limit, 1)]
    return [texts[round(i * (len(texts) - 1) / (limit - 1))] for i in range(limit)]
