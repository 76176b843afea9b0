"""The bare loop the trainer's overhead is measured against: the same timm ViT, projection MLP and NT-Xent
loss, ``torch.optim.AdamW`` and plain DDP, written as a user would write it by hand.

This module imports nothing from ``pipeline`` (tests/test_bench.py checks it): it is what the trainer would
cost if it were free. It does the same arithmetic as the trainer's step (autocast dtype, gradient clipping,
per-block ``torch.compile``, fused AdamW on GPUs), so the ratio of the two step times measures bookkeeping,
not a different computation. What it leaves out on purpose, and the trainer pays for: the learning-rate
schedule, weight-decay parameter groups, device-side loss and NaN tracking, metrics logging.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class BareSpec:
    """Everything the bare loop needs, as plain values."""

    model_name: str
    timm_kwargs: dict
    proj_hidden_dim: int
    proj_dim: int
    temperature: float
    batch_size: int
    image_size: int
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    clip_grad_norm: float
    bf16: bool
    compile: bool
    seed: int = 0


class BareSimCLR(nn.Module):
    def __init__(self, spec: BareSpec) -> None:
        super().__init__()
        self.encoder = timm.create_model(spec.model_name, pretrained=False, **spec.timm_kwargs)
        d = self.encoder.num_features
        self.projector = nn.Sequential(nn.Linear(d, spec.proj_hidden_dim), nn.GELU(),
                                       nn.Linear(spec.proj_hidden_dim, spec.proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


def gather(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x
    from torch.distributed._functional_collectives import all_gather_tensor_autograd

    return all_gather_tensor_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    z1, z2 = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
    z = torch.cat([gather(z1), gather(z2)])
    n = z.shape[0] // 2
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def bare_loop(spec: BareSpec, device: torch.device, steps: int, marks_at: set[int],
              on_step: Callable[[], None] | None = None) -> dict[int, float]:
    """Train ``steps`` steps; returns ``{step: seconds}`` clock readings taken after steps in ``marks_at``
    (device synchronised first)."""
    torch.manual_seed(spec.seed)
    model = BareSimCLR(spec).to(device)
    if spec.compile:
        for block in model.encoder.blocks:
            block.compile()
    ddp = dist.is_initialized() and dist.get_world_size() > 1
    net = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
    ) if ddp else model
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=spec.betas,
                            eps=spec.eps, fused=True if device.type == "cuda" else None)
    g = torch.Generator(device=device).manual_seed(spec.seed + (dist.get_rank() if ddp else 0))
    b, s = spec.batch_size, spec.image_size
    x1 = torch.randn(b, 3, s, s, device=device, generator=g)
    x2 = torch.randn(b, 3, s, s, device=device, generator=g)
    marks: dict[int, float] = {}
    for step in range(1, steps + 1):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.bf16):
            z = net(torch.cat([x1, x2]))
            loss = nt_xent(z[:b], z[b:], spec.temperature)
        loss.backward()
        if spec.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.clip_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step()
        if step in marks_at:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            marks[step] = time.perf_counter()
    return marks
