"""Encoders and heads. Model code knows nothing of distribution: engines wrap what is built here."""

from __future__ import annotations

import timm
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.config import ModelConfig
from pipeline.losses.gather import all_reduce_sum, world


def build_encoder(cfg: ModelConfig) -> nn.Module:
    """A timm model with its classifier removed (``num_classes=0``): ``encoder(x)`` gives pooled features of
    size ``encoder.num_features``. Never downloads weights (``pretrained=False``)."""
    try:
        model = timm.create_model(cfg.name, pretrained=False, **cfg.timm_kwargs())
    except RuntimeError as exc:
        raise ValueError(f"model.name={cfg.name!r}: {exc}") from exc
    return model


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, norm: str = "none",
        last_norm: bool = False) -> nn.Sequential:
    """Projection/prediction MLP: (Linear [-> BN] -> GELU) x (num_layers-1) -> Linear [-> BN without affine]."""
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(dim, hidden_dim, bias=norm == "none"))
        if norm == "bn":
            layers.append(nn.BatchNorm1d(hidden_dim))
        elif norm == "ln":
            layers.append(nn.LayerNorm(hidden_dim))
        layers.append(nn.GELU())
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not last_norm))
    if last_norm:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d that normalises with the statistics of the global batch (every rank's rows) in training, as
    ``torch.nn.SyncBatchNorm`` does, and as MoCo v3, BYOL, Barlow Twins and VICReg train their heads.

    ``torch.nn.SyncBatchNorm`` refuses CPU tensors (torch 2.14: "expected input tensor to be on GPU"), so the
    statistics go through the gather module instead: differentiable all-reduces of the per-feature sum of x, then
    of the squared deviations from the global mean (two passes, as torch's own batch norm: E[x^2] - E[x]^2 in one
    pass cancels catastrophically when |mean| >> std), whose summing backward gives every rank the gradient all
    ranks' losses send through the statistics (exact under DDP's averaging, as for the global losses in
    ``pipeline.losses.ssl``). The same code
    runs on gloo and NCCL and under every engine. One process, eval mode, or ``global_stats=False``
    (``method.sync_bn=false``): BatchNorm1d over this rank's rows. State dict keys are BatchNorm1d's, so
    checkpoints move between ``method.sync_bn`` settings.

    Every head BatchNorm is one of these, synced or not, because of DeepSpeed bf16: it casts parameters to bf16
    but leaves buffers fp32, and torch's batch_norm refuses bf16 weights beside fp32 running statistics. Here
    the per-rank path then normalises in the buffers' dtype."""

    def __init__(self, *args, global_stats: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.global_stats = global_stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, ws = world()
        if ws == 1 or not self.training or not self.global_stats:
            return self._local(x)
        n = x.shape[0] * ws  # the loaders give every rank the same batch size
        xf = x.float()
        mean = all_reduce_sum(xf.sum(dim=0)) / n
        xc = xf - mean
        var = all_reduce_sum(xc.pow(2).sum(dim=0)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), m)  # unbiased, as BN
        y = xc * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        if not self.affine or self.running_mean is None or self.weight.dtype == self.running_mean.dtype:
            return super().forward(x)
        dtype = self.running_mean.dtype  # updated in place: compute in the buffers' dtype
        m = 0.0
        if self.training:  # as BatchNorm1d.forward: count the batch; momentum None is the cumulative average
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        y = F.batch_norm(x.to(dtype), self.running_mean, self.running_var, self.weight.to(dtype),
                         self.bias.to(dtype), self.training, m, self.eps)
        return y.to(x.dtype)


def sync_batchnorm(module: nn.Module, global_stats: bool = True) -> nn.Module:
    """Swap every ``nn.BatchNorm1d`` in ``module`` for a :class:`GlobalBatchNorm1d` with the same state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            synced = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats, global_stats=global_stats)
            synced.load_state_dict(child.state_dict())
            synced.requires_grad_(any(p.requires_grad for p in child.parameters()))  # teachers stay frozen
            setattr(module, name, synced)
        else:
            sync_batchnorm(child, global_stats)
    return module


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameter names exempt from weight decay: biases, norms (1-D params) and timm's own list."""
    skip = set()
    timm_skip: set[str] = set()
    for name, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            prefix = f"{name}." if name else ""
            timm_skip |= {prefix + n for n in module.no_weight_decay()}
    for name, p in model.named_parameters():
        if p.ndim <= 1 or name in timm_skip or name.endswith(".bias"):
            skip.add(name)
    return skip


def held_tensors(p: torch.Tensor) -> list[torch.Tensor]:
    """The tensors holding this rank's values of a parameter, whatever engine wraps the model.

    Engines shard a teacher exactly like the student it tracks, so lerping what each rank holds is the whole
    EMA update. A plain tensor (DDP, ZeRO-1/2) is itself; an FSDP2 ``DTensor`` holds its local shard; a ZeRO-3
    parameter holds its partition ``ds_tensor`` and, while gathered (ZeRO-3 keeps small "persistent" parameters
    gathered between steps), also its full ``data``."""
    if hasattr(p, "ds_tensor"):
        held = [p.ds_tensor]
        if p.data.numel() == p.ds_numel:
            held.append(p.data)
        return held
    if hasattr(p, "to_local"):  # DTensor; under no_grad to_local() is the local shard itself, not a copy
        return [p.to_local()]
    return [p.detach()]


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, parameter by parameter (buffers copied).

    Valid on sharded models too (FSDP2 DTensors, ZeRO-3 partitions): see ``held_tensors``."""
    t_held, o_held = [], []
    for tp, op in zip(target.parameters(), online.parameters(), strict=True):
        t, o = held_tensors(tp), held_tensors(op)
        if len(t) != len(o) or any(a.shape != b.shape for a, b in zip(t, o)):
            raise ValueError(f"EMA target and online parameters are held differently ({tp.shape} vs {op.shape}): "
                             f"the engine must shard the teacher like the student")
        t_held += t
        o_held += [b if b.dtype == a.dtype else b.to(a.dtype) for a, b in zip(t, o)]  # fp32 teacher, bf16 student
    torch._foreach_lerp_(t_held, o_held, 1.0 - momentum)
    for tb, ob in zip(target.buffers(), online.buffers()):
        tb.copy_(ob)
