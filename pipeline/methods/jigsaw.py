"""Jigsaw puzzles (Noroozi & Favaro 2016, "Unsupervised Learning of Visual Representations by Solving Jigsaw
Puzzles"): cut a view into a 3x3 grid of tiles, shuffle them by one of N permutations chosen for maximal Hamming
distance, encode every tile with the shared encoder, and classify which permutation was applied.

Form for a ViT: the paper's context-free network (CFN). Each tile goes through the encoder on its own, as a small
image (``model.dynamic_img_size``: 64 px tiles of a /16 ViT are 4x4 patch tokens, 9 tiles about the tokens of one
224 px image); the per-tile features are concatenated in the shuffled order and an MLP predicts the permutation.
The other ViT form, the shuffled patch groups of one image in one sequence, lets attention compare tiles
directly and reads their placement from the position embeddings: it solves the puzzle without the per-tile
features the CFN is built to learn, so we do not use it.

Where tiling happens: the loader yields one ordinary view (recipe ``jigsaw``: random crop at the puzzle's size,
flip, grayscale, rendered the same by DALI and torchvision), and ``forward`` cuts the tiles on the device with
per-sample random offsets (torch ops), so no loader backend needs a tiling operator and the gap, jitter and
permutation draws come from the trainer's per-rank RNG (checkpointed, so a resume is exact).

Reference code read: MehdiNoroozi/JigsawPuzzleSolver (caffe: 255 px crop, 64 px tiles from 85 px cells with up to
21 px offset, 0-2 px per-channel offsets, fc6 1024 per tile, fc7 4096, fc8 N), bbrattoli/JigsawPuzzlePytorch
(per-tile normalisation, ``select_permutations.py``), VISSL (``ImgPatchesFromTensor``, ``ShuffleImgPatches``,
``generate_jigsaw_permutations.py``). Deviations are commented where they are made.
"""

from __future__ import annotations

import functools
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Config, ConfigError
from pipeline.data.loader import Batch
from pipeline.methods.base import Method, check_patch_multiple, encode_at_size


def all_permutations(n: int) -> np.ndarray:
    """Every permutation of ``range(n)`` in lexicographic order (``itertools.permutations``'s), n! x n int8, built
    by prepending each first element to the (shifted) permutations of the rest: ~25x faster than itertools for 9."""
    perms = np.zeros((1, 0), dtype=np.int8)
    for k in range(1, n + 1):
        perms = np.concatenate([np.hstack([np.full((len(perms), 1), first, np.int8), perms + (perms >= first)])
                                for first in range(k)])
    return perms


@functools.lru_cache(maxsize=8)
def hamming_permutations(n: int, tiles: int = 9, selection: str = "max_avg", seed: int = 0) -> torch.Tensor:
    """``n`` x ``tiles`` permutations of ``range(tiles)``, grown greedily for maximal Hamming distance.

    The first order is drawn uniformly (Python's ``random.Random(seed)``, stable across versions and platforms);
    each next one is, among the orders not yet chosen, the one with the largest summed distance to all chosen
    ones (``max_avg``: Noroozi & Favaro's Algorithm 1, VISSL's default) or the largest distance to its nearest
    chosen one (``max_min``). Ties go to the first order in lexicographic order, so the set is a function of
    (n, tiles, selection, seed) alone. Row k, position i holds the tile shown in slot i under permutation k.
    """
    if selection not in ("max_avg", "max_min"):
        raise ValueError(f"selection must be max_avg or max_min, got {selection!r}")
    every = all_permutations(tiles)
    total = every.shape[0]
    if not 1 <= n <= total:
        raise ValueError(f"{n} permutations asked of {tiles} tiles, which have {total}")
    columns = np.ascontiguousarray(every.T)  # position-major: 9 contiguous compares per step (~10x a row-wise one)

    def distance_to(j: int) -> np.ndarray:
        same = np.zeros(total, dtype=np.int8)
        for i, v in enumerate(every[j]):
            same += columns[i] == v
        return tiles - same.astype(np.int32)

    taken = np.iinfo(np.int32).min // 2  # a chosen order's score: below any sum of distances, never chosen again
    j = random.Random(seed).randrange(total)
    chosen = [j]
    score = distance_to(j)  # summed (max_avg) or smallest (max_min) distance of every order to the chosen set
    for _ in range(n - 1):
        score[j] = taken
        j = int(score.argmax())  # argmax returns the first of equal maxima
        chosen.append(j)
        score = score + distance_to(j) if selection == "max_avg" else np.minimum(score, distance_to(j))
    return torch.from_numpy(every[chosen].astype(np.int64))


def crop_at(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    """Square crops of ``x`` (B x C x H x W) at integer corners ``top``/``left`` of shape B x K x C (one corner per
    sample, crop and channel): B x K x C x size x size. One gather, on any device; corners must lie inside."""
    b, c = x.shape[:2]
    ar = torch.arange(size, device=x.device)
    rows = (top.unsqueeze(-1) + ar).unsqueeze(-1)  # B K C size 1
    cols = (left.unsqueeze(-1) + ar).unsqueeze(-2)  # B K C 1 size
    bi = torch.arange(b, device=x.device).view(b, 1, 1, 1, 1)
    ci = torch.arange(c, device=x.device).view(1, 1, c, 1, 1)
    return x[bi, ci, rows, cols]


def standardize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each crop (the last three dims) shifted to zero mean and scaled to unit standard deviation over all its
    pixels and channels (bbrattoli's per-tile ``Normalize``; the channels keep their relative colour)."""
    dims = (-3, -2, -1)
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True)
    return (x - mean) / std.clamp_min(eps)  # a flat crop (std 0) stays 0 instead of dividing by 0


class Jigsaw(Method):
    recipe = "jigsaw"

    def __init__(self, cfg: Config) -> None:
        c = self.jcfg = cfg.method.jigsaw
        view = cfg.augment.image_size
        self.cell = view // c.grid
        if self.cell < c.tile_size + c.channel_jitter:
            raise ConfigError(f"method.jigsaw: a {view} px view gives {self.cell} px cells, too small for "
                              f"{c.tile_size} px tiles plus {c.channel_jitter} px channel jitter; raise "
                              f"augment.image_size to at least {c.grid * (c.tile_size + c.channel_jitter)}")
        encode_at_size(cfg, c.tile_size)  # tiles smaller than the model's input
        super().__init__(cfg)
        check_patch_multiple(self.encoder, c.tile_size, "method.jigsaw.tile_size")
        self.tiles = c.grid ** 2
        # A buffer, so checkpoints carry the set the classifier's rows refer to (a copy: load_state_dict writes
        # into buffers in place, which must not reach the cached set).
        perms = hamming_permutations(c.num_permutations, self.tiles, c.selection, c.permutation_seed)
        self.register_buffer("permutations", perms.clone())
        # The authors' CFN head: fc6 per tile (shared), fc7 on the concatenation, fc8 to the permutation classes.
        self.tile_head = nn.Sequential(nn.Linear(self.embed_dim, c.tile_dim), nn.ReLU(inplace=True), nn.Dropout(c.dropout))
        self.classifier = nn.Sequential(
            nn.Linear(self.tiles * c.tile_dim, c.hidden_dim), nn.ReLU(inplace=True), nn.Dropout(c.dropout),
            nn.Linear(c.hidden_dim, c.num_permutations))

    def cut_tiles(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid x grid tiles of every view in raster order (B x tiles x C x T x T) and the corner of every
        channel of every tile (B x tiles x C x 2, pixels). A tile lies at a uniform random offset within its cell
        (the gap between neighbours is random, ``cell - tile_size`` on average); each colour channel is moved by a
        further 0..``channel_jitter`` pixels of its own. (The authors' jps++ code lets the channel offset reach 2
        pixels into the next cell; here the tile's offset range is narrowed by ``channel_jitter`` so every pixel
        of a tile comes from its own cell.)"""
        c = self.jcfg
        b, ch = x.shape[:2]
        if x.shape[-1] < self.cell * c.grid or x.shape[-2] < self.cell * c.grid:
            raise ValueError(f"jigsaw: views of {tuple(x.shape[-2:])} px, the puzzle needs {self.cell * c.grid} px")
        slack = self.cell - c.tile_size - c.channel_jitter
        offset = torch.randint(0, slack + 1, (b, self.tiles, 1, 2), device=x.device)
        shift = torch.randint(0, c.channel_jitter + 1, (b, self.tiles, ch, 2), device=x.device)
        k = torch.arange(self.tiles, device=x.device)
        cell_corner = torch.stack([k // c.grid, k % c.grid], dim=-1).view(1, self.tiles, 1, 2) * self.cell
        corner = cell_corner + offset + shift
        return crop_at(x, corner[..., 0], corner[..., 1], c.tile_size), corner

    def make_puzzles(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shuffled tiles (B x tiles x C x T x T: slot i holds tile ``permutations[label][i]``) and the labels."""
        tiles, _ = self.cut_tiles(x)
        if self.jcfg.normalize_tiles:
            tiles = standardize(tiles.float()).to(x.dtype)  # statistics in fp32 under DeepSpeed's bf16 views
        labels = torch.randint(0, self.permutations.shape[0], (x.shape[0],), device=x.device)
        order = self.permutations[labels]  # B x tiles
        return tiles[torch.arange(x.shape[0], device=x.device).unsqueeze(1), order], labels

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch.views[0]
        b = x.shape[0]
        puzzles, labels = self.make_puzzles(x)
        feats = self.encoder(puzzles.flatten(0, 1))  # every tile on its own through the shared encoder
        logits = self.classifier(self.tile_head(feats).view(b, -1))
        loss = F.cross_entropy(logits.float(), labels)
        return loss, {"jigsaw_accuracy": (logits.argmax(1) == labels).float().mean().detach()}
