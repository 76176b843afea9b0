"""MoCo v3 (Chen, Xie & He 2021): a query encoder with projector and predictor, a momentum key encoder (EMA,
cosine momentum schedule), and a symmetrised InfoNCE whose keys are gathered from every rank."""

from __future__ import annotations

import torch

from pipeline.config import Config
from pipeline.data.loader import Batch
from pipeline.losses.ssl import moco_infonce
from pipeline.methods.base import Method
from pipeline.models import ema_update, mlp


class MoCoV3(Method):
    recipe = "byol"  # MoCo v3 uses BYOL's asymmetric augmentations

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        m, c = cfg.method, cfg.method.mocov3
        self.temperature, self.base_momentum = c.temperature, c.momentum
        self.projector = mlp(self.embed_dim, m.proj_hidden_dim, m.proj_dim, num_layers=c.proj_layers, norm="bn",
                             last_norm=True)
        self.predictor = mlp(m.proj_dim, c.pred_hidden_dim, m.proj_dim, num_layers=2, norm="bn")
        self.momentum_encoder = self.make_teacher(self.encoder)
        self.momentum_projector = self.make_teacher(self.projector)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if len(batch.views) < 2:
            raise ValueError(f"MoCo v3 needs two views per sample, the loader gave {len(batch.views)}")
        b = batch.size
        x = torch.cat(batch.views[:2])
        h = self.encoder(x)  # one encoder pass over both views; heads per view (BatchNorm statistics per view)
        q1, q2 = (self.predictor(self.projector(h[i * b:(i + 1) * b])) for i in range(2))
        with torch.no_grad():
            hk = self.momentum_encoder(x)
            k1, k2 = (self.momentum_projector(hk[i * b:(i + 1) * b]) for i in range(2))
        loss = moco_infonce(q1, k2, self.temperature) + moco_infonce(q2, k1, self.temperature)
        return loss, {}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        m = self.ema_momentum(self.base_momentum, step, total_steps)
        ema_update(self.momentum_encoder, self.encoder, m)
        ema_update(self.momentum_projector, self.projector, m)
