"""FSDP2 engine: ``fully_shard`` per transformer block, then the root; checkpoints through DCP (sharded).

Parallelism is applied in the order torchtitan uses: activation checkpointing, then compile, then sharding.
Every parameter ends up a ``DTensor`` sharded on dim 0 over the data-parallel mesh; the optimizer is built after
sharding, so its state is sharded too (ZeRO-3: each rank holds ~1/W of parameters, gradients and AdamW state).

EMA teachers: ``Method.teacher_blocks()`` are sharded as their own units like the student's blocks, the rest of
the teacher lands in the root unit beside the rest of the student. Teacher and student parameters of the same
shape therefore get the same ``Shard(0)`` layout, and ``ema_update`` lerps local shards, no communication.
Teacher units always reshard after forward: they run under ``no_grad``, so no backward would free them.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from pipeline.distributed import print0
from pipeline.engines.dcp_state import DCPStateEngine
from pipeline.methods.base import Method

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def apply_fsdp(method: Method, mesh, param_dtype: torch.dtype | None, reduce_dtype: torch.dtype | None,
               reshard_after_forward: bool = True, offload: bool = False) -> None:
    """Shard ``method`` in place: each of ``method.shard_units()``, then the root (which takes the rest)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    off = CPUOffloadPolicy(pin_memory=False) if offload else OffloadPolicy()
    teacher = {id(m) for m in method.teacher_blocks()}
    for unit in method.shard_units():
        fully_shard(unit, mesh=mesh, mp_policy=mp, offload_policy=off,
                    reshard_after_forward=True if id(unit) in teacher else reshard_after_forward)
    fully_shard(method, mesh=mesh, mp_policy=mp, offload_policy=off)


class FSDPEngine(DCPStateEngine):
    name = "fsdp"

    def _wrap(self, method: Method, total_steps: int) -> None:
        e = self.cfg.engine
        method.to(self.device)
        if self.cfg.model.grad_checkpointing and hasattr(method.encoder, "set_grad_checkpointing"):
            method.encoder.set_grad_checkpointing(True)
        if e.compile:
            for block in method.blocks():
                block.compile()
        if dist.is_initialized():
            mesh = init_device_mesh(self.device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))
            bf16 = self.dtype is not None
            apply_fsdp(method, mesh, param_dtype=self.dtype, reduce_dtype=DTYPES[e.reduce_dtype] if bf16 else None,
                       reshard_after_forward=e.reshard_after_forward, offload=e.offload != "none")
        else:
            # One process without a process group: nothing to shard. State stays DCP with the same keys, so
            # checkpoints move freely between this and sharded runs.
            print0("engine.name=fsdp in a single process without a process group: running unsharded")
        self.build_optimizer(method, total_steps)  # after sharding: the optimizer holds the DTensor shards
        self.model = method

    def autocast(self):
        # Sharded, FSDP2's MixedPrecisionPolicy casts parameters to bf16 itself (autocast would cast again).
        if isinstance(self.model, FSDPModule):
            return contextlib.nullcontext()
        return super().autocast()

    @contextlib.contextmanager
    def sync_context(self, sync: bool):
        if not isinstance(self.model, FSDPModule):
            yield
            return
        # Off the accumulation boundary, gradients accumulate unsharded and are reduce-scattered only once.
        self.model.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)
