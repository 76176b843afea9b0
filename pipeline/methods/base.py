"""The method interface: a method owns its networks and its loss; the trainer only calls ``forward``."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import Config
from pipeline.data.loader import Batch
from pipeline.models import build_encoder, no_weight_decay_names


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
