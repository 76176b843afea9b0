"""DINOv2 (Oquab et al. 2024; facebookresearch/dinov2 ``train/ssl_meta_arch.py``): DINO's image-level loss on
multi-crop, plus iBOT's masked-patch distillation with its own head, the KoLeo regulariser on the student's class
tokens, and Sinkhorn-Knopp (or DINO's centring) turning teacher outputs into targets.

The student sees the two global crops with block-wise masks (a mask token replaces the masked patch embeddings) and
the local crops unmasked; the EMA teacher sees the global crops unmasked. Losses, as the reference sums them:

* DINO: the student's class token on every view against the teacher's target on each other global crop (global
  crop A against teacher B and B against A; every local crop against both), averaged over those pairs;
* iBOT: on each masked patch of the global crops, the student's patch token against the teacher's on the same
  patch, through the iBOT heads, each crop's patches weighted by 1 / its masked count, divided by the crops;
* KoLeo: ``koleo_weight`` x the sum over the two global crops of KoLeo on the student's (pre-head) class tokens.

Cross-rank terms, all through ``pipeline.losses.gather``: Sinkhorn-Knopp's sums (and counts) and the centres are
over the global batch; KoLeo searches neighbours in the global batch (``koleo_global_batch``); the DINO and iBOT
cross-entropies are per-sample with per-rank normalisers that are equal on every rank (tests/test_dinov2_ijepa.py
checks all of it against one process on the concatenated batch).

Both heads are DINO's ``DINOHead``; dinov2 always trains their weight-norm scale (the DINOv2 presets set
``method.dino.norm_last_layer=false``), and holds both prototype layers still for the first epoch. The encoder's
learning rate decays layer-wise (``layerwise_decay``, ``patch_embed_lr_mult``) as dinov2's param groups.

Deviations from the reference, on purpose:

* the gradient is clipped as ``optim.clip_grad_mode`` says (dinov2 clips the backbone and each head on its own
  norm);
* the iBOT head is always separate from the DINO head (dinov2's ``ibot.separate_head=true``, its ViT-L/g configs;
  sharing one head is not offered);
* in ``centering`` mode the iBOT centre is the mean over the masked teacher patches of the global batch (the
  reference averages over a padded buffer of a fixed upper bound of rows);
* KoLeo over the global batch unless ``koleo_global_batch=false`` (dinov2: each rank's own crops);
* masks are drawn in the method, not in the loader's collate (``pipeline.methods.masking``);
* position embedding, class and register tokens are exempt from weight decay (as in every method here; dinov2
  exempts only biases and norms), and register tokens sit in layer 0 of the layer-wise decay (dinov2 leaves them at
  the full rate, for want of a name it matches).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import Config, ConfigError
from pipeline.data.loader import Batch
from pipeline.losses.ssl import (
    dino_cross_entropy,
    global_row_mean,
    ibot_patch_loss,
    koleo_loss,
    sinkhorn_knopp,
)
from pipeline.methods.dino import DINO, DINOHead
from pipeline.methods.masking import ibot_masks, to_device
from pipeline.models import ema_update, vit_tokens


class DINOv2(DINO):
    recipe = "dino"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)  # encoder, DINO head, their EMA teachers, DINO centre, step counter
        c = self.v2cfg = cfg.method.dinov2
        if not hasattr(self.encoder, "patch_embed"):
            raise ConfigError(f"DINOv2 masks patch tokens: it needs a ViT, got {cfg.model.name}")
        self.do_ibot = c.ibot_weight > 0 and c.mask_probability > 0 and c.mask_ratio[1] > 0
        if self.do_ibot:
            self.ibot_head = DINOHead(self.embed_dim, c.ibot_out_dim, c.ibot_hidden_dim, c.ibot_bottleneck_dim,
                                      self.dcfg.norm_last_layer)
            self.teacher_ibot_head = self.make_teacher(self.ibot_head)
            self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))  # zeros, as dinov2's backbone
            self.register_buffer("ibot_center", torch.zeros(1, c.ibot_out_dim))

    def targets(self, logits: torch.Tensor, center: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
        """Teacher outputs -> target distributions, over the global batch; updates ``center`` in centring mode."""
        if self.v2cfg.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp, self.v2cfg.sinkhorn_iterations)
        out = torch.softmax((logits.float() - center) / temp, dim=-1)
        m = self.dcfg.center_momentum
        center.mul_(m).add_(global_row_mean(logits), alpha=1 - m)  # used from the next step on, as DINO's
        return out

    def sample_masks(self, n: int, grid: tuple[int, int]) -> torch.Tensor:
        """Block-wise masks of ``n`` global crops (n x L bool, on the host), from this rank's RNG."""
        c = self.v2cfg
        return ibot_masks(n, grid, c.mask_ratio, c.mask_probability, c.mask_min_patches, c.mask_max_fraction,
                          c.mask_min_aspect)[0]

    def forward(self, batch: Batch, masks: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``masks`` (2B x L bool on the host, global crop A's rows then B's) replaces the sampled ones (tests)."""
        views = batch.views
        if len(views) < 2:
            raise ValueError(f"DINOv2 needs at least two global views, the loader gave {len(views)}")
        b, c = batch.size, self.v2cfg
        glob = torch.cat(views[:2])
        npre, temp = self.encoder.num_prefix_tokens, self.teacher_temp()
        if self.do_ibot:
            ph, pw = self.encoder.patch_embed.patch_size
            masks = self.sample_masks(2 * b, (glob.shape[-2] // ph, glob.shape[-1] // pw)) if masks is None else masks
            masks = masks.cpu()
            idx = masks.flatten().nonzero().flatten()  # on the host: no device sync for the variable length
            weights = (1.0 / masks.sum(1).clamp(min=1)).unsqueeze(1).expand_as(masks)[masks]
            masks, idx, weights = (to_device(t, glob.device) for t in (masks, idx, weights))

        with torch.no_grad():
            t_tokens = vit_tokens(self.teacher_encoder, glob)
            t_cls = self.teacher_encoder.forward_head(t_tokens, pre_logits=True)
            teacher = list(self.targets(self.teacher_head(t_cls), self.center, temp).split(b))
            if self.do_ibot:
                t_patch = self.teacher_ibot_head(t_tokens[:, npre:].flatten(0, 1).index_select(0, idx))
                ibot_targets = self.targets(t_patch, self.ibot_center, temp)

        s_tokens = vit_tokens(self.encoder, glob, mask=masks if self.do_ibot else None,
                              mask_token=self.mask_token if self.do_ibot else None)
        s_cls = self.encoder.forward_head(s_tokens, pre_logits=True)
        student = list(self.head(s_cls).split(b))
        if len(views) > 2:  # local crops share a size: one pass, unmasked
            student += list(self.head(self.encoder(torch.cat(views[2:]))).split(b))
        dino = dino_cross_entropy(student, teacher, self.dcfg.student_temp)
        loss, metrics = dino, {"dino": dino.detach()}
        if c.koleo_weight > 0:  # per global crop: never between the two crops of one image
            koleo = sum(koleo_loss(x, c.koleo_global_batch) for x in s_cls.split(b))
            loss = loss + c.koleo_weight * koleo
            metrics["koleo"] = koleo.detach()
        if self.do_ibot:
            s_patch = self.ibot_head(s_tokens[:, npre:].flatten(0, 1).index_select(0, idx))
            ibot = ibot_patch_loss(s_patch, ibot_targets, weights, 2 * b, self.dcfg.student_temp)
            loss = loss + c.ibot_weight * ibot
            metrics["ibot"] = ibot.detach()
        return loss, metrics

    def lr_scale(self, name: str) -> float:
        """Learning-rate factor of parameter ``name`` (dinov2 ``get_vit_lr_decay_rate`` and ``patch_embed_lr_mult``):
        layer 0 is the patch embedding, position embedding, class and mask tokens, layer i + 1 block i, layer n + 1
        the rest of the encoder and the heads, each at decay^(n + 1 - layer)."""
        c, n = self.v2cfg, len(self.encoder.blocks)
        layer = n + 1
        if name == "mask_token" or name.startswith(
                ("encoder.patch_embed.", "encoder.pos_embed", "encoder.cls_token", "encoder.reg_token")):
            layer = 0
        elif name.startswith("encoder.blocks."):
            layer = int(name.split(".")[2]) + 1
        scale = c.layerwise_decay ** (n + 1 - layer)
        return scale * c.patch_embed_lr_mult if name.startswith("encoder.patch_embed.") else scale

    def param_groups(self, weight_decay: float) -> list[dict]:
        """DINO's groups (weight decay or not, the last layers held still), each split by ``lr_scale``."""
        names = {id(p): n for n, p in self.named_parameters()}
        out: dict[tuple, dict] = {}
        for group in super().param_groups(weight_decay):
            for p in group["params"]:
                scale = self.lr_scale(names[id(p)])
                key = (group["weight_decay"], group.get("frozen_steps", 0), scale)
                out.setdefault(key, {**group, "params": [], "lr_scale": scale})["params"].append(p)
        return list(out.values())

    def last_layers(self) -> list[nn.Parameter]:
        """Both heads' prototype layers are held still for ``freeze_last_layer_steps`` (dinov2 ``is_last_layer``)."""
        return super().last_layers() + (list(self.ibot_head.last_layer.parameters()) if self.do_ibot else [])

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        super().after_step(step, total_steps)
        if self.do_ibot:
            ema_update(self.teacher_ibot_head, self.ibot_head, self.ema_momentum(self.dcfg.momentum, step, total_steps))
