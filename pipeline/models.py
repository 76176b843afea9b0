"""Encoders and heads. Model code knows nothing of distribution: engines wrap what is built here."""

from __future__ import annotations

import math

import timm
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.config import ConfigError, ModelConfig
from pipeline.losses.gather import all_reduce_sum, world


def build_encoder(cfg: ModelConfig) -> nn.Module:
    """A timm model with its classifier removed (``num_classes=0``): ``encoder(x)`` gives pooled features of
    size ``encoder.num_features``. Never downloads weights (``pretrained=False``)."""
    try:
        model = timm.create_model(cfg.name, pretrained=False, **cfg.timm_kwargs())
    except RuntimeError as exc:
        raise ConfigError(f"model.name={cfg.name!r}: {exc}") from exc
    return model


def vit_tokens(encoder: nn.Module, imgs: torch.Tensor, keep: torch.Tensor | None = None,
               mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """timm ViT ``forward_features`` (prefix tokens, then patch tokens, after the final norm) with the two masked
    inputs self-supervised methods need, both on row-major patch indices:

    * ``mask`` (N x L bool) with ``mask_token`` (1 x D): masked patch embeddings are replaced by the token before
      the position embedding is added (iBOT, DINOv2 ``prepare_tokens_with_masks``);
    * ``keep`` (N x K indices): only those patches go through the blocks, after the position embedding (MAE,
      I-JEPA's context encoder). Prefix tokens (class and register tokens: ``num_prefix_tokens``) always stay.
    """
    x = encoder.patch_embed(imgs)  # N x L x D, or N x H x W x D with dynamic_img_size
    if mask is not None:
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        x = torch.where(mask.unsqueeze(-1), mask_token.to(flat.dtype), flat).view_as(x)
    x = encoder._pos_embed(x)  # prefix tokens and position embedding, as forward_features
    if keep is not None:
        npre = encoder.num_prefix_tokens
        patches = torch.gather(x[:, npre:], 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :npre], patches], dim=1)
    x = encoder.norm_pre(encoder.patch_drop(x))
    if getattr(encoder, "grad_checkpointing", False) and torch.is_grad_enabled():
        from timm.models._manipulate import checkpoint_seq

        x = checkpoint_seq(encoder.blocks, x)
    else:
        x = encoder.blocks(x)
    return encoder.norm(x)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (1 x H*W x dim) of a row-major patch grid: [sin, cos] of the
    column, then of the row, frequencies 1 / 10000^(i / (dim/4)) (MAE ``util/pos_embed.py``; MoCo v3
    ``vits.py: build_2d_sincos_position_embedding`` has the same values with rows and columns swapped, which a
    square grid cannot tell apart)."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def embed(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed(xs), embed(ys)], dim=1).float().unsqueeze(0)


def freeze_as_buffer(module: nn.Module, name: str, value: torch.Tensor | None = None) -> None:
    """Turn parameter ``name`` of ``module`` into a persistent buffer of the same name (``value`` or its current
    data): the state dict keys stay timm's, so the exported encoder still loads into ``timm.create_model``, and
    every parameter of the encoder keeps training (engines treat frozen parameters as EMA teachers)."""
    data = getattr(module, name).detach().clone() if value is None else value
    delattr(module, name)
    module.register_buffer(name, data)


def use_fixed_pos_embed(encoder: nn.Module) -> None:
    """Replace a timm ViT's learnable absolute position embedding by the fixed 2-D sin-cos one (zeros for the class
    and register tokens), as MAE and MoCo v3 train their ViTs."""
    pos = getattr(encoder, "pos_embed", None)
    if pos is None or not hasattr(encoder, "patch_embed"):
        raise ValueError(f"{type(encoder).__name__} has no absolute position embedding to fix")
    grid = tuple(encoder.patch_embed.grid_size)
    table = sincos_pos_embed_2d(pos.shape[-1], grid)
    prefix = pos.shape[1] - table.shape[1]
    freeze_as_buffer(encoder, "pos_embed", torch.cat([table.new_zeros(1, prefix, table.shape[-1]), table], dim=1))


@torch.no_grad()
def xavier_init_(module: nn.Module, split_qkv: bool = False) -> None:
    """Every Linear of ``module`` xavier-uniform with zero bias (``split_qkv``: the q, k and v thirds of a fused
    ``qkv`` each as its own matrix, as MoCo v3), LayerNorms at 1 and 0 (MAE ``models_mae.py: _init_weights``)."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            if split_qkv and name.endswith("qkv"):
                bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@torch.no_grad()
def init_vit_xavier(encoder: nn.Module, split_qkv: bool, cls_std: float) -> None:
    """Re-initialise a timm ViT as MAE (``models_mae.py: initialize_weights``) and MoCo v3 (``vits.py``) do instead
    of timm's truncated normal: :func:`xavier_init_`, the patch projection xavier-uniform on its flattened weight
    with zero bias, the class token N(0, cls_std^2) (MAE 0.02, MoCo v3 1e-6)."""
    xavier_init_(encoder, split_qkv)
    proj = encoder.patch_embed.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)
    if getattr(encoder, "cls_token", None) is not None:
        nn.init.normal_(encoder.cls_token, std=cls_std)


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, norm: str = "none",
        last_norm: bool = False, act: str = "relu") -> nn.Sequential:
    """Projection/prediction MLP: (Linear [-> BN] -> act) x (num_layers-1) -> Linear [-> BN without affine];
    ``norm`` is ``bn`` or ``none``.

    With ``norm="bn"`` no Linear has a bias (a BatchNorm follows the hidden ones; the references' last layers
    have none: BYOL ``networks.py``, MoCo v3 ``builder.py: _build_mlp``, Barlow Twins ``main.py``, VICReg
    ``main_vicreg.py``, SimCLR ``model_util.py``), and the activation is ReLU, as in all of them; DINO's head
    (``norm="none"``) has biases and GELU (dino ``vision_transformer.py: DINOHead``). ``last_norm`` ends in
    BatchNorm without affine: MoCo v3's projector and ViT predictor; SimCLR's last BatchNorm keeps a scale, which
    MoCo v3 drops "for simplicity" and so do we."""
    activations = {"relu": nn.ReLU, "gelu": nn.GELU}
    if act not in activations:
        raise ValueError(f"mlp act={act!r} is not one of {', '.join(activations)}")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(dim, hidden_dim, bias=norm == "none"))
        if norm == "bn":
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(activations[act]())
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=norm == "none" and not last_norm))
    if last_norm:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d that normalises with the statistics of the global batch (every rank's rows) in training, as
    ``torch.nn.SyncBatchNorm`` does, and as MoCo v3, BYOL, Barlow Twins and VICReg train their heads.

    ``torch.nn.SyncBatchNorm`` refuses CPU tensors (torch 2.14: "expected input tensor to be on GPU"), so the
    statistics go through the gather module instead: differentiable all-reduces of the per-feature sum of x, then
    of the squared deviations from the global mean (two passes, as torch's own batch norm: E[x^2] - E[x]^2 in one
    pass cancels catastrophically when |mean| >> std), whose summing backward gives every rank the gradient all
    ranks' losses send through the statistics (exact under DDP's averaging, as for the global losses in
    ``pipeline.losses.ssl``). The same code
    runs on gloo and NCCL and under every engine. One process, eval mode, or ``global_stats=False``
    (``method.sync_bn=false``): BatchNorm1d over this rank's rows. State dict keys are BatchNorm1d's, so
    checkpoints move between ``method.sync_bn`` settings.

    Every head BatchNorm is one of these, synced or not, because of DeepSpeed bf16: it casts parameters to bf16
    but leaves buffers fp32, and torch's batch_norm refuses bf16 weights beside fp32 running statistics. Here
    the per-rank path then normalises in the buffers' dtype."""

    def __init__(self, *args, global_stats: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.global_stats = global_stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, ws = world()
        if ws == 1 or not self.training or not self.global_stats:
            return self._local(x)
        n = x.shape[0] * ws  # the loaders give every rank the same batch size
        xf = x.float()
        mean = all_reduce_sum(xf.sum(dim=0)) / n
        xc = xf - mean
        var = all_reduce_sum(xc.pow(2).sum(dim=0)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), m)  # unbiased, as BN
        y = xc * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        if not self.affine or self.running_mean is None or self.weight.dtype == self.running_mean.dtype:
            return super().forward(x)
        dtype = self.running_mean.dtype  # updated in place: compute in the buffers' dtype
        m = 0.0
        if self.training:  # as BatchNorm1d.forward: count the batch; momentum None is the cumulative average
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        y = F.batch_norm(x.to(dtype), self.running_mean, self.running_var, self.weight.to(dtype),
                         self.bias.to(dtype), self.training, m, self.eps)
        return y.to(x.dtype)


def sync_batchnorm(module: nn.Module, global_stats: bool = True) -> nn.Module:
    """Swap every ``nn.BatchNorm1d`` in ``module`` for a :class:`GlobalBatchNorm1d` with the same state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            synced = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats, global_stats=global_stats)
            synced.load_state_dict(child.state_dict())
            synced.requires_grad_(any(p.requires_grad for p in child.parameters()))  # teachers stay frozen
            setattr(module, name, synced)
        else:
            sync_batchnorm(child, global_stats)
    return module


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameter names exempt from weight decay: biases, norms (1-D params) and timm's own list."""
    skip = set()
    timm_skip: set[str] = set()
    for name, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            prefix = f"{name}." if name else ""
            timm_skip |= {prefix + n for n in module.no_weight_decay()}
    for name, p in model.named_parameters():
        if p.ndim <= 1 or name in timm_skip or name.endswith(".bias"):
            skip.add(name)
    return skip


def held_tensors(p: torch.Tensor) -> list[torch.Tensor]:
    """The tensors holding this rank's values of a parameter, whatever engine wraps the model.

    Engines shard a teacher exactly like the student it tracks, so lerping what each rank holds is the whole
    EMA update. A plain tensor (DDP, ZeRO-1/2) is itself; an FSDP2 ``DTensor`` holds its local shard; a ZeRO-3
    parameter holds its partition ``ds_tensor`` and, while gathered (ZeRO-3 keeps small "persistent" parameters
    gathered between steps), also its full ``data``."""
    if hasattr(p, "ds_tensor"):
        held = [p.ds_tensor]
        if p.data.numel() == p.ds_numel:
            held.append(p.data)
        return held
    if hasattr(p, "to_local"):  # DTensor; under no_grad to_local() is the local shard itself, not a copy
        return [p.to_local()]
    return [p.detach()]


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, parameter by parameter (buffers copied).

    Valid on sharded models too (FSDP2 DTensors, ZeRO-3 partitions): see ``held_tensors``."""
    t_held, o_held = [], []
    for tp, op in zip(target.parameters(), online.parameters(), strict=True):
        t, o = held_tensors(tp), held_tensors(op)
        if len(t) != len(o) or any(a.shape != b.shape for a, b in zip(t, o)):
            raise ValueError(f"EMA target and online parameters are held differently ({tp.shape} vs {op.shape}): "
                             f"the engine must shard the teacher like the student")
        t_held += t
        o_held += [b if b.dtype == a.dtype else b.to(a.dtype) for a, b in zip(t, o)]  # fp32 teacher, bf16 student
    torch._foreach_lerp_(t_held, o_held, 1.0 - momentum)
    for tb, ob in zip(target.buffers(), online.buffers()):
        tb.copy_(ob)
