"""The one place cross-rank terms go through. Methods never call collectives themselves.

``gather_features`` is an all-gather whose backward reduce-scatters (sums) the incoming gradients, so each rank
receives the gradient every rank's loss sends to its own rows. With DDP averaging parameter gradients over W
ranks, this reproduces the gradient of a single process on the concatenated batch exactly
(tests/test_gather.py checks this on 2 gloo ranks). A plain ``dist.all_gather`` silently drops those
gradients: the recurring bug of peers (lightly #1977, solo-learn #229).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _has_autograd_kernel(op: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(op, "Autograd"))
    except RuntimeError:  # the op does not exist in this torch
        return False


@functools.cache
def collectives() -> tuple[str, Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """(name, all-gather along dim 0, all-reduce sum), both differentiable, for the running torch.

    torch's functional collectives (``torch.distributed._functional_collectives``) register autograd for their
    ``all_gather_into_tensor`` (backward: reduce-scatter sum) and ``all_reduce`` (backward: all-reduce sum) ops on
    every version the project admits (checked on 2.11.0 and 2.14.1; the Python wrapper is ``all_gather_tensor`` in
    2.11 and ``all_gather_single`` from 2.14 on). Being private, that can change: the autograd kernels are looked
    up on the dispatcher, and where one is missing the public (deprecated) ``torch.distributed.nn.functional``
    collectives, whose backward is the same, are used instead. tests/test_gather.py checks the gradients of
    whichever path the running torch takes against a single process."""
    from torch.distributed import _functional_collectives as fc

    gather_fn = getattr(fc, "all_gather_single", None) or getattr(fc, "all_gather_tensor", None)
    if gather_fn is not None and all(_has_autograd_kernel(f"_c10d_functional::{op}")
                                     for op in ("all_gather_into_tensor", "all_reduce", "wait_tensor")):
        def wait(t: torch.Tensor) -> torch.Tensor:
            return t.wait() if hasattr(t, "wait") else t

        return ("functional",
                lambda x: wait(gather_fn(x.contiguous(), 0, dist.group.WORLD)),
                lambda x: wait(fc.all_reduce(x.contiguous(), "sum", dist.group.WORLD)))
    from torch.distributed.nn import functional as dnn

    return ("torch.distributed.nn",
            lambda x: torch.cat(dnn.all_gather(x.contiguous()), dim=0),
            lambda x: dnn.all_reduce(x.contiguous(), op=dist.ReduceOp.SUM))


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B x ...) from every rank along dim 0, rank order, differentiably."""
    _, ws = world()
    return x if ws == 1 else collectives()[1](x)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks; its backward is again a sum over ranks.

    For global batch statistics (Barlow Twins cross-correlation, VICReg variance and covariance): every rank
    sums its local terms into the same global statistic and computes the same loss L from it. Rank r then
    receives sum_r' dL_r'/dS = W dL/dS as the gradient of its local part, and DDP's division by W leaves the
    single-process gradient. A non-differentiable ``dist.all_reduce`` here keeps only the local 1/W of it
    (lightly #1977, the original Barlow Twins code). tests/test_methods.py checks this on 2 gloo ranks.
    """
    _, ws = world()
    return x if ws == 1 else collectives()[2](x)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Differentiable mean over ranks (backward as in :func:`all_reduce_sum`)."""
    _, ws = world()
    return x if ws == 1 else all_reduce_sum(x) / ws


def all_reduce_sum_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks without autograd (buffers such as DINO's centre)."""
    _, ws = world()
    if ws > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def all_reduce_max_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks without autograd (a shift that keeps Sinkhorn-Knopp's exponentials finite)."""
    _, ws = world()
    if ws > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x
