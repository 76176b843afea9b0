"""CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023): the timm ViT as image tower, a causal text
transformer, a learnable temperature (clamped), and a contrastive loss over the global batch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Config
from pipeline.data.loader import Batch
from pipeline.losses.ssl import clip_loss, siglip_loss
from pipeline.methods.base import Method
from pipeline.text import TextTransformer, build_tokenizer


class CLIP(Method):
    recipe = "clip"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        c = self.ccfg = cfg.method.clip
        self.tokenize, vocab_size = build_tokenizer(c.tokenizer, c.context_length)
        self.image_projection = nn.Linear(self.embed_dim, c.embed_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=self.embed_dim ** -0.5)
        self.text = TextTransformer(vocab_size, c.context_length, c.text_width, c.text_depth, c.text_heads,
                                    c.embed_dim)
        self.siglip = c.loss == "siglip"
        init_scale = math.log(10.0) if self.siglip else math.log(1 / c.init_temperature)
        self.logit_scale = nn.Parameter(torch.tensor(init_scale))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if self.siglip else None
        self.max_log_scale = math.log(c.max_logit_scale)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_projection(self.encoder(images)).float(), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens).float(), dim=-1)

    def tokens_of(self, batch: Batch) -> torch.Tensor:
        if batch.tokens is not None:
            return batch.tokens
        if batch.texts is None or any(t is None for t in batch.texts):
            raise ValueError("CLIP needs a caption per sample: shards with a 'txt' field (data.text_key)")
        return self.tokenize(batch.texts).to(batch.views[0].device, non_blocking=True)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        img, txt = self.encode_image(batch.views[0]), self.encode_text(self.tokens_of(batch))
        scale = self.logit_scale.exp()
        if self.siglip:
            loss = siglip_loss(img, txt, scale, self.logit_bias)
        else:
            loss = clip_loss(img, txt, scale, self.ccfg.local_loss)
        return loss, {"logit_scale": scale.detach()}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        self.logit_scale.clamp_(0, self.max_log_scale)  # as open_clip, after every optimizer step

    @torch.no_grad()
    def zero_shot_classifier(self, classnames: list[str], templates: tuple[str, ...] | None = None) -> torch.Tensor:
        """C x D class embeddings: the normalised mean of each class's normalised prompt embeddings."""
        templates = templates or self.ccfg.zero_shot_templates
        device = self.logit_scale.device
        rows = []
        for name in classnames:
            emb = self.encode_text(self.tokenize([t.format(name) for t in templates]).to(device))
            rows.append(F.normalize(emb.mean(dim=0), dim=-1))
        return torch.stack(rows)

    def blocks(self) -> list[nn.Module]:
        return super().blocks() + list(self.text.blocks)
