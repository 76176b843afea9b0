"""The method interface: a method owns its networks and its loss; the trainer only calls ``forward``."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from pipeline.config import Config, ConfigError
from pipeline.data.loader import Batch
from pipeline.models import build_encoder, no_weight_decay_names


def encode_at_size(cfg: Config, size: int) -> None:
    """A method that feeds the encoder inputs of ``size`` px other than ``model.img_size`` (DINO's local crops,
    jigsaw tiles, context-prediction patches) needs interpolated position embeddings, as the reference ViTs always
    do: turn on ``model.dynamic_img_size``. The config records it, so the export says so too."""
    if size != cfg.model.img_size and not cfg.model.dynamic_img_size:
        cfg.model.dynamic_img_size = True


def check_patch_multiple(encoder: nn.Module, size: int, key: str) -> None:
    """``size`` px inputs must tile into the encoder's patches, or its patch embedding drops their last pixels."""
    patch = getattr(getattr(encoder, "patch_embed", None), "patch_size", (1, 1))
    if size % patch[0] or size % patch[1]:
        raise ConfigError(f"{key}={size} must be a multiple of the model's patch size {tuple(patch)}, or the "
                          "encoder would drop the last pixels of each input")


class Method(nn.Module):
    """A self-supervised objective around a timm encoder.

    ``forward(batch) -> (loss, metrics)`` holds all of the method's logic. ``encoder`` is what gets exported.
    Networks that must not receive gradients (EMA teachers) are registered with ``requires_grad=False`` and
    updated in ``after_step``, which the trainer calls after every optimizer step.
    """

    recipe: str = "simclr"
    """Augmentation recipe this method expects by default."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg.model)
        self.embed_dim: int = self.encoder.num_features

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """Hook after each optimizer step (EMA teacher updates, schedules of method hyper-parameters)."""

    @staticmethod
    def make_teacher(online: nn.Module) -> nn.Module:
        """A frozen copy of ``online`` (same initial weights): an EMA teacher, updated only in ``after_step``.

        The copy has no stochastic regularisation: stochastic depth (timm ``DropPath``) and dropout are set to
        rate 0, so the teacher's targets (and DINO's centre) are a deterministic function of its weights, while
        the student keeps ``model.drop_path_rate``. The references build their teachers that way:
        facebookresearch/dino ``main_dino.py`` builds the student with ``drop_path_rate=args.drop_path_rate``
        and the teacher without (rate 0); MoCo v3 and BYOL regularise neither network. Rates are zeroed in place
        rather than the modules swapped for ``Identity``, so the teacher's module tree and state dict keys stay
        the student's (engines shard both alike) and timm's fused attention still reads ``attn_drop.p``."""
        from timm.layers import DropPath

        teacher = copy.deepcopy(online)
        for m in teacher.modules():
            if isinstance(m, DropPath):
                m.drop_prob = 0.0
            elif isinstance(m, nn.modules.dropout._DropoutNd):
                m.p = 0.0
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    @staticmethod
    def ema_momentum(base: float, step: int, total_steps: int) -> float:
        """Cosine schedule of EMA momentum from ``base`` at step 0 to 1 at the last step (BYOL, MoCo v3, DINO)."""
        if total_steps <= 1:
            return base
        t = min(step, total_steps - 1) / (total_steps - 1)  # the same curve as schedules.cosine(total, base, 1)
        return 1.0 - (1.0 - base) * (1 + math.cos(math.pi * t)) / 2

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: no weight decay on biases, norms, position embeddings and special tokens."""
        skip = no_weight_decay_names(self)
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if name in skip else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def blocks(self) -> list[nn.Module]:
        """Transformer blocks of every trainable network: the units engines shard and checkpoint."""
        return list(getattr(self.encoder, "blocks", []))

    def teacher_blocks(self) -> list[nn.Module]:
        """Transformer blocks of the networks updated without gradients (EMA teachers): by default the ``blocks``
        of every child network whose parameters are all frozen (what ``make_teacher`` returns). Sharding engines
        shard them exactly like the student's blocks (FSDP2: one unit per block, so a teacher is gathered one
        block at a time rather than whole with the root; ZeRO-3 partitions every parameter alike), so each rank
        holds the same slice of a teacher parameter as of the student parameter it tracks and the EMA update
        (``pipeline.models.ema_update``) is a local lerp of shards, with no communication. DDP and ZeRO-1/2
        replicate teachers on every rank."""
        out: list[nn.Module] = []
        for net in self.children():
            params = list(net.parameters())
            if params and not any(p.requires_grad for p in params):
                out += list(getattr(net, "blocks", []))
        return out

    def shard_units(self) -> list[nn.Module]:
        """Every module an engine wraps as its own sharding unit (FSDP2 ``fully_shard``), students first."""
        return self.blocks() + self.teacher_blocks()
