"""MAE (He et al. 2022): encode a random 25% of the patches with the ViT, reconstruct the rest with a light
decoder, loss on the masked patches' normalised pixels. Only ``encoder`` (the plain timm ViT) is exported."""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import Config, ConfigError
from pipeline.data.loader import Batch
from pipeline.losses.ssl import mae_loss
from pipeline.methods.base import Method
from pipeline.models import init_vit_xavier, sincos_pos_embed_2d, use_fixed_pos_embed, vit_tokens, xavier_init_


def random_masking(n: int, length: int, ratio: float, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random subset of ``length * (1 - ratio)`` patches: (kept indices, mask 1=removed, restore)."""
    keep = max(1, int(length * (1 - ratio)))
    ids_shuffle = torch.rand(n, length, device=device).argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(n, length, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], torch.gather(mask, 1, ids_restore), ids_restore


class MAE(Method):
    recipe = "mae"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        from timm.models.vision_transformer import Block

        enc, c = self.encoder, cfg.method.mae
        if not hasattr(enc, "patch_embed") or getattr(enc, "pos_embed", None) is None:
            raise ConfigError(f"MAE needs a ViT with absolute position embeddings, got {cfg.model.name}")
        if c.decoder_dim % 4:
            raise ConfigError(f"method.mae.decoder_dim must be a multiple of 4, got {c.decoder_dim}")
        # As models_mae.py: the encoder's position embedding is the fixed 2-D sin-cos table (held as a buffer named
        # pos_embed, so timm loads the export), and weights are xavier-initialised.
        use_fixed_pos_embed(enc)
        init_vit_xavier(enc, split_qkv=False, cls_std=0.02)
        self.mask_ratio, self.norm_pix = c.mask_ratio, c.norm_pix_loss
        self.patch_size = enc.patch_embed.patch_size[0]
        self.grid = tuple(enc.patch_embed.grid_size)
        self.decoder_embed = nn.Linear(self.embed_dim, c.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(c.decoder_dim, self.grid), persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(c.decoder_dim, c.decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(c.decoder_dim)
        self.decoder_pred = nn.Linear(c.decoder_dim, self.patch_size ** 2 * 3)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            xavier_init_(m)

    def encode_visible(self, imgs: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """timm's ``forward_features`` with the masked patches dropped after the position embedding."""
        return vit_tokens(self.encoder, imgs, keep=keep_idx)

    def decode(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        npre = self.encoder.num_prefix_tokens
        x = self.decoder_embed(x)
        prefix, visible = x[:, :npre], x[:, npre:]
        n, length = ids_restore.shape
        full = torch.cat([visible, self.mask_token.to(x.dtype).expand(n, length - visible.shape[1], -1)], dim=1)
        full = torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
        x = torch.cat([prefix, full + self.decoder_pos_embed.to(x.dtype)], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, npre:]

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        imgs = batch.views[0]
        length = math.prod(self.grid)
        keep_idx, mask, ids_restore = random_masking(imgs.shape[0], length, self.mask_ratio, imgs.device)
        pred = self.decode(self.encode_visible(imgs, keep_idx), ids_restore)
        return mae_loss(pred, imgs, mask, self.patch_size, self.norm_pix), {}

    def blocks(self) -> list[nn.Module]:
        return super().blocks() + list(self.decoder_blocks)
