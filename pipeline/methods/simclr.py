"""SimCLR (Chen et al. 2020): two augmented views, projection MLP with BatchNorm, NT-Xent over the global batch."""

from __future__ import annotations

import torch

from pipeline.config import Config
from pipeline.data.loader import Batch
from pipeline.losses.contrastive import nt_xent
from pipeline.methods.base import Method
from pipeline.models import mlp


class SimCLR(Method):
    recipe = "simclr"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        m = cfg.method
        # SimCLR normalises every head layer (google-research/simclr model_util.py: projection_head, BN on each
        # linear layer, the last without ReLU): global BatchNorm like the other methods' heads (method.sync_bn).
        self.projector = mlp(self.embed_dim, m.proj_hidden_dim, m.proj_dim, num_layers=m.simclr.proj_layers,
                             norm="bn", last_norm=True)
        self.temperature, self.local_loss = m.simclr.temperature, m.simclr.local_loss

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if len(batch.views) < 2:
            raise ValueError(f"SimCLR needs two views per sample, the loader gave {len(batch.views)}")
        b = batch.size
        z = self.projector(self.encoder(torch.cat(batch.views[:2])))  # one pass over both views
        loss = nt_xent(z[:b], z[b:], self.temperature, self.local_loss)
        return loss, {}
