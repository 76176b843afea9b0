"""The loader protocol, the epoch plan shared by every backend, and the torch (webdataset) and synthetic backends.

Every backend yields :class:`Batch` objects already on the training device and reports its position
(``state_dict``) so a resumed run continues from the next unseen batch.

How an epoch is split (the same for the torch and DALI backends): shards are shuffled with a seed derived from
``(run.seed, epoch)`` and laid end to end; the first ``steps_per_epoch * batch * world`` samples of that stream
are cut into one contiguous range per rank, and each rank's range into one contiguous range per worker. Every
rank therefore takes exactly ``steps_per_epoch`` batches, whatever the shard sizes (a rank that runs out of
data while the others still step is how DDP hangs on uneven shards: webdataset issues 188, 225), and each
sample of the epoch's usable set is read by exactly one rank. Splitting at sample level costs reading the tail
of at most one shard twice per rank boundary, never a decode.
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import os
import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline.config import Config
from pipeline.data.recipes import Recipe, build_recipe, render_torchvision
from pipeline.data.shards import ShardError, ShardSet, open_shards
from pipeline.distributed import DistEnv


def default_recipe(cfg: Config) -> Recipe:
    """``augment.recipe``, where ``auto`` means the recipe of the method named by ``method.name``."""
    from pipeline.methods import METHODS  # imported late: methods import this module

    method = METHODS.get(cfg.method.name)
    return build_recipe(cfg.augment, method_recipe=method.recipe if method else None)


@dataclass
class Batch:
    """What a method consumes: ``views`` are B x C x H x W tensors on the device, one per recipe view."""

    views: list[torch.Tensor]
    labels: torch.Tensor | None = None
    texts: list[str] | None = None
    keys: list[str] | None = None
    tokens: torch.Tensor | None = None
    """Text token ids (B x L) when a method tokenizes captions in the loader."""

    @property
    def size(self) -> int:
        return self.views[0].shape[0]

    def to(self, device: torch.device, non_blocking: bool = True) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch([move(v) for v in self.views], move(self.labels), self.texts, self.keys, move(self.tokens))


class Loader(Protocol):
    """What the trainer needs of a loader (torch, DALI and synthetic backends all provide it).

    ``state_dict`` is the job's position (the same on every rank). ``rank_state_dict`` is this rank's own state
    (DALI's pipeline checkpoint): the trainer saves it beside each rank's RNG state and hands it back through
    ``load_rank_state_dict`` on a resume with the same number of ranks, after ``load_state_dict``.
    """

    steps_per_epoch: int

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, int]: ...

    def load_state_dict(self, state: dict[str, int]) -> None: ...

    def rank_state_dict(self) -> dict: ...

    def load_rank_state_dict(self, state: dict) -> None: ...


class LoaderPosition:
    """The position every backend keeps: ``epoch`` and ``batch`` (batches of that epoch already yielded), and no
    per-rank state unless a backend has some."""

    epoch: int = 0
    batch: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def rank_state_dict(self) -> dict:
        return {}

    def load_rank_state_dict(self, state: dict) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------------
# The epoch plan


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


def plan_range(shards: ShardSet, order: list[int], start: int, stop: int) -> list[Span]:
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


def iter_span_samples(spans: list[Span]) -> Iterator[dict[str, Any]]:
    """Raw samples (dicts of bytes keyed by extension, plus ``__key__``) of the spans, read with webdataset."""
    from webdataset.tariterators import tarfile_samples

    for span in spans:
        n = 0
        try:
            samples = tarfile_samples([{"url": span.path}])
            for sample in itertools.islice(samples, span.start, span.stop):
                n += 1
                yield sample
        except ShardError:
            raise
        except Exception as exc:
            raise ShardError(
                f"cannot read shard {span.path} at sample {span.start + n}: {type(exc).__name__}: {exc} "
                f"(truncated or corrupt tar? re-run `pipeline shards write`)"
            ) from exc
        if n != span.stop - span.start:
            raise ShardError(f"shard {span.path} ended after {span.start + n} samples; the manifest says at least "
                             f"{span.stop}: truncated tar")


# ---------------------------------------------------------------------------------------------------------------
# Decoding and augmentation (torch backend)


def decode_image(data: bytes, where: str):
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:
        raise ShardError(f"cannot decode image {where}: {type(exc).__name__}: {exc}") from exc
    return img.convert("RGB")


class SampleTransform:
    """Decode one raw sample and render every view of the recipe, with a per-sample seed so the result does
    not depend on which worker or which resume point produced it."""

    def __init__(self, recipe: Recipe, image_key: str, label_key: str, text_key: str) -> None:
        self.recipe = recipe
        self.views = [render_torchvision(v) for v in recipe.views]
        self.image_key, self.label_key, self.text_key = image_key, label_key, text_key

    def __call__(self, sample: dict[str, Any], seed: int) -> tuple:
        key = sample.get("__key__", "?")
        where = f"{sample.get('__url__', '?')}:{key}"
        if self.image_key not in sample:
            raise ShardError(f"sample {where} has no {self.image_key!r} field (fields: "
                             f"{sorted(k for k in sample if not k.startswith('__'))})")
        img = decode_image(sample[self.image_key], where)
        torch.manual_seed(seed)
        views = [view(img) for view in self.views]
        label = int(sample[self.label_key]) if self.label_key in sample else -1
        text = sample[self.text_key].decode("utf-8", "replace") if self.text_key in sample else None
        return views, label, text, key


def collate(items: list[tuple]) -> Batch:
    views = [torch.stack([it[0][v] for it in items]) for v in range(len(items[0][0]))]
    labels = torch.tensor([it[1] for it in items], dtype=torch.long)
    texts = [it[2] for it in items] if items[0][2] is not None else None
    return Batch(views, labels, texts, [it[3] for it in items])


class _EpochDataset(torch.utils.data.IterableDataset):
    """One rank's epoch: each worker reads its contiguous range, shuffles in a seeded buffer, skips what a
    resumed run already consumed (before decoding), then decodes, augments and batches."""

    def __init__(self, loader: TorchLoader, epoch: int, skip_batches: int) -> None:
        self.loader, self.epoch, self.skip_batches = loader, epoch, skip_batches

    def __iter__(self) -> Iterator[Batch]:
        import webdataset as wds

        ld = self.loader
        info = torch.utils.data.get_worker_info()
        slot, workers = (info.id, info.num_workers) if info else (0, 1)
        # DataLoader yields round-robin from worker 0; batch i of the epoch belongs to worker i % workers. A run
        # resumed after `skip_batches` must first yield batch skip_batches, so worker slots are rotated.
        worker = (slot + self.skip_batches) % workers
        steps, b = ld.steps_per_epoch, ld.batch_size
        rank_start, _ = rank_range(steps, b, ld.env.rank)
        before = sum(worker_batches(steps, workers, w) for w in range(worker)) * b
        n_batches = worker_batches(steps, workers, worker)
        start = rank_start + before
        spans = plan_range(ld.shards, shard_order(len(ld.shards.paths), ld.seed, self.epoch, ld.shuffle),
                           start, start + n_batches * b)
        samples: Iterator = iter_span_samples(spans)
        if ld.shuffle and ld.shuffle_buffer > 1:
            rng = random.Random(hash((ld.seed, self.epoch, ld.env.rank, worker)))
            samples = wds.shuffle(ld.shuffle_buffer, initial=min(ld.shuffle_buffer, 100), rng=rng)(samples)
        done = worker_batches(self.skip_batches, workers, worker)  # batches of this worker already consumed
        samples = itertools.islice(samples, done * b, None)
        base = (ld.seed * 1_000_003 + self.epoch) * 1_000_000_007 + start
        pos = done * b
        for _ in range(n_batches - done):
            items = []
            for sample in itertools.islice(samples, b):
                items.append(ld.transform(sample, base + pos))
                pos += 1
            if len(items) < b:
                raise ShardError(f"rank {ld.env.rank} worker {worker}: ran out of samples in epoch {self.epoch}")
            yield collate(items)


def _ignore_sigterm(_worker_id: int) -> None:
    """Slurm sends SIGTERM to every process of a job step it preempts or cancels; workers that died of it would
    stop the rank before it can save the step it is on (see ``launchers.slurm``). The main process still ends
    them: through the loader's shutdown, or with the step's SIGKILL."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TorchLoader(LoaderPosition):
    """webdataset + PIL + torchvision v2 in DataLoader workers."""

    def __init__(self, cfg: Config, env: DistEnv, device: torch.device, *, shards: str | None = None,
                 recipe: Recipe | None = None, shuffle: bool = True) -> None:
        self.env, self.device = env, device
        self.shards = open_shards(shards or cfg.data.train_shards, cfg.data.verify)
        self.recipe = recipe or default_recipe(cfg)
        image_key = self.shards.image_key if cfg.data.image_key == "auto" else cfg.data.image_key
        if image_key not in self.shards.manifest.get("fields", [image_key]):
            raise ShardError(f"shards in {self.shards.root} have no {image_key!r} field "
                             f"(fields: {self.shards.manifest.get('fields')}); set data.image_key")
        self.transform = SampleTransform(self.recipe, image_key, cfg.data.label_key, cfg.data.text_key)
        self.batch_size, self.seed, self.shuffle = cfg.loader.batch_size, cfg.run.seed, shuffle
        self.shuffle_buffer, self.num_workers = cfg.loader.shuffle_buffer, cfg.loader.num_workers
        self.prefetch_factor = cfg.loader.prefetch_factor
        self.steps_per_epoch = steps_per_epoch(self.shards.num_samples, self.batch_size, env.world_size)
        if self.steps_per_epoch == 0:
            raise ShardError(f"{self.shards.root} has {self.shards.num_samples} samples: fewer than one global batch "
                             f"({self.batch_size} x {env.world_size} ranks)")
        self.epoch, self.batch = 0, 0

    def _epoch_loader(self) -> torch.utils.data.DataLoader:
        workers = min(self.num_workers, self.steps_per_epoch)
        return torch.utils.data.DataLoader(
            _EpochDataset(self, self.epoch, self.batch), batch_size=None, num_workers=workers,
            pin_memory=self.device.type == "cuda", prefetch_factor=self.prefetch_factor if workers else None,
            persistent_workers=False, multiprocessing_context="fork" if workers else None,
            worker_init_fn=_ignore_sigterm if os.environ.get("PIPELINE_LAUNCHER") == "slurm" else None,
        )

    def __iter__(self) -> Iterator[Batch]:
        while True:
            for batch in self._epoch_loader():
                self.batch += 1
                yield batch.to(self.device)
            self.epoch, self.batch = self.epoch + 1, 0


class SyntheticLoader(LoaderPosition):
    """Random batches generated on the device: measures the model without the data path."""

    def __init__(self, cfg: Config, env: DistEnv, device: torch.device, recipe: Recipe | None = None) -> None:
        self.recipe = recipe or default_recipe(cfg)
        self.batch_size, self.device = cfg.loader.batch_size, device
        self.steps_per_epoch = 1_000_000
        self.epoch, self.batch = 0, 0
        self.gen = torch.Generator(device=device).manual_seed(cfg.run.seed + env.rank)
        self.texts = ["a photo"] * self.batch_size if self.recipe.with_text else None

    def __iter__(self) -> Iterator[Batch]:
        b = self.batch_size
        views = [torch.randn(b, 3, v.size, v.size, device=self.device, generator=self.gen) for v in self.recipe.views]
        labels = torch.randint(0, 10, (b,), device=self.device, generator=self.gen)
        while True:
            self.batch += 1
            yield Batch(views, labels, self.texts)


def resolve_backend(cfg: Config) -> str:
    """``loader.backend``, with ``auto`` resolved: DALI wherever it is installed and can read the configured
    fields (labels from ``.cls``, captions from ``.txt``), else torch."""
    backend = cfg.loader.backend
    if backend != "auto":
        return backend
    if importlib.util.find_spec("nvidia.dali") is None or cfg.data.label_key != "cls" or cfg.data.text_key != "txt":
        return "torch"
    return "dali"


def build_loader(cfg: Config, env: DistEnv, device: torch.device, recipe: Recipe | None = None) -> Loader:
    """The training loader of ``cfg.loader.backend`` (see :func:`resolve_backend`)."""
    backend = resolve_backend(cfg)
    if backend == "synthetic":
        return SyntheticLoader(cfg, env, device, recipe)
    if backend == "dali":
        from pipeline.data.dali_loader import DaliLoader

        return DaliLoader(cfg, env, device, recipe=recipe)
    return TorchLoader(cfg, env, device, recipe=recipe)


def iter_eval_batches(cfg: Config, shards_dir: str | Path, env: DistEnv, device: torch.device,
                      max_samples: int = 0) -> Iterator[Batch]:
    """Deterministic, unshuffled pass over (this rank's contiguous part of) labelled shards with the eval recipe.
    Unlike training, nothing is dropped: the last batch may be short and ranks may differ by one sample."""
    shards = open_shards(shards_dir, cfg.data.verify)
    total = shards.num_samples if not max_samples else min(max_samples, shards.num_samples)
    per = -(-total // env.world_size)
    start, stop = env.rank * per, min(total, (env.rank + 1) * per)
    spans = plan_range(shards, list(range(len(shards.paths))), start, stop)
    image_key = shards.image_key if cfg.data.image_key == "auto" else cfg.data.image_key
    # At the size the model is built for (what the export records), not the training views' size, which pretext
    # tasks set larger (a jigsaw puzzle or patch grid is cut from them): every method is scored on the same images.
    recipe = build_recipe(replace(cfg.augment, image_size=cfg.model.img_size), "eval")
    transform = SampleTransform(recipe, image_key, cfg.data.label_key, cfg.data.text_key)
    items = []
    for i, sample in enumerate(iter_span_samples(spans)):
        items.append(transform(sample, start + i))
        if len(items) == cfg.eval.batch_size:
            yield collate(items).to(device)
            items = []
    if items:
        yield collate(items).to(device)
