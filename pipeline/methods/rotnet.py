"""Rotation prediction (Gidaris et al. 2018): classify which of 0, 90, 180, 270 degrees an image was rotated by."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Config
from pipeline.data.loader import Batch
from pipeline.methods.base import Method


def rotate_batch(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate image i of ``x`` (N x C x H x W, square) by ``k[i]`` quarter turns counter-clockwise."""
    out = x.clone()
    for turns in range(1, 4):
        sel = k == turns
        out[sel] = torch.rot90(x[sel], turns, dims=(2, 3))
    return out


class RotNet(Method):
    recipe = "single"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.all_rotations = cfg.method.rotnet.all_rotations
        self.head = nn.Linear(self.embed_dim, 4)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch.views[0]
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"rotation prediction needs square views, got {tuple(x.shape[-2:])}")
        b = x.shape[0]
        if self.all_rotations:
            labels = torch.arange(4, device=x.device).repeat_interleave(b)
            x = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
        else:
            labels = torch.randint(0, 4, (b,), device=x.device)
            x = rotate_batch(x, labels)
        logits = self.head(self.encoder(x))
        loss = F.cross_entropy(logits.float(), labels)
        return loss, {"rotation_accuracy": (logits.argmax(1) == labels).float().mean().detach()}
