"""Relative patch location, or context prediction (Doersch, Gupta & Efros 2015, "Unsupervised Visual
Representation Learning by Context Prediction"): lay a 3x3 grid of patches with gaps over a view, jitter every
patch, encode the centre patch and one of its 8 neighbours with the shared encoder, and classify where the
neighbour lies (8 ways).

As in the authors' siamese network, each patch goes through the encoder on its own (a small image:
``model.dynamic_img_size``), the two features are concatenated, centre first, and an MLP (their fc7, fc8) gives
the 8 logits. The loader yields one plain view (recipe ``single``: crop and flip, rendered the same by DALI and
torchvision); the grid, jitter and the authors' countermeasures against trivial cues are drawn in ``forward`` on
the device from the trainer's per-rank RNG:

- gap and jitter: neighbouring patches are ``gap`` pixels apart, each moved by up to ``jitter`` pixels per axis,
  so neither continuing edges nor aligned lines give the answer;
- colour dropping: keep one random channel of each patch, replace the other two by faint noise (chromatic
  aberration shifts colours with the distance from the lens centre, which would tell positions);
- downsampling: a third of the patches shrunk to as few as 100 pixels and enlarged back (robustness to
  pixelation);
- per-patch normalisation of mean and scale.

Reference code read: cdoersch/deepcontext ``train.py`` (96 px patches, 48 px gap, jitter of up to 7 px,
``prep_image``, label order of ``pos2lbl``). Deviations are commented where they are made.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.config import Config, ConfigError
from pipeline.data.loader import Batch
from pipeline.methods.base import Method, check_patch_multiple, encode_at_size
from pipeline.methods.jigsaw import crop_at
from pipeline.models import mlp

NEIGHBOURS = torch.tensor([(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)])
"""(row, column) offset of the neighbour for each label 0..7: the authors' labels 1 2 3 / 4 _ 5 / 6 7 8, from 0."""


def resample_down_up(x: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """Patch i of ``x`` (N x C x P x P) resized to ``side[i]`` x ``side[i]`` and back to P x P, both bilinear without
    antialiasing, in one batch whatever the sides: equal to
    ``F.interpolate(F.interpolate(x[i:i+1], side[i], mode="bilinear"), P, mode="bilinear")`` (align_corners=False,
    the authors' ``caffe.io.resize``, order 1), with no host sync for the per-patch sizes.

    Written as four ``grid_sample`` reads of ``x``: each output pixel blends the 2x2 low-resolution pixels the
    upsampling reads, and each of those is itself a bilinear read of ``x`` at the centre the downsampling uses."""
    n, _, size, _ = x.shape
    s = side.to(x.dtype).view(n, 1)
    i = torch.arange(size, device=x.device, dtype=x.dtype).view(1, size)
    src = ((i + 0.5) * s / size - 0.5).clamp(min=0)  # N x P: where upsampling reads the low-resolution image
    k0 = src.floor()
    w1 = src - k0
    k1 = torch.minimum(k0 + 1, s - 1)
    to_grid = []  # low-resolution index k -> grid_sample coordinate of the high-resolution point it was read at
    for k in (k0, k1):
        hi = ((k + 0.5) * size / s - 0.5).clamp(min=0)
        to_grid.append((2 * hi + 1) / size - 1)
    out = torch.zeros_like(x)
    for a, wy in ((0, 1 - w1), (1, w1)):
        for b, wx in ((0, 1 - w1), (1, w1)):
            grid = torch.stack(torch.broadcast_tensors(to_grid[b].unsqueeze(1), to_grid[a].unsqueeze(2)), dim=-1)
            read = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
            out = out + read * (wy.unsqueeze(2) * wx.unsqueeze(1)).unsqueeze(1)
    return out


def drop_colours(x: torch.Tensor, noise: float = 0.01) -> torch.Tensor:
    """Keep one random channel of each patch (minus its mean) and replace the others with Gaussian noise of
    ``noise`` times that channel's standard deviation (the paper's colour dropping; the authors' code draws
    uniform noise of one grey level, about 1/200 of a channel's spread)."""
    n, c = x.shape[:2]
    keep = torch.randint(0, c, (n,), device=x.device)
    kept = x[torch.arange(n, device=x.device), keep].unsqueeze(1)  # N x 1 x P x P
    kept = kept - kept.mean(dim=(2, 3), keepdim=True)
    sd = kept.std(dim=(2, 3), keepdim=True)
    is_kept = (torch.arange(c, device=x.device).view(1, c) == keep.view(n, 1)).view(n, c, 1, 1)
    return torch.where(is_kept, kept, torch.randn_like(x) * noise * sd)


class RelativeLocation(Method):
    recipe = "single"

    def __init__(self, cfg: Config) -> None:
        c = self.rcfg = cfg.method.relative_location
        self.pitch = c.patch_size + c.gap
        span = 2 * self.pitch + c.patch_size
        if cfg.augment.image_size < span + 2 * c.jitter:
            raise ConfigError(f"method.relative_location: a 3x3 grid of {c.patch_size} px patches {c.gap} px apart, "
                              f"jittered by up to {c.jitter} px, needs augment.image_size >= {span + 2 * c.jitter}, "
                              f"got {cfg.augment.image_size}")
        encode_at_size(cfg, c.patch_size)  # patches smaller than the model's input
        super().__init__(cfg)
        check_patch_multiple(self.encoder, c.patch_size, "method.relative_location.patch_size")
        # built by a factory, so a surrounding torch.device (the meta device of the FLOP counter) places it
        self.register_buffer("neighbours", torch.tensor(NEIGHBOURS.tolist()), persistent=False)
        # The authors' fc7 and fc8 (4096 each) then fc9 to 8 classes, on [centre, neighbour]. (Their fc6/fc7 have
        # BatchNorm; here the pair head has none, so its output does not depend on how a batch is split over ranks.)
        self.head = mlp(2 * self.embed_dim, c.hidden_dim, 8, num_layers=3)

    def sample_grid(self, b: int, size: int, device: torch.device) -> torch.Tensor:
        """Top-left corners (B x 9 x 2, pixels, rows in raster order, centre at 4) of a jittered 3x3 patch grid placed
        uniformly at random in a ``size`` px view: cell (r, c) at ``start + (r, c) * (patch + gap)`` moved by a
        uniform integer in [-jitter, jitter] per axis (the authors' ``sample_patch``), always inside the view."""
        c = self.rcfg
        room = size - (2 * self.pitch + c.patch_size) - 2 * c.jitter
        start = c.jitter + torch.randint(0, room + 1, (b, 1, 2), device=device)
        k = torch.arange(9, device=device)
        cells = torch.stack([k // 3, k % 3], dim=-1).view(1, 9, 2) * self.pitch
        jitter = torch.randint(-c.jitter, c.jitter + 1, (b, 9, 2), device=device)
        return start + cells + jitter

    def preprocess(self, patches: torch.Tensor) -> torch.Tensor:
        """The countermeasures against trivial cues, each patch on its own (N x C x P x P)."""
        c = self.rcfg
        n, size = patches.shape[0], patches.shape[-1]
        if c.downsample_prob > 0:
            # The authors' side: sqrt of a uniform pixel count in [min_pixels, (P-1)^2] (10..95 px for 96 px patches).
            pixels = c.min_pixels + torch.rand(n, device=patches.device) * ((size - 1) ** 2 - c.min_pixels)
            side = pixels.sqrt().floor().clamp(1, size)
            shrink = (torch.rand(n, device=patches.device) < c.downsample_prob).view(n, 1, 1, 1)
            patches = torch.where(shrink, resample_down_up(patches, side), patches)
        if c.color_dropping:
            patches = drop_colours(patches)
        if c.normalize_patches:  # the authors' code: mean removed (above, per kept channel, or here), then unit RMS
            if not c.color_dropping:
                patches = patches - patches.mean(dim=(1, 2, 3), keepdim=True)
            patches = patches / patches.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-6)
        return patches

    def make_pairs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Preprocessed patches (B x K x C x P x P: the centre first, then the neighbours asked about), the labels
        of those neighbours (B x (K-1)) and the corners of all nine grid cells (B x 9 x 2)."""
        b, ch = x.shape[:2]
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"relative location needs square views, got {tuple(x.shape[-2:])}")
        corners = self.sample_grid(b, x.shape[-1], x.device)
        if self.rcfg.all_neighbours:
            labels = torch.arange(8, device=x.device).expand(b, 8)
        else:
            labels = torch.randint(0, 8, (b, 1), device=x.device)
        offsets = self.neighbours[labels]  # B x K-1 x 2
        cells = torch.cat([torch.full((b, 1), 4, device=x.device), 4 + offsets[..., 0] * 3 + offsets[..., 1]], dim=1)
        pick = corners[torch.arange(b, device=x.device).unsqueeze(1), cells]  # B x K x 2
        pick = pick.unsqueeze(2).expand(-1, -1, ch, -1)  # every channel of a patch at the same corner
        patches = crop_at(x, pick[..., 0], pick[..., 1], self.rcfg.patch_size)
        # In fp32 whatever the views' dtype (DeepSpeed bf16 feeds bf16): resampling coordinates and per-patch
        # statistics in bf16 would be off by up to half a pixel and a percent.
        patches = self.preprocess(patches.flatten(0, 1).float()).to(x.dtype).view_as(patches)
        return patches, labels, corners

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch.views[0]
        b = x.shape[0]
        patches, labels, _ = self.make_pairs(x)
        k = patches.shape[1]
        feats = self.encoder(patches.flatten(0, 1)).view(b, k, -1)  # every patch on its own, shared encoder
        centre = feats[:, :1].expand(-1, k - 1, -1)
        logits = self.head(torch.cat([centre, feats[:, 1:]], dim=-1)).flatten(0, 1)
        labels = labels.flatten()
        loss = F.cross_entropy(logits.float(), labels)
        return loss, {"location_accuracy": (logits.argmax(1) == labels).float().mean().detach()}
