"""DistributedDataParallel (and plain single-process) engine; checkpoints through torch.distributed.checkpoint.

EMA teachers are replicated: DDP leaves parameters without gradients alone, and every rank applies the same
update to the same values."""

from __future__ import annotations

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pipeline.engines.dcp_state import DCPStateEngine
from pipeline.methods.base import Method


class DDPEngine(DCPStateEngine):
    name = "ddp"

    def _wrap(self, method: Method, total_steps: int) -> None:
        method.to(self.device)
        if self.cfg.model.grad_checkpointing and hasattr(method.encoder, "set_grad_checkpointing"):
            method.encoder.set_grad_checkpointing(True)
        if self.cfg.engine.compile:
            for block in method.blocks():
                block.compile()
        self.build_optimizer(method, total_steps)
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.model = DistributedDataParallel(
                method, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True,
            )
        else:
            self.model = method

    def sync_context(self, sync: bool):
        if not sync and isinstance(self.model, DistributedDataParallel):
            return self.model.no_sync()
        return super().sync_context(sync)
