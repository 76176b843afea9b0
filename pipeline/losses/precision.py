"""Losses compute in fp32 whatever autocast the engine runs the forward under.

Casting inputs with ``.float()`` is not enough inside ``torch.autocast``: autocast re-casts the inputs of every
matmul to bf16 and returns bf16, so CLIP/SigLIP logits at scale 100 came back in steps of 0.5 and the Barlow Twins
and VICReg correlation matrices in bf16. The references keep these in fp32 (open_clip ``loss.py`` runs outside
the model's autocast on fp32 features; the Barlow Twins and VICReg losses are fp32 under their AMP)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def _to_fp32(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64:
        return x.float()
    if isinstance(x, (list, tuple)):
        return type(x)(_to_fp32(v) for v in x)
    return x


def _device_types(x: Any, out: set[str]) -> set[str]:
    if isinstance(x, torch.Tensor):
        out.add(x.device.type)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _device_types(v, out)
    return out


def fp32_loss(fn: F) -> F:
    """Run ``fn`` with autocast disabled on the devices of its tensor arguments, floating tensors (also inside
    lists) cast to fp32 (fp64 kept, for exact-gradient tests). Gradients flow back to the bf16 inputs through
    the casts."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        devices: set[str] = set()
        for a in (*args, *kwargs.values()):
            _device_types(a, devices)
        with contextlib.ExitStack() as stack:
            for device in sorted(devices):
                # no autocast to leave on devices without one (``meta``: the FLOP counter of bench model and MFU)
                if torch.amp.is_autocast_available(device):
                    stack.enter_context(torch.autocast(device, enabled=False))
            return fn(*_to_fp32(args), **{k: _to_fp32(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]
