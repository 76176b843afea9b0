"""The epoch plan shared by every backend.

How an epoch is split (the same for the torch and DALI backends): shards are shuffled with a seed derived from
``(run.seed, epoch)`` and laid end to end; the first ``steps_per_epoch * batch * world`` samples of that stream
are cut into one contiguous range per rank, and each rank's range into one contiguous range per worker. Every
rank therefore takes exactly ``steps_per_epoch`` batches, whatever the shard sizes (a rank that runs out of
data while the others still step is how DDP hangs on uneven shards: webdataset issues 188, 225), and each
sample of the epoch's usable set is read by exactly one rank. Splitting at sample level costs reading the tail
of at most one shard twice per rank boundary, never a decode.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol


class ShardCounts(Protocol):
    """What the plan needs of a set of shards: their locations and sample counts, in a fixed order."""

    paths: list
    counts: list[int]


@dataclass(frozen=True)
class Span:
    """Samples ``[start, stop)`` of one shard."""

    path: str
    start: int
    stop: int


@dataclass
class EpochPlan:
    spans: list[Span] = field(default_factory=list)
    first_sample: int = 0
    """Position of this range's first sample in the epoch's global stream (seeds per-sample augmentation)."""

    @property
    def num_samples(self) -> int:
        return sum(s.stop - s.start for s in self.spans)


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    order = list(range(num_shards))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def plan_range(shards: ShardCounts, order: list[int], start: int, stop: int) -> list[Span]:
    """Spans covering samples ``[start, stop)`` of the stream made by laying the shards end to end in ``order``."""
    spans, offset = [], 0
    for i in order:
        n = shards.counts[i]
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            spans.append(Span(str(shards.paths[i]), lo - offset, hi - offset))
        offset += n
        if offset >= stop:
            break
    return spans


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    return num_samples // (batch_size * world_size)


def rank_range(steps: int, batch_size: int, rank: int) -> tuple[int, int]:
    per_rank = steps * batch_size
    return rank * per_rank, (rank + 1) * per_rank


def worker_batches(steps: int, num_workers: int, worker: int) -> int:
    """Batches of a rank's epoch served by ``worker``: DataLoader hands out batches round-robin over workers."""
    return len(range(worker, steps, max(1, num_workers)))
