"""Per-step schedules, precomputed once (no Python branching in the step)."""

from __future__ import annotations

import math

import torch


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


class GroupSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Sets every parameter group's learning rate and weight decay before each optimizer step, from per-step
    lists: lr ``lrs[step]`` times the group's ``lr_scale`` (default 1; DINOv2's layer-wise decay), or 0 while
    ``step < group["frozen_steps"]`` (a group a method holds still, e.g.
    DINO's last layer: AdamW with lr 0 changes neither the weights nor applies decay); weight decay
    ``wds[step]`` for groups created with a non-zero one, 0 for the others.

    A scheduler, because every engine already steps and checkpoints one (DeepSpeed included, which owns the
    step); its saved state is the step count alone, the lists come from the config."""

    def __init__(self, optimizer: torch.optim.Optimizer, lrs: list[float], wds: list[float]) -> None:
        self.lrs, self.wds = lrs, wds
        for group in optimizer.param_groups:
            group.setdefault("decays", group["weight_decay"] > 0)
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        s = min(self.last_epoch, len(self.lrs) - 1)
        return [0.0 if s < g.get("frozen_steps", 0) else self.lrs[s] * g.get("lr_scale", 1.0)
                for g in self.optimizer.param_groups]

    def step(self, epoch: int | None = None) -> None:
        super().step()
        wd = self.wds[min(self.last_epoch, len(self.wds) - 1)]
        for group in self.optimizer.param_groups:
            group["weight_decay"] = wd if group["decays"] else 0.0

    def state_dict(self) -> dict:
        return {k: v for k, v in super().state_dict().items() if k not in ("lrs", "wds")}
