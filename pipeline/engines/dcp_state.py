"""State handling shared by the engines whose state is torch's own (DDP, FSDP2): torch.distributed.checkpoint.

``get_state_dict`` gives the model and optimizer state keyed by parameter FQN whatever the wrapping (plain
tensors under DDP, ``DTensor`` shards under FSDP2), and ``dcp.save`` writes each rank's part once. The files
hold global shapes and offsets, so ``dcp.load`` reshards: a checkpoint written by W ranks resumes on any number
of ranks, and ``read_model_state`` reads it in one process without a process group (export).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from pipeline.engines.base import Engine
from pipeline.methods.base import Method


class DCPStateEngine(Engine):
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
        dcp.load(state, checkpoint_id=str(path / "dcp"), no_dist=True)  # this process alone, group or not
        return state["model"]
