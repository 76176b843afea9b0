"""Per-step schedules, precomputed once (no Python branching in the step)."""

from __future__ import annotations

import math


def warmup_cosine(total_steps: int, warmup_steps: int, peak: float, final: float) -> list[float]:
    """Linear warm-up from ~0 to ``peak`` over ``warmup_steps``, then cosine decay to ``final`` at the end."""
    warmup_steps = min(warmup_steps, total_steps)
    values = []
    for step in range(total_steps):
        if step < warmup_steps:
            values.append(peak * (step + 1) / warmup_steps)
        else:
            t = (step - warmup_steps) / max(1, total_steps - warmup_steps - 1)
            values.append(final + 0.5 * (peak - final) * (1 + math.cos(math.pi * min(1.0, t))))
    return values


def cosine(total_steps: int, start: float, end: float) -> list[float]:
    """Cosine ramp from ``start`` to ``end`` (EMA momentum, teacher temperature)."""
    return [end - (end - start) * (1 + math.cos(math.pi * s / max(1, total_steps - 1))) / 2 for s in range(total_steps)]
