"""NT-Xent gathered across 2 real gloo ranks equals the single-process loss on the concatenated batch, in value
and in gradient (after DDP's gradient averaging)."""

import math

import pytest
import torch

from pipeline.losses.contrastive import nt_xent
from tests.multirank import run_ranks

B, D, W = 4, 8, 2


def _data():
    torch.manual_seed(0)  # default Linear init draws from the global RNG
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(W * B, 16, generator=g), torch.randn(W * B, 16, generator=g)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, D))
    torch.nn.init.normal_(net[0].weight, generator=g)
    return x1.double(), x2.double(), net.double()


def _reference(local_loss):
    x1, x2, net = _data()
    loss = nt_xent(net(x1), net(x2), temperature=0.2, local_loss=local_loss)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in net.parameters()]


def _use_path(path: str) -> None:
    """Select the collectives implementation in this (rank) process: ``functional`` is what the running torch
    picks; ``fallback`` pretends its functional collectives lack autograd kernels."""
    from pipeline.losses import gather

    gather.collectives.cache_clear()
    if path == "fallback":
        gather._has_autograd_kernel = lambda op: False
    assert gather.collectives()[0] == {"functional": "functional", "fallback": "torch.distributed.nn"}[path]


def _rank_fn(local_loss, path="functional"):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    _use_path(path)
    rank = dist.get_rank()
    x1, x2, net = _data()
    ddp = DistributedDataParallel(net)
    sl = slice(rank * B, (rank + 1) * B)
    loss = nt_xent(ddp(x1[sl]), ddp(x2[sl]), temperature=0.2, local_loss=local_loss)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    return (mean_loss / W).item(), [p.grad.clone() for p in net.parameters()]


@pytest.mark.multirank
@pytest.mark.parametrize("local_loss, path", [(False, "functional"), (True, "functional"), (True, "fallback")])
def test_gathered_nt_xent_matches_single_process(local_loss, path):
    """On the running torch's functional collectives (what it picks: checked on 2.11.0 and 2.14.1) and on the
    public torch.distributed.nn fallback."""
    ref_loss, ref_grads = _reference(local_loss=False)
    results = run_ranks(_rank_fn, local_loss, path)
    for loss, grads in results:
        assert loss == pytest.approx(ref_loss, abs=1e-10)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-8)


def test_local_loss_equals_full_loss_single_process():
    x1, x2, net = _data()
    z1, z2 = net(x1), net(x2)
    assert nt_xent(z1, z2, 0.2, local_loss=True).item() == pytest.approx(nt_xent(z1, z2, 0.2).item(), abs=1e-12)


def test_nt_xent_formula_by_hand():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.double)
    z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.double)
    t = 0.5
    # row 0 (z1[0]): positive z2[0] sim 1; negatives z1[1] sim 0, z2[1] sim 0
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2))
    assert nt_xent(z1, z2, t).item() == pytest.approx(expected, abs=1e-12)


def _reduce_rank_fn(path):
    """Gradient of sum((all_reduce_sum(x_rank) * w)^2) with respect to this rank's x."""
    import torch.distributed as dist

    from pipeline.losses.gather import all_reduce_sum

    _use_path(path)
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    xs, w = torch.randn(W, 5, generator=g, dtype=torch.double), torch.randn(5, generator=g, dtype=torch.double)
    x = xs[rank].clone().requires_grad_()
    ((all_reduce_sum(x) * w) ** 2).sum().backward()
    return x.grad


@pytest.mark.multirank
@pytest.mark.parametrize("path", ["functional", "fallback"])
def test_all_reduce_sum_gradient(path):
    """Every rank computes the same loss of the summed statistic S; the backward all-reduces, so each rank's input
    gets W dL/dS (what DDP's division by W turns into the single-process gradient)."""
    g = torch.Generator().manual_seed(0)
    xs, w = torch.randn(W, 5, generator=g, dtype=torch.double), torch.randn(5, generator=g, dtype=torch.double)
    dl_ds = 2 * xs.sum(0) * w * w
    for grad in run_ranks(_reduce_rank_fn, path):
        torch.testing.assert_close(grad, W * dl_ds)
