"""Method registry: ``method.name`` picks one."""

from __future__ import annotations

from pipeline.config import Config, ConfigError
from pipeline.data.recipes import Recipe, build_recipe
from pipeline.methods.base import Method
from pipeline.methods.byol import BYOL
from pipeline.methods.clip import CLIP
from pipeline.methods.dino import DINO
from pipeline.methods.dinov2 import DINOv2
from pipeline.methods.ijepa import IJEPA
from pipeline.methods.jigsaw import Jigsaw
from pipeline.methods.mae import MAE
from pipeline.methods.mocov3 import MoCoV3
from pipeline.methods.redundancy import BarlowTwins, VICReg
from pipeline.methods.relative_location import RelativeLocation
from pipeline.methods.rotnet import RotNet
from pipeline.methods.simclr import SimCLR
from pipeline.models import sync_batchnorm

METHODS: dict[str, type[Method]] = {
    "simclr": SimCLR,
    "clip": CLIP,
    "mocov3": MoCoV3,
    "byol": BYOL,
    "barlow_twins": BarlowTwins,
    "vicreg": VICReg,
    "dino": DINO,
    "mae": MAE,
    "rotnet": RotNet,
    # objectives of today's strongest open encoders (issue #15)
    "dinov2": DINOv2,
    "ijepa": IJEPA,
    # pretext tasks (issue #15)
    "jigsaw": Jigsaw,
    "relative_location": RelativeLocation,
}


def method_recipe(cfg: Config) -> Recipe:
    """``augment.recipe``, where ``auto`` means the recipe of the method named by ``method.name``."""
    method = METHODS.get(cfg.method.name)
    return build_recipe(cfg.augment, method_recipe=method.recipe if method else None)


def build_method(cfg: Config) -> Method:
    if cfg.method.name not in METHODS:
        raise ConfigError(f"unknown method.name {cfg.method.name!r}; known: {', '.join(METHODS)}")
    method = METHODS[cfg.method.name](cfg)
    # Global batch statistics in the heads (what the papers' SyncBatchNorm gives); identical in one process.
    return sync_batchnorm(method, global_stats=cfg.method.sync_bn)
