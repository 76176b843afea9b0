"""Contrastive losses as pure functions of features; cross-rank terms via pipeline.losses.gather."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.gather import gather_features, world
from pipeline.losses.precision import fp32_loss


@fp32_loss
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, local_loss: bool = False) -> torch.Tensor:
    """NT-Xent (SimCLR) over the global batch.

    Each of the 2N views (N = global batch) is scored against the other 2N-1; its positive is the other view of
    the same image. ``local_loss=False`` computes the full 2N x 2N matrix on every rank; ``local_loss=True``
    computes only this rank's 2B rows against all 2N keys, labels offset by ``rank * B``, and averages over
    ranks through DDP (open_clip's local loss): same value and gradient, B/N of the compute and memory.
    """
    rank, _ = world()
    b = z1.shape[0]
    z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    k1, k2 = gather_features(z1), gather_features(z2)
    n = k1.shape[0]
    keys = torch.cat([k1, k2])  # 2N x D: all first views, then all second views
    if local_loss:
        queries = torch.cat([z1, z2])  # 2B x D
        idx = torch.arange(b, device=z1.device) + rank * b  # global index of local samples
        self_idx = torch.cat([idx, idx + n])
        pos_idx = torch.cat([idx + n, idx])
    else:
        queries = keys
        self_idx = torch.arange(2 * n, device=z1.device)
        pos_idx = torch.cat([self_idx[n:], self_idx[:n]])
    logits = queries @ keys.T / temperature
    logits = logits.masked_fill(F.one_hot(self_idx, 2 * n).bool(), float("-inf"))
    # Without local_loss every rank computes the whole loss: the all-gather backward sums W identical copies of
    # each row's gradient and DDP divides by W, which leaves the single-process gradient. Nothing to rescale.
    return F.cross_entropy(logits, pos_idx)
