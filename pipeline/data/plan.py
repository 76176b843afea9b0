"""The epoch plan shared by every backend.

How an epoch is split (the same for the torch and DALI backends): shards are shuffled with a seed derived from
``(run.seed, epoch)`` and laid end to end (:func:`epoch_spans`; a weighted mixture first repeats or subsamples
each stream's shards per its weight, see :mod:`pipeline.data.sources`); the first ``steps_per_epoch * batch * world`` samples of that stream
are cut into one contiguous range per rank, and each rank's range into one contiguous range per worker. Every
rank therefore takes exactly ``steps_per_epoch`` batches, whatever the shard sizes (a rank that runs out of
data while the others still step is how DDP hangs on uneven shards: webdataset issues 188, 225), and each
sample of the epoch's usable set is read by exactly one rank. Splitting at sample level costs reading the tail
of at most one shard twice per rank boundary, never a decode.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Protocol


class ShardCounts(Protocol):
    """What the plan needs of a set of shards: their locations and sample counts, in a fixed order. A mixture
    (:class:`pipeline.data.sources.DataSource`) also has ``groups`` (shard indices of each stream) and ``weights``
    (per-epoch repeat factor of each stream); without them every shard is read once per epoch."""

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


def _mixture_pieces(shards: ShardCounts, seed: int, epoch: int) -> list[Span]:
    """One epoch's pieces of a weighted mixture, unshuffled: weight ``k + f`` reads each shard of the stream
    ``k`` times, plus ``floor(f * N)`` samples as whole shards (and a prefix of one) drawn with a seed of
    ``(seed, epoch, stream)``, so the fraction is a different part of the stream each epoch."""
    pieces: list[Span] = []
    for g, (group, weight) in enumerate(zip(shards.groups, shards.weights)):
        k = math.floor(weight)
        for _ in range(k):
            pieces += [Span(str(shards.paths[i]), 0, shards.counts[i]) for i in group]
        want = math.floor((weight - k) * sum(shards.counts[i] for i in group))
        if want:
            order = list(group)
            random.Random((seed * 1_000_003 + epoch) * 7_919 + g).shuffle(order)
            for i in order:
                take = min(want, shards.counts[i])
                if take:
                    pieces.append(Span(str(shards.paths[i]), 0, take))
                want -= take
                if not want:
                    break
    return pieces


def epoch_spans(shards: ShardCounts, seed: int, epoch: int, shuffle: bool = True) -> list[Span]:
    """The epoch's stream of samples as spans laid end to end: every shard once in :func:`shard_order`, or, for
    a weighted mixture, the repeated and subsampled pieces of every stream shuffled together."""
    weights = getattr(shards, "weights", None)
    if weights is None or all(w == 1 for w in weights):
        order = shard_order(len(shards.paths), seed, epoch, shuffle)
        return [Span(str(shards.paths[i]), 0, shards.counts[i]) for i in order]
    pieces = _mixture_pieces(shards, seed, epoch)
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(pieces)
    return pieces


def epoch_samples(shards: ShardCounts) -> int:
    """Samples in one epoch (the sum of counts, or of the weighted pieces of a mixture)."""
    weights = getattr(shards, "weights", None)
    if weights is None:
        return sum(shards.counts)
    return sum(math.floor(w) * sum(shards.counts[i] for i in g)
               + math.floor((w - math.floor(w)) * sum(shards.counts[i] for i in g))
               for g, w in zip(shards.groups, weights))


def plan_range(spans: list[Span], start: int, stop: int) -> list[Span]:
    """Spans covering samples ``[start, stop)`` of the stream made by laying ``spans`` end to end."""
    out, offset = [], 0
    for span in spans:
        n = span.stop - span.start
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            out.append(Span(span.path, span.start + lo - offset, span.start + hi - offset))
        offset += n
        if offset >= stop:
            break
    return out


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    return num_samples // (batch_size * world_size)


def rank_range(steps: int, batch_size: int, rank: int) -> tuple[int, int]:
    per_rank = steps * batch_size
    return rank * per_rank, (rank + 1) * per_rank


def worker_batches(steps: int, num_workers: int, worker: int) -> int:
    """Batches of a rank's epoch served by ``worker``: DataLoader hands out batches round-robin over workers."""
    return len(range(worker, steps, max(1, num_workers)))
