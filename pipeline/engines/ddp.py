"""DistributedDataParallel (and plain single-process) engine; checkpoints through torch.distributed.checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from pipeline.engines.base import Engine
from pipeline.methods.base import Method


class DDPEngine(Engine):
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

    def _state(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.method, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, path: Path) -> None:
        dcp.save(self._state(), checkpoint_id=str(path / "dcp"))
        if self.env.is_main:
            torch.save({"scheduler": self.scheduler.state_dict()}, path / "engine.pt")

    def load(self, path: Path) -> None:
        state = self._state()
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        set_state_dict(self.method, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(torch.load(path / "engine.pt", weights_only=True)["scheduler"])

    def method_state_dict(self) -> dict[str, torch.Tensor] | None:
        sd = get_model_state_dict(self.method, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.env.is_main else None

    @classmethod
    def read_model_state(cls, path: Path, method: Method) -> dict[str, torch.Tensor]:
        state = {"model": method.state_dict()}
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        return state["model"]
