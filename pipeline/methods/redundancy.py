"""Barlow Twins (Zbontar et al. 2021) and VICReg (Bardes et al. 2022): two views, a wide projector, losses on
statistics of the global batch (all ranks) with exact gradients (see ``pipeline.losses.gather.all_reduce_sum``)."""

from __future__ import annotations

import torch

from pipeline.config import Config
from pipeline.data.loader import Batch
from pipeline.losses.ssl import barlow_twins_loss, vicreg_loss
from pipeline.methods.base import Method
from pipeline.models import mlp


class _TwoViewProjector(Method):
    recipe = "byol"  # both papers use BYOL's asymmetric augmentations

    def __init__(self, cfg: Config, proj_layers: int) -> None:
        super().__init__(cfg)
        m = cfg.method
        self.projector = mlp(self.embed_dim, m.proj_hidden_dim, m.proj_dim, num_layers=proj_layers, norm="bn")

    def embed_views(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if len(batch.views) < 2:
            raise ValueError(f"{type(self).__name__} needs two views per sample, the loader gave {len(batch.views)}")
        b = batch.size
        h = self.encoder(torch.cat(batch.views[:2]))
        return self.projector(h[:b]), self.projector(h[b:])


class BarlowTwins(_TwoViewProjector):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg, cfg.method.barlow_twins.proj_layers)
        self.lambd = cfg.method.barlow_twins.lambd

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z1, z2 = self.embed_views(batch)
        return barlow_twins_loss(z1, z2, self.lambd), {}


class VICReg(_TwoViewProjector):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg, cfg.method.vicreg.proj_layers)
        self.coeffs = cfg.method.vicreg

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z1, z2 = self.embed_views(batch)
        c = self.coeffs
        return vicreg_loss(z1, z2, c.sim_coeff, c.std_coeff, c.cov_coeff)
