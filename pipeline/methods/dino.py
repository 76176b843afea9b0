"""DINO (Caron et al. 2021): self-distillation with multi-crop (2 global + N local views), an EMA teacher on the
global views, a centre of the teacher outputs averaged over all ranks, and teacher/student temperatures with a
teacher-temperature warm-up."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Config
from pipeline.data.loader import Batch
from pipeline.data.recipes import dino_local_crops
from pipeline.losses.ssl import dino_batch_center, dino_loss
from pipeline.methods.base import Method, encode_at_size
from pipeline.models import ema_update, mlp


class DINOHead(nn.Module):
    """dino ``vision_transformer.py: DINOHead``: 3-layer MLP to a bottleneck, L2-normalise, then a weight-normalised
    linear layer without bias, written as a row-normalised weight (times a learnable per-row norm ``weight_g``
    unless ``norm_last_layer``) instead of ``nn.utils.weight_norm``; the state dict keys stay under
    ``last_layer``.

    As the reference, the MLP is initialised truncated-normal (std 0.02) and the last layer keeps nn.Linear's
    default init (the reference builds it after ``self.apply(self._init_weights)``): its rows start at ~0.58 norm,
    not 0.32, which sets how fast their directions move under AdamW."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int,
                 norm_last_layer: bool = True) -> None:
        super().__init__()
        self.mlp = mlp(in_dim, hidden_dim, bottleneck_dim, num_layers=3, act="gelu")
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        if not norm_last_layer:  # weight_norm's g, at 1 (reference: weight_g.fill_(1)), trained
            self.last_layer.register_parameter("weight_g", nn.Parameter(torch.ones(out_dim, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        w = F.normalize(self.last_layer.weight, dim=1)
        g = getattr(self.last_layer, "weight_g", None)
        return F.linear(x, w if g is None else w * g)


class DINO(Method):
    recipe = "dino"

    def __init__(self, cfg: Config) -> None:
        a = cfg.augment
        if dino_local_crops(a):
            encode_at_size(cfg, a.local_crop_size)  # local crops smaller than the model's input
        super().__init__(cfg)
        c = self.dcfg = cfg.method.dino
        self.head = DINOHead(self.embed_dim, c.out_dim, c.hidden_dim, c.bottleneck_dim, c.norm_last_layer)
        self.teacher_encoder = self.make_teacher(self.encoder)
        self.teacher_head = self.make_teacher(self.head)
        self.register_buffer("center", torch.zeros(1, c.out_dim))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        """Optimizer steps taken (drives the teacher-temperature warm-up; checkpointed with the method)."""

    def teacher_temp(self) -> torch.Tensor:
        """Linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp``, then constant; a device tensor so
        the step needs no host sync."""
        c = self.dcfg
        frac = (self.steps_done.float() / max(1, c.warmup_teacher_temp_steps)).clamp(max=1.0)
        return c.warmup_teacher_temp + (c.teacher_temp - c.warmup_teacher_temp) * frac

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        views = batch.views
        if len(views) < 2:
            raise ValueError(f"DINO needs at least two global views, the loader gave {len(views)}")
        b = batch.size
        glob = torch.cat(views[:2])
        student = list(self.head(self.encoder(glob)).split(b))
        if len(views) > 2:  # local crops share a size: one pass
            student += list(self.head(self.encoder(torch.cat(views[2:]))).split(b))
        with torch.no_grad():
            teacher = list(self.teacher_head(self.teacher_encoder(glob)).split(b))
        loss = dino_loss(student, teacher, self.center, self.dcfg.student_temp, self.teacher_temp())
        with torch.no_grad():
            m = self.dcfg.center_momentum
            self.center.mul_(m).add_(dino_batch_center(teacher), alpha=1 - m)
        return loss, {}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The base groups, with the head's last layer in a group of its own held still for
        ``freeze_last_layer_steps`` (DINO's ``cancel_gradients_last_layer`` drops its gradient for the first
        epoch). The schedule holds the group's lr at 0, which every engine honours; DDP and FSDP2 also zero its
        gradient before clipping and keep its AdamW state at the initial zeros (``Engine.step``), which is what
        dropping the gradient does. Kept deviation under DeepSpeed: its step owns clipping and AdamW on flat
        partitions, so there the frozen layer's gradient still enters the global clipping norm and AdamW's
        moments (the weights stay put all the same)."""
        groups = super().param_groups(weight_decay)
        if self.dcfg.freeze_last_layer_steps > 0:
            last = self.last_layers()
            groups[0]["params"] = [p for p in groups[0]["params"] if all(p is not q for q in last)]
            groups.append({"params": last, "weight_decay": weight_decay,
                           "frozen_steps": self.dcfg.freeze_last_layer_steps})
        return groups

    def last_layers(self) -> list[nn.Parameter]:
        """The prototype layers held still for ``freeze_last_layer_steps``: weight, and weight_g unless
        norm_last_layer."""
        return list(self.head.last_layer.parameters())

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        m = self.ema_momentum(self.dcfg.momentum, step, total_steps)
        ema_update(self.teacher_encoder, self.encoder, m)
        ema_update(self.teacher_head, self.head, m)
        self.steps_done.fill_(step + 1)
