"""Engine registry: ``engine.name`` picks one."""

from __future__ import annotations

import torch

from pipeline.config import Config
from pipeline.distributed import DistEnv
from pipeline.engines.base import Engine
from pipeline.engines.ddp import DDPEngine


def engine_class(name: str) -> type[Engine]:
    if name == "ddp":
        return DDPEngine
    raise KeyError(f"engine.name={name!r} is not available; known: ddp")


def build_engine(cfg: Config, env: DistEnv, device: torch.device) -> Engine:
    return engine_class(cfg.engine.name)(cfg, env, device)
