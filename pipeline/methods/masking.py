"""Patch masks sampled per sample: iBOT/DINOv2 block-wise masks and I-JEPA's context and target blocks.

Both are drawn in the method's forward on the host, from this rank's torch RNG (which the trainer seeds per rank and
checkpoints, so a resumed run draws the same masks), with no device synchronisation: the masks and the indices
built from them go to the device once. The loaders stay unchanged (DALI and torch alike), where the references draw
them in the data loader's collate function (dinov2 ``data/collate.py``, ijepa ``src/masks/multiblock.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def host_rng() -> np.random.Generator:
    """A numpy generator seeded from this rank's torch CPU RNG: the sequential block sampler below draws one
    scalar at a time, which is ~20x cheaper from numpy than from torch, and the stream still follows torch's
    (checkpointed) RNG state."""
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))  # a CPU tensor: no device sync


# ---------------------------------------------------------------------------------------------------------------
# iBOT / DINOv2: block-wise masks (BEiT's generator as dinov2 ``data/masking.py: MaskingGenerator``)


@dataclass(frozen=True)
class Block:
    top: int
    left: int
    height: int
    width: int


def block_mask(rng: np.random.Generator, grid: tuple[int, int], num_masked: int, min_patches: int = 4,
               max_patches: int | None = None, min_aspect: float = 0.3,
               max_aspect: float | None = None) -> tuple[np.ndarray, list[Block]]:
    """Mask up to ``num_masked`` of the ``grid`` patches as a union of rectangles (dinov2 ``MaskingGenerator``).

    Each rectangle draws an area uniform in [min_patches, budget] (budget: the patches still to mask, at most
    ``max_patches``) and a log-uniform aspect in [min_aspect, max_aspect] (default 1/min_aspect), is kept only if it
    fits strictly inside the grid and adds between 1 and budget new patches, with 10 tries per rectangle; sampling
    stops when the count is reached or a rectangle cannot be placed (the mask may then hold fewer patches, as in
    the reference). Returns the H x W boolean mask and the rectangles added, in order."""
    height, width = grid
    max_patches = num_masked if max_patches is None else max_patches
    log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
    mask = np.zeros(grid, dtype=bool)
    blocks: list[Block] = []
    count = 0
    while count < num_masked:
        budget = min(num_masked - count, max_patches)
        delta = 0
        for _ in range(10):
            area = min_patches + (budget - min_patches) * rng.random()  # random.uniform: budget may be < min
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if w < width and h < height:
                top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))  # inclusive
                new = h * w - int(mask[top:top + h, left:left + w].sum())
                if 0 < new <= budget:
                    mask[top:top + h, left:left + w] = True
                    blocks.append(Block(top, left, h, w))
                    delta = new
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask, blocks


def ibot_masks(n: int, grid: tuple[int, int], ratio: tuple[float, float], probability: float, min_patches: int = 4,
               max_fraction: float = 0.5, min_aspect: float = 0.3, rng: np.random.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks for ``n`` global crops, as dinov2 ``collate_data_and_cast``: ``int(n * probability)`` crops are masked,
    their target ratios stratified over ``ratio`` (crop i draws uniformly in the i-th of as many equal sub-ranges,
    so the batch covers the whole range), the rest are not masked, and the order is shuffled. Returns the n x L
    boolean masks (row-major patches) and the target counts ``int(L * r)`` each masked crop asked for (0 for the
    others). Each mask is a :func:`block_mask` with rectangles of at most ``max_fraction`` of the patches."""
    rng = rng or host_rng()
    length = grid[0] * grid[1]
    n_masked = int(n * probability)
    bounds = np.linspace(ratio[0], ratio[1], n_masked + 1)
    targets = [int(length * rng.uniform(bounds[i], bounds[i + 1])) for i in range(n_masked)] + [0] * (n - n_masked)
    masks = np.stack([block_mask(rng, grid, t, min_patches, int(max_fraction * length), min_aspect)[0]
                      for t in targets]).reshape(n, length)
    order = rng.permutation(n)
    return torch.from_numpy(masks[order]), torch.tensor(targets)[torch.from_numpy(order)]


# ---------------------------------------------------------------------------------------------------------------
# I-JEPA: one context block and several target blocks (ijepa ``src/masks/multiblock.py: MaskCollator``)


def block_size(scale: tuple[float, float], aspect: tuple[float, float], grid: tuple[int, int],
               generator: torch.Generator | None = None) -> tuple[int, int]:
    """(h, w) of a block covering ``scale`` of the grid at aspect h/w: area ``int(H W s)`` with s uniform in
    ``scale``, aspect uniform in ``aspect``, sides rounded and kept below the grid's (ijepa ``_sample_block_size``).

    Deviation: the reference uses one uniform draw for both the scale and the aspect (so larger blocks are always
    taller); the paper describes, and this draws, the two independently."""
    height, width = grid
    u = torch.rand(2, generator=generator).tolist()
    area = int(height * width * (scale[0] + u[0] * (scale[1] - scale[0])))
    ratio = aspect[0] + u[1] * (aspect[1] - aspect[0])
    h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
    return max(1, min(h, height - 1)), max(1, min(w, width - 1))


def _place(n: int, k: int, size: tuple[int, int], grid: tuple[int, int], generator: torch.Generator | None
           ) -> torch.Tensor:
    """n x k block masks (n x k x H x W bool) of one size, each at a uniform position where it fits."""
    (h, w), (height, width) = size, grid
    # Deviation: the reference's torch.randint(0, H - h) never places a block on the last row or column; every
    # position where the block fits is drawn here.
    top = torch.randint(0, height - h + 1, (n, k, 1, 1), generator=generator)
    left = torch.randint(0, width - w + 1, (n, k, 1, 1), generator=generator)
    rows, cols = torch.arange(height).view(1, 1, -1, 1), torch.arange(width).view(1, 1, 1, -1)
    return (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)


def _first_true(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the first ``k`` True entries of each row (ascending), as ``nonzero()[:k]`` per row."""
    return torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices[..., :k]


def multiblock(n: int, grid: tuple[int, int], num_targets: int = 4, target_scale: tuple[float, float] = (0.15, 0.2),
               target_aspect: tuple[float, float] = (0.75, 1.5), context_scale: tuple[float, float] = (0.85, 1.0),
               min_keep: int = 10, allow_overlap: bool = False, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """I-JEPA's blocks for ``n`` images on a ``grid`` of patches, as boolean masks: ``num_targets`` target blocks
    (one size for the batch, drawn from ``target_scale`` and ``target_aspect``; a position per image and block)
    and one square context block (size from ``context_scale``) from which every target patch is removed, so context
    and targets are disjoint (``allow_overlap=False``). A context left with ``min_keep`` patches or fewer is drawn
    again; after 20 failures in a row one target block stops constraining it (the reference's fallback, which
    only binds on small grids). Returns (context n x L, targets n x num_targets x L), row-major patches."""
    height, width = grid
    t_size = block_size(target_scale, target_aspect, grid, generator)
    c_size = block_size(context_scale, (1.0, 1.0), grid, generator)
    if c_size[0] * c_size[1] <= min_keep:
        raise ValueError(f"I-JEPA: a {c_size[0]}x{c_size[1]} context block on a {height}x{width} patch grid can never "
                         f"keep more than min_keep={min_keep} patches; lower method.ijepa.min_keep or use more patches")
    targets = _place(n, num_targets, t_size, grid, generator)  # n x T x H x W
    context = torch.zeros(n, height, width, dtype=torch.bool)
    pending = torch.ones(n, dtype=torch.bool)
    relaxed = torch.zeros(n, dtype=torch.long)  # target blocks no longer constraining the context
    failures = torch.zeros(n, dtype=torch.long)
    while pending.any():
        idx = pending.nonzero().flatten()
        block = _place(len(idx), 1, c_size, grid, generator)[:, 0]
        if not allow_overlap:
            active = torch.arange(num_targets) < (num_targets - relaxed[idx]).unsqueeze(1)  # m x T
            block &= ~(targets[idx] & active.view(len(idx), num_targets, 1, 1)).any(1)
        ok = block.flatten(1).sum(1) > min_keep
        context[idx[ok]] = block[ok]
        pending[idx[ok]] = False
        bad = idx[~ok]
        failures[bad] += 1
        relaxed[bad] += failures[bad] == 20
        failures[bad] %= 20
    return context.flatten(1), targets.flatten(2)


def multiblock_masks(n: int, grid: tuple[int, int], *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`multiblock` as patch indices: every image keeps as many context and target patches as the one with
    the fewest (the reference's ``min_keep`` truncation, the first ones in row-major order), so the batch stacks.
    Returns (context indices n x Kc, target indices n x num_targets x Kt), ascending."""
    context, targets = multiblock(n, grid, *args, **kwargs)
    return _first_true(context, int(context.sum(1).min())), _first_true(targets, int(targets.sum(2).min()))


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the device (pinned, asynchronous copy on CUDA)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
