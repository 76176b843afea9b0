"""The one place cross-rank terms go through. Methods never call collectives themselves.

``gather_features`` is an all-gather whose backward reduce-scatters (sums) the incoming gradients, so each rank
receives the gradient every rank's loss sends to its own rows. With DDP averaging parameter gradients over W
ranks, this reproduces the gradient of a single process on the concatenated batch exactly
(tests/test_gather.py checks this on 2 gloo ranks). A plain ``dist.all_gather`` silently drops those
gradients: the recurring bug of peers (lightly #1977, solo-learn #229).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B x ...) from every rank along dim 0, rank order, differentiably."""
    _, ws = world()
    if ws == 1:
        return x
    from torch.distributed._functional_collectives import all_gather_single_autograd

    out = all_gather_single_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD)
    return out.wait() if hasattr(out, "wait") else out


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks; its backward is again a sum over ranks.

    For global batch statistics (Barlow Twins cross-correlation, VICReg variance and covariance): every rank
    sums its local terms into the same global statistic and computes the same loss L from it. Rank r then
    receives sum_r' dL_r'/dS = W dL/dS as the gradient of its local part, and DDP's division by W leaves the
    single-process gradient. A non-differentiable ``dist.all_reduce`` here keeps only the local 1/W of it
    (lightly #1977, the original Barlow Twins code). tests/test_methods.py checks this on 2 gloo ranks.
    """
    _, ws = world()
    if ws == 1:
        return x
    from torch.distributed._functional_collectives import all_reduce

    out = all_reduce(x.contiguous(), "sum", group=dist.group.WORLD)
    return out.wait() if hasattr(out, "wait") else out


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
