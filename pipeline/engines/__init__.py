"""Engine registry: ``engine.name`` picks one (``deepspeed`` is imported only when chosen)."""

from __future__ import annotations

import torch

from pipeline.config import Config
from pipeline.distributed import DistEnv
from pipeline.engines.base import Engine

ENGINES = ("ddp", "fsdp", "deepspeed")


def engine_class(name: str) -> type[Engine]:
    if name == "ddp":
        from pipeline.engines.ddp import DDPEngine

        return DDPEngine
    if name == "fsdp":
        from pipeline.engines.fsdp import FSDPEngine

        return FSDPEngine
    if name == "deepspeed":
        from pipeline.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine
    raise KeyError(f"engine.name={name!r} is not available; known: {', '.join(ENGINES)}")


def build_engine(cfg: Config, env: DistEnv, device: torch.device) -> Engine:
    return engine_class(cfg.engine.name)(cfg, env, device)
