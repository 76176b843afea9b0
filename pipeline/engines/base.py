"""The engine interface: the one place that wraps the model, runs backward and the optimizer step, and saves,
loads and exports state. Method, loader and trainer are the same whichever engine is chosen."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from pipeline.config import Config
from pipeline.data.loader import Batch
from pipeline.distributed import DistEnv
from pipeline.methods.base import Method
from pipeline.models import held_tensors
from pipeline.schedules import GroupSchedule, cosine, warmup_cosine


def resolve_precision(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None for fp32). ``auto`` is bf16 on GPUs that support it, fp32 elsewhere."""
    p = cfg.engine.precision
    if p == "fp32" or (p == "auto" and not (device.type == "cuda" and torch.cuda.is_bf16_supported())):
        return None
    return torch.bfloat16


class Engine:
    """Subclasses implement ``_wrap``, ``save``, ``load``, ``method_state_dict`` and ``read_model_state``, and
    ``micro_step``/``step`` where the wrapped model runs its own backward and step (DeepSpeed); the rest is
    shared."""

    name = "base"

    def __init__(self, cfg: Config, env: DistEnv, device: torch.device) -> None:
        self.cfg, self.env, self.device = cfg, env, device
        self.dtype = resolve_precision(cfg, device)
        self.method: Method | None = None
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    # -- set-up -----------------------------------------------------------------------------------------------
    def setup(self, method: Method, total_steps: int) -> None:
        self.method = method
        self._wrap(method, total_steps)

    def _wrap(self, method: Method, total_steps: int) -> None:
        raise NotImplementedError

    def build_optimizer(self, method: Method, total_steps: int) -> None:
        o = self.cfg.optim
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(method.param_groups(o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                                           eps=o.eps, fused=fused or None)
        lrs = warmup_cosine(total_steps, o.warmup_steps, o.lr, o.min_lr)
        wd_end = o.weight_decay if o.weight_decay_end is None else o.weight_decay_end
        self.scheduler = GroupSchedule(self.optimizer, lrs, cosine(total_steps, o.weight_decay, wd_end))

    # -- one step ---------------------------------------------------------------------------------------------
    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def sync_context(self, sync: bool):
        """Context for a micro-step; ``sync=False`` skips gradient communication during accumulation."""
        return contextlib.nullcontext()

    def micro_step(self, batch: Batch, sync: bool, scale: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of one micro-batch; the loss is scaled by ``scale`` (1/accumulation)."""
        with self.sync_context(sync):
            with self.autocast():
                loss, metrics = self.model(batch)
            (loss * scale).backward()
        return loss.detach(), metrics

    def step(self, skip_nonfinite: bool = False) -> torch.Tensor | None:
        """Clip, step the optimizer and the schedule, zero gradients. Returns the pre-clip grad norm (device).

        ``skip_nonfinite``: if the (rank-averaged, so identical everywhere) gradient norm is not finite, drop
        the update and return None. This reads the norm on the host: one sync per step."""
        o = self.cfg.optim
        frozen = self.frozen_params()
        for p in frozen:  # held groups: no gradient in the norm, the clipping or AdamW's moments
            if p.grad is not None:
                p.grad.zero_()
        params = [p for p in self.method.parameters() if p.requires_grad]
        if o.clip_grad_mode == "per_param" and o.clip_grad_norm > 0:
            norm = clip_grad_norm_per_param_(params, o.clip_grad_norm)
        else:
            clip = o.clip_grad_norm if o.clip_grad_norm > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
            if hasattr(norm, "full_tensor"):  # sharded gradients (FSDP2) give a DTensor norm
                norm = norm.full_tensor()
        if skip_nonfinite and not torch.isfinite(norm).item():
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        self._reset_optimizer_state(frozen)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def frozen_params(self) -> list[torch.Tensor]:
        """Parameters of the groups a method holds still at this step (``frozen_steps``, DINO's last layer)."""
        s = self.scheduler.last_epoch  # the step about to be taken (the schedule set its lr already)
        return [p for g in self.optimizer.param_groups if s < g.get("frozen_steps", 0) for p in g["params"]]

    @torch.no_grad()
    def _reset_optimizer_state(self, params: list[torch.Tensor]) -> None:
        """AdamW state of held parameters back to its initial zeros (step count included), so the first update
        after the freeze is a fresh AdamW's, as when DINO's ``cancel_gradients_last_layer`` sets the gradient to
        None and AdamW skips the parameter (facebookresearch/dino ``utils.py``). The state is kept rather than
        deleted so that checkpoints of every step hold the same keys."""
        for p in params:
            for v in self.optimizer.state.get(p, {}).values():
                if torch.is_tensor(v):
                    v.zero_()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        """The schedule's learning rate at this step (groups with an ``lr_scale`` train at a multiple of it)."""
        group = self.optimizer.param_groups[0]
        return group["lr"] / group.get("lr_scale", 1.0)

    def resident_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The training state this rank holds, by kind: ``params`` (what the model computes with: this rank's
        shards under FSDP2 and ZeRO-3), ``master`` (separate copies the optimizer steps instead of the
        parameters: none here, AdamW steps the parameters themselves), ``grads`` and ``optim`` (AdamW's moments
        and step counts). Tensors may be views of one buffer: count their storages once
        (``pipeline.bench.memory``). Read it between backward and ``step`` to see the gradients."""
        params = list(self.method.parameters())
        grads = [t for p in params if p.grad is not None for t in held_tensors(p.grad)]
        optim = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return {"params": [t for p in params for t in held_tensors(p)], "master": [], "grads": grads, "optim": optim}

    # -- state ------------------------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Write model + optimizer + scheduler state into the (existing, empty) folder ``path``. Collective."""
        raise NotImplementedError

    def load(self, path: Path) -> None:
        """Restore what ``save`` wrote. Collective."""
        raise NotImplementedError

    def method_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full (unsharded) method state dict on rank 0, None elsewhere. Collective."""
        raise NotImplementedError

    @classmethod
    def read_model_state(cls, path: Path, method: Method) -> dict[str, torch.Tensor]:
        """Full method state dict from a checkpoint folder, in one process without a process group (export)."""
        raise NotImplementedError


@torch.no_grad()
def clip_grad_norm_per_param_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """DINO's ``utils.clip_gradients`` (facebookresearch/dino): each parameter's gradient is scaled by
    ``max_norm / (norm + 1e-6)`` when that is below 1, on its own norm rather than the global one. Returns the
    global norm before clipping (what is logged). Sharded gradients (FSDP2 ``DTensor``, dim-0 shards of one mesh)
    have their per-parameter squared norms summed over the mesh in one all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    local = [held_tensors(g)[0] for g in grads]  # FSDP2: this rank's shard, the gradient's own storage
    sq = torch.stack([t.float().pow(2).sum() for t in local])
    if hasattr(grads[0], "device_mesh"):
        import torch.distributed as dist

        dist.all_reduce(sq, group=grads[0].device_mesh.get_group())
    norms = sq.sqrt()
    for t, c in zip(local, (max_norm / (norms + 1e-6)).clamp(max=1.0)):
        t.mul_(c.to(t.dtype))
    return sq.sum().sqrt()
