"""I-JEPA (Assran et al. 2023; facebookresearch/ijepa ``src/train.py``): from the tokens of one context block, a
narrow transformer predictor predicts the EMA target encoder's latents of several target blocks of the same image,
with no hand-made augmentation beyond a random resized crop (recipe ``ijepa``).

Per image (``pipeline.methods.masking.multiblock_masks``): 4 target blocks (scale 0.15-0.2, aspect 0.75-1.5) and a
square context block (scale 0.85-1) with the target patches removed. The target encoder sees the whole image; its
last-layer patch tokens, layer-normed without affine parameters, at the target positions are the targets. The
context encoder (the exported ``encoder``) sees only the context patches (dropped after the position embedding);
the predictor maps them to its width, adds its fixed 2-D sine-cosine position embedding, appends one mask token
per target patch (plus that patch's position) for each target block separately, and projects its outputs back to
the encoder's width. Loss: smooth L1 over the global batch. The target encoder's EMA momentum rises linearly.

Prefix tokens (a class token, register tokens) go through both encoders with the patches and are never predicted;
the I-JEPA presets build the encoder without a class token and pool the mean of the normed patch tokens
(``model.class_token=false``, ``model.global_pool=avg``, ``model.fc_norm=false``), as the paper evaluates.

The encoder's position embedding is the reference's fixed 2-D sine-cosine table (a buffer under timm's name).

Deviations from the reference, on purpose:

* block sizes are drawn per rank, not from a seed every rank shares, and the loss divides by the global element
  count, so it is still the global batch's mean;
* a block's scale and aspect are two draws (the reference reuses one for both), and blocks may touch the last row
  and column (the reference's ``randint`` never places them there), both in ``masking``;
* masks are drawn in the method, not in the loader's collate;
* the learning rate warms up from ~0 (the reference from ``start_lr``), along the pipeline's shared schedule.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Config, ConfigError
from pipeline.data.loader import Batch
from pipeline.losses.ssl import ijepa_loss
from pipeline.methods.base import Method
from pipeline.methods.masking import multiblock_masks, to_device
from pipeline.models import ema_update, sincos_pos_embed_2d, use_fixed_pos_embed, vit_tokens


class IJEPAPredictor(nn.Module):
    """ijepa ``VisionTransformerPredictor``: Linear to ``dim``, transformer blocks over context tokens followed by
    mask tokens at the target positions, LayerNorm, Linear back to the encoder's width."""

    def __init__(self, embed_dim: int, dim: int, depth: int, heads: int, grid: tuple[int, int]) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        norm = partial(nn.LayerNorm, eps=1e-6)
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid), persistent=False)  # fixed, as ijepa's
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm)
                                    for _ in range(depth))
        self.norm = norm(dim)
        self.proj = nn.Linear(dim, embed_dim)
        for m in self.modules():  # ijepa ``init_model``: trunc normal 0.02 linears, zero biases, unit LayerNorms
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, context: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor) -> torch.Tensor:
        """context: N x Kc x D tokens at patches ``ctx_idx`` (N x Kc); ``tgt_idx``: N x T x Kt. Returns the
        predictions N x T x Kt x D, each target block predicted in a sequence of its own."""
        n, t, kt = tgt_idx.shape
        pos = self.pos_embed[0].to(context.dtype)
        x = self.embed(context) + pos[ctx_idx]
        kc, dim = x.shape[1], x.shape[2]
        x = x.unsqueeze(1).expand(n, t, kc, dim).reshape(n * t, kc, dim)
        queries = (self.mask_token.to(x.dtype) + pos[tgt_idx].reshape(n * t, kt, dim))
        x = torch.cat([x, queries], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.proj(self.norm(x)[:, kc:]).reshape(n, t, kt, -1)


class IJEPA(Method):
    recipe = "ijepa"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        enc, c = self.encoder, cfg.method.ijepa
        self.icfg = c
        if not hasattr(enc, "patch_embed") or getattr(enc, "pos_embed", None) is None:
            raise ConfigError(f"I-JEPA needs a ViT with absolute position embeddings, got {cfg.model.name}")
        if c.predictor_dim % 4 or self.embed_dim % 4:
            raise ConfigError(f"I-JEPA's sine-cosine position embeddings need widths divisible by 4, got "
                              f"method.ijepa.predictor_dim={c.predictor_dim} and an encoder of {self.embed_dim}")
        self.grid = tuple(enc.patch_embed.grid_size)
        # The reference's fixed 2-D sine-cosine position embedding (zeros for prefix tokens), a buffer under timm's
        # name so the export still loads into timm.
        use_fixed_pos_embed(enc)
        heads = c.predictor_heads or getattr(enc.blocks[0].attn, "num_heads", 1)
        if c.predictor_dim % heads:
            raise ConfigError(f"method.ijepa.predictor_dim={c.predictor_dim} is not divisible by {heads} heads; "
                              f"set method.ijepa.predictor_heads")
        self.predictor = IJEPAPredictor(self.embed_dim, c.predictor_dim, c.predictor_depth, heads, self.grid)
        self.target_encoder = self.make_teacher(self.encoder)

    def sample_masks(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Context (N x Kc) and target (N x T x Kt) patch indices on the host, from this rank's RNG."""
        c = self.icfg
        return multiblock_masks(n, self.grid, c.num_targets, c.target_scale, c.target_aspect, c.context_scale,
                                c.min_keep, c.allow_overlap)

    def forward(self, batch: Batch, masks: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``masks`` (context, target indices as ``sample_masks`` returns) replaces the sampled ones (tests)."""
        imgs = batch.views[0]
        p = self.encoder.patch_embed.patch_size
        if (imgs.shape[-2] // p[0], imgs.shape[-1] // p[1]) != self.grid:
            raise ValueError(f"I-JEPA: {tuple(imgs.shape[-2:])} px views do not make the model's {self.grid} patch "
                             f"grid; set augment.image_size to model.img_size")
        ctx, tgt = self.sample_masks(imgs.shape[0]) if masks is None else masks
        ctx, tgt = to_device(ctx, imgs.device), to_device(tgt, imgs.device)
        npre = self.encoder.num_prefix_tokens
        with torch.no_grad():
            h = vit_tokens(self.target_encoder, imgs)[:, npre:]
            h = F.layer_norm(h.float(), (h.shape[-1],))  # over features, no affine parameters, as the reference
            t, kt = tgt.shape[1], tgt.shape[2]
            target = torch.gather(h.unsqueeze(1).expand(-1, t, -1, -1), 2,
                                  tgt.unsqueeze(-1).expand(-1, -1, -1, h.shape[-1]))
        context = vit_tokens(self.encoder, imgs, keep=ctx)[:, npre:]
        pred = self.predictor(context, ctx, tgt)
        return ijepa_loss(pred, target), {"context_patches": torch.tensor(float(ctx.shape[1])),
                                          "target_patches": torch.tensor(float(kt * t))}

    def momentum(self, step: int, total_steps: int) -> float:
        """Linear from ``momentum`` at step 0 towards ``momentum_end`` (ijepa's ``momentum_scheduler``)."""
        c = self.icfg
        return c.momentum + (c.momentum_end - c.momentum) * step / max(1, total_steps)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        ema_update(self.target_encoder, self.encoder, self.momentum(step, total_steps))

    def blocks(self) -> list[nn.Module]:
        return super().blocks() + list(self.predictor.blocks)
