"""Caption processing: trigger word, tag shuffle keeping the first N tags, tag dropout. Variants are
drawn once, deterministically from a seed, and cached; training picks one per step. Caption dropout
(the whole caption replaced by the empty prompt) happens at training time with the cached empty
conditioning."""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionConfig:
    trigger_word: str = ""
    shuffle_tags: bool = False
    keep_tokens: int = 1          # leading tags that keep their place when shuffling (kohya keep_tokens)
    tag_dropout: float = 0.0      # probability of dropping each non-kept tag in a variant
    caption_dropout: float = 0.0  # probability, per training step, of training on the empty caption
    variants: int = 1             # processed variants cached per caption
    separator: str = ","

    def validate(self) -> None:
        for name in ("tag_dropout", "caption_dropout"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {v}")
        if self.variants < 1 or self.keep_tokens < 0:
            raise ValueError("variants must be >= 1 and keep_tokens >= 0")


def split_tags(caption: str, sep: str = ",") -> list[str]:
    return [t.strip() for t in caption.split(sep) if t.strip()]


def with_trigger(caption: str, trigger: str, sep: str = ",") -> str:
    """The caption with ``trigger`` as its first tag (moved there if the caption already has it)."""
    tags = split_tags(caption, sep)
    if trigger:
        tags = [trigger] + [t for t in tags if t != trigger]
    return f"{sep} ".join(tags)


def variant(caption: str, cfg: CaptionConfig, rng: random.Random) -> str:
    tags = split_tags(with_trigger(caption, cfg.trigger_word, cfg.separator), cfg.separator)
    keep = cfg.keep_tokens + (1 if cfg.trigger_word and cfg.keep_tokens == 0 else 0)
    head, tail = tags[:keep], tags[keep:]
    if cfg.tag_dropout > 0:
        tail = [t for t in tail if rng.random() >= cfg.tag_dropout]
    if cfg.shuffle_tags:
        rng.shuffle(tail)
    return f"{cfg.separator} ".join(head + tail)


def variants(caption: str, cfg: CaptionConfig, seed: int) -> tuple[str, ...]:
    """Up to ``cfg.variants`` distinct processed captions, drawn deterministically from ``seed``.

    Without shuffle or tag dropout there is exactly one variant (the caption with the trigger word)."""
    rng = random.Random(seed)
    out: list[str] = []
    n = cfg.variants if (cfg.shuffle_tags or cfg.tag_dropout > 0) else 1
    for _ in range(n):
        v = variant(caption, cfg, rng)
        if v not in out:
            out.append(v)
    return tuple(out)
