"""Text side of image-text methods: an offline BPE tokenizer and a causal text transformer (CLIP's)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.config import ConfigError

Tokenizer = Callable[[list[str]], torch.Tensor]


def build_tokenizer(name: str, context_length: int) -> tuple[Tokenizer, int]:
    """``(tokenize, vocab_size)``; ``tokenize(texts)`` gives a B x context_length LongTensor padded with 0, each
    row ``<start> ... <end>`` (truncated captions keep the end token), and the end token has the highest id."""
    if name == "clip_bpe":
        try:
            from open_clip.tokenizer import SimpleTokenizer
        except ImportError as exc:
            raise ImportError("method.clip.tokenizer=clip_bpe needs open-clip-torch (pip install open-clip-torch): "
                              "its wheel ships CLIP's BPE vocabulary, so nothing is downloaded") from exc
        tok = SimpleTokenizer(context_length=context_length)
        return (lambda texts: tok(list(texts))), len(tok.encoder)
    raise ConfigError(f"method.clip.tokenizer={name!r} is not one of clip_bpe")


class TextTransformer(nn.Module):
    """CLIP's text tower: token + learned position embeddings, pre-norm transformer blocks with a causal mask,
    final LayerNorm, features at the end token (the row's highest id), linear projection."""

    def __init__(self, vocab_size: int, context_length: int, width: int, depth: int, heads: int,
                 embed_dim: int) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection.weight, std=width ** -0.5)

    def no_weight_decay(self) -> set[str]:
        return {"positional_embedding"}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        for blk in self.blocks:
            x = blk(x, is_causal=True)
        x = self.ln_final(x)
        eot = tokens.argmax(dim=-1)
        return self.text_projection(x[torch.arange(x.shape[0], device=x.device), eot])
