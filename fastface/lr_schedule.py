"""The learning-rate schedule of every trainer (transformer, image tokenizer, attribute classifier)."""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float = 0.1,
          time_fraction: float | None = None) -> float:
    """Learning rate at 0-based ``step``: linear warm-up, then cosine decay to ``lr * min_ratio``.

    Steps ``0 .. warmup - 1`` ramp linearly from ``lr / warmup`` to ``lr`` (``warmup=0``: none); from ``warmup``
    the rate follows a half cosine from ``lr`` down to ``lr * min_ratio``, reached at step ``total`` (at least one
    step after the warm-up) and held after.
    ``time_fraction`` (the part of a wall-time budget already spent, for runs that stop on the clock) moves the
    decay on as if the run were at step ``time_fraction * total`` when that is further along than ``step``.

    This is the transformer trainer's schedule, unchanged for it. The image tokenizer and the attribute classifier
    used to inline another formula -- ``lr * max(min(1, s / warmup) * 0.5 * (1 + cos(pi * s / total)), floor)``
    for 1-based ``s``, warm-up multiplied onto a cosine that started at step 0, a floor of 0.02 or 0.01 -- and now
    call this one (their ``min_ratio`` is that floor; their time-limited runs pass ``time_fraction``).
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    at = step if time_fraction is None else max(step, time_fraction * total)
    progress = min(1.0, (at - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
