"""DINO (Caron et al. 2021): self-distillation with multi-crop (2 global + N local views), an EMA teacher on the
global views, a centre of the teacher outputs averaged over all ranks, and teacher/student temperatures with a
teacher-temperature warm-up."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Config, ConfigError
from pipeline.data.loader import Batch
from pipeline.losses.ssl import dino_batch_center, dino_loss
from pipeline.methods.base import Method
from pipeline.models import ema_update, mlp


class DINOHead(nn.Module):
    """3-layer MLP to a bottleneck, L2-normalise, then a weight-normalised linear layer without bias whose norm
    is fixed to 1 (DINO's ``norm_last_layer=True``), written as a normalised weight instead of weight_norm."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int) -> None:
        super().__init__()
        self.mlp = mlp(in_dim, hidden_dim, bottleneck_dim, num_layers=3)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.last_layer.weight, dim=1))


class DINO(Method):
    recipe = "dino"

    def __init__(self, cfg: Config) -> None:
        a = cfg.augment
        if a.local_crops and a.local_crop_size != cfg.model.img_size and not cfg.model.dynamic_img_size:
            raise ConfigError(f"DINO's {a.local_crop_size}px local crops need model.dynamic_img_size=true "
                              f"(the model is built for {cfg.model.img_size}px)")
        super().__init__(cfg)
        c = self.dcfg = cfg.method.dino
        self.head = DINOHead(self.embed_dim, c.out_dim, c.hidden_dim, c.bottleneck_dim)
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
            last = self.head.last_layer.weight
            groups[0]["params"] = [p for p in groups[0]["params"] if p is not last]
            groups.append({"params": [last], "weight_decay": weight_decay,
                           "frozen_steps": self.dcfg.freeze_last_layer_steps})
        return groups

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        m = self.ema_momentum(self.dcfg.momentum, step, total_steps)
        ema_update(self.teacher_encoder, self.encoder, m)
        ema_update(self.teacher_head, self.head, m)
        self.steps_done.fill_(step + 1)
