"""Method registry: ``method.name`` picks one."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.methods.base import Method
from pipeline.methods.simclr import SimCLR

METHODS: dict[str, type[Method]] = {
    "simclr": SimCLR,
}


def build_method(cfg: Config) -> Method:
    if cfg.method.name not in METHODS:
        raise KeyError(f"unknown method.name {cfg.method.name!r}; known: {', '.join(METHODS)}")
    return METHODS[cfg.method.name](cfg)
