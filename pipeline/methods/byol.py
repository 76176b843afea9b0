"""BYOL (Grill et al. 2020): online encoder + projector + predictor regress an EMA target's projection of the
other view (normalised MSE, symmetrised), on BYOL's asymmetric pair of augmentations."""

from __future__ import annotations

import torch

from pipeline.config import Config
from pipeline.data.loader import Batch
from pipeline.losses.ssl import byol_loss
from pipeline.methods.base import Method
from pipeline.models import ema_update, mlp


class BYOL(Method):
    recipe = "byol"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        m, c = cfg.method, cfg.method.byol
        self.base_momentum = c.momentum
        self.projector = mlp(self.embed_dim, m.proj_hidden_dim, m.proj_dim, num_layers=2, norm="bn")
        self.predictor = mlp(m.proj_dim, c.pred_hidden_dim, m.proj_dim, num_layers=2, norm="bn")
        self.target_encoder = self.make_teacher(self.encoder)
        self.target_projector = self.make_teacher(self.projector)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if len(batch.views) < 2:
            raise ValueError(f"BYOL needs two views per sample, the loader gave {len(batch.views)}")
        b = batch.size
        x = torch.cat(batch.views[:2])
        h = self.encoder(x)
        p1, p2 = (self.predictor(self.projector(h[i * b:(i + 1) * b])) for i in range(2))
        with torch.no_grad():
            ht = self.target_encoder(x)
            z1, z2 = (self.target_projector(ht[i * b:(i + 1) * b]) for i in range(2))
        loss = byol_loss(p1, z2) + byol_loss(p2, z1)
        return loss, {}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        m = self.ema_momentum(self.base_momentum, step, total_steps)
        ema_update(self.target_encoder, self.encoder, m)
        ema_update(self.target_projector, self.projector, m)
