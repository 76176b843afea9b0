"""MoCo v3 (Chen, Xie & He 2021): a query encoder with projector and predictor, a momentum key encoder (EMA,
cosine momentum schedule), and a symmetrised InfoNCE whose keys are gathered from every rank. ViT encoders get
MoCo v3's ViT recipe (facebookresearch/moco-v3 ``vits.py``, ``builder.py``, CONFIG.md): fixed 2-D sin-cos
position embedding, xavier init, a frozen random patch projection (``--stop-grad-conv1``) and a predictor ending in
BatchNorm without affine."""

from __future__ import annotations

import torch

from pipeline.config import Config
from pipeline.data.loader import Batch
from pipeline.losses.ssl import moco_infonce
from pipeline.methods.base import Method
from pipeline.models import ema_update, freeze_as_buffer, init_vit_xavier, mlp, use_fixed_pos_embed


class MoCoV3(Method):
    recipe = "byol"  # MoCo v3 uses BYOL's asymmetric augmentations

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        m, c = cfg.method, cfg.method.mocov3
        self.temperature, self.base_momentum = c.temperature, c.momentum
        enc = self.encoder
        vit = hasattr(enc, "patch_embed") and getattr(enc, "pos_embed", None) is not None
        if vit:  # VisionTransformerMoCo (moco-v3 vits.py): fixed 2-D sin-cos positions, xavier init
            use_fixed_pos_embed(enc)
            init_vit_xavier(enc, split_qkv=True, cls_std=1e-6)
            if c.stop_grad_conv1:  # --stop-grad-conv1: the random patch projection never trains
                freeze_as_buffer(enc.patch_embed.proj, "weight")
                if enc.patch_embed.proj.bias is not None:
                    freeze_as_buffer(enc.patch_embed.proj, "bias")
        self.projector = mlp(self.embed_dim, m.proj_hidden_dim, m.proj_dim, num_layers=c.proj_layers, norm="bn",
                             last_norm=True)
        # builder.py MoCo_ViT: the predictor ends in BatchNorm without affine too (MoCo_ResNet's does not)
        self.predictor = mlp(m.proj_dim, c.pred_hidden_dim, m.proj_dim, num_layers=2, norm="bn", last_norm=vit)
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
