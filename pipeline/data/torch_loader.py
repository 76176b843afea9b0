"""The torch backend: webdataset tar reading + PIL decode + torchvision v2 views in DataLoader workers, following
the epoch plan of :mod:`pipeline.data.plan`; and the deterministic evaluation pass over labelled shards."""

from __future__ import annotations

import io
import itertools
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config
from pipeline.data.loader import Batch, LoaderPosition
from pipeline.data.plan import Span, plan_range, rank_range, shard_order, steps_per_epoch, worker_batches
from pipeline.data.recipes import Recipe, build_recipe, render_torchvision
from pipeline.data.shards import ShardError, open_shards
from pipeline.distributed import DistEnv


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

    def __init__(self, cfg: Config, env: DistEnv, device: torch.device, recipe: Recipe, *, shards: str | None = None,
                 shuffle: bool = True) -> None:
        self.env, self.device = env, device
        self.shards = open_shards(shards or cfg.data.train_shards, cfg.data.verify)
        self.recipe = recipe
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
    transform = SampleTransform(build_recipe(cfg.augment, "eval"), image_key, cfg.data.label_key, cfg.data.text_key)
    items = []
    for i, sample in enumerate(iter_span_samples(spans)):
        items.append(transform(sample, start + i))
        if len(items) == cfg.eval.batch_size:
            yield collate(items).to(device)
            items = []
    if items:
        yield collate(items).to(device)
