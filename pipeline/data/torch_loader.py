"""The torch backend: tar streams (local, ``s3://``, ``http(s)://``, ``pipe:``; see :mod:`pipeline.data.storage`)
-> PIL decode -> torchvision v2 views in DataLoader workers, following the epoch plan of :mod:`pipeline.data.plan`;
and the deterministic evaluation pass over labelled shards.

Within a rank, each DataLoader worker owns one contiguous range of the epoch's stream (``plan``). Its reader
thread streams the range's shards one after the other (each through one sequential read: one GET per remote
shard) while the worker decodes, so network and decode overlap; the thread runs up to one shuffle chunk ahead.
Samples are shuffled in chunks of ``loader.shuffle_buffer`` consecutive samples of the range (rounded down to
whole batches), each chunk with its own seed of ``(run.seed, epoch, chunk position)``. Unlike a running shuffle
buffer, a chunk does not depend on what came before it, so a resumed run starts reading at the chunk of the
resume point instead of re-reading the whole range up to it: exact mid-epoch resume at the cost of one chunk and
the head of one shard, whatever the source.

Bad data is counted, not fatal. A tar is read with ``ignore_zeros`` so a damaged region (zeroed or garbage
blocks) is skipped to the next valid header (webdataset's own reader takes the first zero block for the end of
the tar and silently drops the rest of the shard); samples lost to damage, or to a tar that ends before its
count, are kept as placeholders so positions (and with them resume and the equal number of batches on every
rank) do not move. A placeholder, a sample whose image does not decode or which lacks the image (or, for
image-text recipes, the caption) is replaced by another sample of the same batch, else of the same chunk, else
one of the first good samples of the worker's range, rendered with the replaced sample's own augmentation seed:
the choice depends only on the data, so a resumed run makes the same. A batch may therefore hold a sample twice
(a false negative for contrastive losses, at the rate of bad samples). Each batch carries how many it replaced
(``Batch.num_bad``); the trainer reports and bounds them (``data.max_bad_fraction``). Errors of the storage
itself (connection refused, timeouts, 5xx) are retried ``data.retries`` times with backoff, re-opening the shard
where it stopped, then end the run with a :class:`~pipeline.data.storage.StorageError` naming the URL.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import queue
import random
import signal
import sys
import tarfile
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from pipeline.config import Config
from pipeline.data import storage
from pipeline.data.loader import Batch, LoaderPosition
from pipeline.data.plan import Span, epoch_samples, epoch_spans, plan_range, rank_range, steps_per_epoch, worker_batches
from pipeline.data.recipes import Recipe, build_recipe, render_torchvision
from pipeline.data.shards import ShardError
from pipeline.data.sources import IMAGE_EXTS, DataSource, resolve_for_job
from pipeline.data.storage import RetryPolicy, StorageError
from pipeline.distributed import DistEnv

DAMAGE = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, ValueError)
"""What a damaged shard raises while it is read (as opposed to the storage failing to deliver it)."""


@dataclass(frozen=True)
class Lost:
    """Placeholder for a sample a damaged shard lost: keeps every later sample at its planned position."""

    where: str
    reason: str


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _tar_files(stream, url: str) -> Iterator[dict[str, Any]]:
    """Members of a tar stream as webdataset's ``tar_file_expander`` yields them, but with ``ignore_zeros``: a
    zeroed or garbage block is skipped to the next valid header instead of ending the shard silently."""
    with tarfile.open(fileobj=stream, mode="r|*", ignore_zeros=True) as tar:
        for m in tar:
            if not m.isreg():
                continue
            data = tar.extractfile(m).read()
            yield {"fname": m.name, "data": data, "__url__": url}
            tar.members = []  # stream mode keeps every TarInfo otherwise


def iter_span_samples(span: Span, policy: RetryPolicy | None = None) -> Iterator[dict[str, Any] | Lost]:
    """Exactly ``span.stop - span.start`` items of one shard: raw samples (dicts of bytes keyed by extension,
    plus ``__key__`` and ``__url__``, grouped by webdataset's ``group_by_keys``), or :class:`Lost` placeholders
    for samples a damaged or short shard does not deliver. Storage errors are retried under ``policy``, re-opening
    the shard and skipping what was already yielded; then :class:`StorageError` names the URL."""
    from webdataset.tariterators import group_by_keys

    policy = policy or RetryPolicy()
    want, done, attempt = span.stop - span.start, 0, 0
    while done < want:
        try:
            with storage.open_stream(span.path) as stream:
                for i, sample in enumerate(group_by_keys(_tar_files(stream, span.path))):
                    if i < span.start + done:
                        continue
                    yield sample
                    done += 1
                    if done == want:
                        return
            reason = (f"shard {span.path} ended after {span.start + done} samples; its count says at least "
                      f"{span.stop} (truncated tar?)")
        except DAMAGE as exc:
            reason = f"shard {span.path} is damaged after sample {span.start + done}: {type(exc).__name__}: {exc}"
        except ShardError:
            raise
        except Exception as exc:  # storage errors of every client end up here
            if storage.is_permanent(exc) or attempt >= policy.retries:
                tries = f" after {attempt + 1} attempts" if attempt else ""
                raise StorageError(f"cannot read {span.path}{tries}: {type(exc).__name__}: {exc}") from exc
            policy.sleep(attempt)
            attempt += 1
            continue
        print(f"warning: {reason}; its {want - done} remaining samples are counted as bad", file=sys.stderr)
        for _ in range(want - done):
            yield Lost(span.path, reason)
        return


def iter_spans(spans: list[Span], policy: RetryPolicy | None = None) -> Iterator[dict[str, Any] | Lost]:
    for span in spans:
        yield from iter_span_samples(span, policy)


class _ReadAhead:
    """Runs an iterator in a thread, up to ``depth`` items ahead of the consumer (I/O overlaps decode)."""

    def __init__(self, it: Iterator, depth: int) -> None:
        self.q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(it,), daemon=True, name="shard-reader")
        self.thread.start()

    def _put(self, item: tuple) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, it: Iterator) -> None:
        try:
            for x in it:
                if not self._put(("item", x)):
                    return
            self._put(("end", None))
        except BaseException as exc:  # noqa: BLE001 handed to the consumer, which raises it
            self._put(("error", exc))

    def __iter__(self) -> Iterator:
        while True:
            kind, x = self.q.get()
            if kind == "end":
                return
            if kind == "error":
                raise x
            yield x

    def close(self) -> None:
        self.stop.set()


# ---------------------------------------------------------------------------------------------------------------
# Fields and decoding


class BadSample(Exception):
    """A sample that cannot be used (no image, undecodable image, missing caption): counted and replaced."""


def decode_image(data: bytes, where: str):
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:  # PIL raises many types for bad files
        raise BadSample(f"cannot decode image {where}: {type(exc).__name__}: {exc}") from exc
    return img.convert("RGB")


def _json_field(sample: dict[str, Any], path: str, where: str) -> Any:
    if "json" not in sample:
        raise KeyError(f"no json member in {where}")
    node = sample["json"]
    if isinstance(node, bytes):
        node = json.loads(node)
        sample["json"] = node  # parsed once per sample, even when both caption and label come from it
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"json of {where} has no {path!r}")
        node = node[part]
    return node


def image_candidates(image_key: str) -> tuple[str, ...]:
    """``auto`` -> every image extension, in order; ``jpg;png`` -> those two; ``png`` -> one."""
    return IMAGE_EXTS if image_key == "auto" else tuple(k.strip().lower() for k in image_key.split(";") if k.strip())


def check_fields(source: DataSource, image_key: str, text_key: str, need_text: bool) -> None:
    """Fail early when the source's known fields cannot satisfy the configured ones (unknown fields: per sample)."""
    if not source.fields_known:
        return
    fields = set(source.fields)
    where = source.streams[0].spec if len(source.streams) == 1 else "the sources"
    if not fields & set(image_candidates(image_key)):
        key = "an image" if image_key == "auto" else repr(image_key)
        raise ShardError(f"shards in {where} have no {key} field (fields: {sorted(fields)}); set data.image_key")
    if need_text:
        needed = "json" if text_key.startswith("json:") else text_key
        if needed not in fields:
            raise ShardError(f"shards in {where} have no {needed!r} field for captions (fields: {sorted(fields)}); "
                             f"set data.text_key (e.g. txt or json:caption)")


class SampleTransform:
    """Decode one raw sample and render every view of the recipe, with a per-sample seed so the result does
    not depend on which worker or which resume point produced it. Raises :class:`BadSample` for a sample that
    cannot be used."""

    def __init__(self, recipe: Recipe, image_key: str, label_key: str, text_key: str) -> None:
        self.recipe = recipe
        self.views = [render_torchvision(v) for v in recipe.views]
        self.images = image_candidates(image_key)
        self.label_key, self.text_key = label_key, text_key

    def _label(self, sample: dict[str, Any], where: str) -> int:
        try:
            if self.label_key.startswith("json:"):
                return int(_json_field(sample, self.label_key[5:], where))
            return int(sample[self.label_key]) if self.label_key in sample else -1
        except (KeyError, ValueError, TypeError):
            return -1

    def _text(self, sample: dict[str, Any], where: str) -> str:
        try:
            if self.text_key.startswith("json:"):
                text = _json_field(sample, self.text_key[5:], where)
            else:
                text = sample[self.text_key].decode("utf-8", "replace")
        except (KeyError, ValueError, AttributeError) as exc:
            raise BadSample(f"no caption ({self.text_key}) in {where}: {exc}") from exc
        if not isinstance(text, str) or not text.strip():
            raise BadSample(f"empty caption ({self.text_key}) in {where}")
        return text

    def __call__(self, sample: dict[str, Any] | Lost, seed: int) -> tuple:
        if isinstance(sample, Lost):
            raise BadSample(sample.reason)
        key = sample.get("__key__", "?")
        where = f"{sample.get('__url__', '?')}:{key}"
        image = next((k for k in self.images if k in sample), None)
        if image is None:
            fields = sorted(k for k in sample if not k.startswith("__"))
            raise BadSample(f"sample {where} has no {'/'.join(self.images)} field (fields: {fields})")
        text = self._text(sample, where) if self.recipe.with_text else None
        img = decode_image(sample[image], where)
        torch.default_generator.manual_seed(seed)  # torchvision draws from it; torch.manual_seed also seeds CUDA
        try:
            views = [view(img) for view in self.views]
        except Exception as exc:  # e.g. a degenerate image the transforms refuse
            raise BadSample(f"cannot augment image {where}: {type(exc).__name__}: {exc}") from exc
        return views, self._label(sample, where), text, key


def collate(items: list[tuple], num_bad: int = 0, bad_example: str | None = None) -> Batch:
    views = [torch.stack([it[0][v] for it in items]) for v in range(len(items[0][0]))]
    labels = torch.tensor([it[1] for it in items], dtype=torch.long)
    texts = [it[2] for it in items] if items[0][2] is not None else None
    return Batch(views, labels, texts, [it[3] for it in items], num_bad=num_bad, bad_example=bad_example)


# ---------------------------------------------------------------------------------------------------------------
# One worker's share of an epoch


def _chunk_seed(seed: int, epoch: int, position: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + position) % (2**63)


class _EpochDataset(torch.utils.data.IterableDataset):
    """One rank's epoch: each worker reads its contiguous range chunk by chunk, permutes each chunk with the
    chunk's seed, skips (without decoding) what a resumed run already consumed, then decodes, replaces bad
    samples, augments and batches."""

    def __init__(self, loader: TorchLoader, epoch: int, skip_batches: int) -> None:
        self.loader, self.epoch, self.skip_batches = loader, epoch, skip_batches

    def __iter__(self) -> Iterator[Batch]:
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
        stop = start + n_batches * b
        done = worker_batches(self.skip_batches, workers, worker)  # batches of this worker already consumed
        if done >= n_batches:
            return
        # chunks hold whole batches (worker ranges are whole batches too), so no batch straddles two chunks
        chunk = max(1, ld.shuffle_buffer // b) * b if ld.shuffle else b
        first = (done * b) // chunk  # the chunk holding the first sample to yield: reading starts there
        spans = epoch_spans(ld.shards, ld.seed, self.epoch, ld.shuffle)
        reader = _ReadAhead(iter_spans(plan_range(spans, start + first * chunk, stop), ld.policy), depth=chunk)
        self.spares = _Spares(ld, plan_range(spans, start, stop))
        base = (ld.seed * 1_000_003 + self.epoch) * 1_000_000_007 + start
        items = iter(reader)
        try:
            for pos in range(first * chunk, stop - start, chunk):
                size = min(chunk, stop - start - pos)
                raw = [next(items) for _ in range(size)]
                if ld.shuffle:
                    random.Random(_chunk_seed(ld.seed, self.epoch, start + pos)).shuffle(raw)
                for at in range(max(0, done * b - pos), size, b):
                    yield self._batch(raw, at, base + pos + at)
        finally:
            reader.close()

    def _batch(self, chunk: list, first: int, seed: int) -> Batch:
        """The batch ``chunk[first : first + b]``; sample ``i`` is rendered with seed ``seed + i``. Bad samples
        are replaced by the next good sample of the batch (cyclically), else of the chunk, else one of the first
        good samples of this worker's range (:class:`_Spares`), rendered with the bad slot's own seed: the same
        choice whatever batch a run resumed at."""
        ld, b = self.loader, self.loader.batch_size
        slots = chunk[first : first + b]
        out: list[tuple | None] = []
        num_bad, example = 0, None
        for i, sample in enumerate(slots):
            try:
                out.append(ld.transform(sample, seed + i))
            except BadSample as exc:
                out.append(None)
                num_bad += 1
                example = str(exc)
        bad = {i for i, o in enumerate(out) if o is None}
        n, size = len(slots), len(chunk)
        for i in sorted(bad):
            at = first + i
            nearby = [slots[(i + k) % n] for k in range(1, n) if (i + k) % n not in bad]
            nearby += [chunk[(at + k) % size] for k in range(1, size) if not first <= (at + k) % size < first + n]
            for cand in nearby:
                if isinstance(cand, Lost):
                    continue
                try:
                    out[i] = ld.transform(cand, seed + i)
                    break
                except BadSample:
                    continue
            if out[i] is None:
                out[i] = self.spares.render(seed + i, example or "")
        return collate(out, num_bad, example)


class _Spares:
    """Stand-ins for a batch whose whole shuffle chunk is unreadable (e.g. a long truncated shard): the first
    good samples of the worker's range, read only if needed. Which one stands in depends on the slot's seed
    only, so a resumed run picks the same."""

    def __init__(self, loader: TorchLoader, spans: list[Span], want: int = 64) -> None:
        self.loader, self.spans, self.want = loader, spans, want
        self.samples: list | None = None

    def render(self, seed: int, why: str) -> tuple:
        if self.samples is None:
            self.samples = []
            for sample in iter_spans(self.spans, self.loader.policy):
                if isinstance(sample, Lost):
                    continue
                try:
                    self.loader.transform(sample, 0)
                except BadSample:
                    continue
                self.samples.append(sample)
                if len(self.samples) == self.want:
                    break
        if not self.samples:
            raise ShardError(f"rank {self.loader.env.rank}: no sample of this worker's share of the epoch can be "
                             f"used ({why}); the shards are damaged or hold no images: check them with "
                             f"`pipeline shards index` or drop them from the source")
        return self.loader.transform(self.samples[seed % len(self.samples)], seed)


def _ignore_sigterm(_worker_id: int) -> None:
    """Slurm sends SIGTERM to every process of a job step it preempts or cancels; workers that died of it would
    stop the rank before it can save the step it is on (see ``launchers.slurm``). The main process still ends
    them: through the loader's shutdown, or with the step's SIGKILL."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TorchLoader(LoaderPosition):
    """Tar streams + PIL + torchvision v2 in DataLoader workers (see the module docstring)."""

    def __init__(self, cfg: Config, env: DistEnv, device: torch.device, recipe: Recipe, *,
                 shards: Any = None, shuffle: bool = True, source: DataSource | None = None) -> None:
        self.env, self.device = env, device
        self.shards = source or resolve_for_job(shards or cfg.data.train_shards, cfg.data)
        self.recipe = recipe
        check_fields(self.shards, cfg.data.image_key, cfg.data.text_key, recipe.with_text)
        self.transform = SampleTransform(self.recipe, cfg.data.image_key, cfg.data.label_key, cfg.data.text_key)
        self.policy = RetryPolicy(cfg.data.retries, cfg.data.retry_backoff_s)
        self.batch_size, self.seed, self.shuffle = cfg.loader.batch_size, cfg.run.seed, shuffle
        self.shuffle_buffer, self.num_workers = cfg.loader.shuffle_buffer, cfg.loader.num_workers
        self.prefetch_factor = cfg.loader.prefetch_factor
        self.num_samples = epoch_samples(self.shards)
        self.steps_per_epoch = steps_per_epoch(self.num_samples, self.batch_size, env.world_size)
        if self.steps_per_epoch == 0:
            raise ShardError(f"{self.shards.describe()}: {self.num_samples} samples per epoch, fewer than one global "
                             f"batch ({self.batch_size} x {env.world_size} ranks)")
        self.epoch, self.batch = 0, 0
        self.bad_samples, self.last_bad = 0, None

    def rank_state_dict(self) -> dict:
        return {"bad_samples": self.bad_samples}

    def load_rank_state_dict(self, state: dict) -> None:
        self.bad_samples = int(state.get("bad_samples", 0))

    def _epoch_loader(self, epoch: int, skip_batches: int) -> torch.utils.data.DataLoader:
        workers = min(self.num_workers, self.steps_per_epoch)
        return torch.utils.data.DataLoader(
            _EpochDataset(self, epoch, skip_batches), batch_size=None, num_workers=workers,
            pin_memory=self.device.type == "cuda", prefetch_factor=self.prefetch_factor if workers else None,
            persistent_workers=False, multiprocessing_context="fork" if workers else None,
            worker_init_fn=_ignore_sigterm if os.environ.get("PIPELINE_LAUNCHER") == "slurm" else None,
        )

    def __iter__(self) -> Iterator[Batch]:
        # Each epoch has DataLoader workers of its own (they are forked with the epoch's plan). The next epoch's
        # workers start while the last ``prefetch_factor x workers`` batches of this one are consumed, so they
        # have filled their first chunk and batches by the time this epoch ends: without that, every epoch began
        # with idle steps (about 8% of throughput on an epoch of 16 batches, benchmarks/results/loader_torch/).
        # What they yield depends only on (epoch, batch), never on when they started, so resume stays exact.
        upcoming: Iterator[Batch] | None = None
        while True:
            batches = upcoming if upcoming is not None else iter(self._epoch_loader(self.epoch, self.batch))
            upcoming = None
            ahead = self.prefetch_factor * min(self.num_workers, self.steps_per_epoch)
            for batch in batches:
                self.batch += 1
                if upcoming is None and ahead and self.steps_per_epoch - self.batch <= ahead:
                    upcoming = iter(self._epoch_loader(self.epoch + 1, 0))
                if batch.num_bad:
                    self.bad_samples += batch.num_bad
                    self.last_bad = batch.bad_example
                yield batch.to(self.device)
            self.epoch, self.batch = self.epoch + 1, 0


def iter_eval_batches(cfg: Config, shards: Any, env: DistEnv, device: torch.device,
                      max_samples: int = 0) -> Iterator[Batch]:
    """Deterministic, unshuffled pass over (this rank's contiguous part of) labelled shards with the eval recipe.
    Unlike training, nothing is dropped or replaced: the last batch may be short, ranks may differ by one sample,
    and a bad sample is skipped (counted in a warning at the end). Collective when distributed (the source is
    resolved on rank 0)."""
    source = resolve_for_job(shards, cfg.data, where="data.eval_*_shards", progress=False)
    total = source.num_samples if not max_samples else min(max_samples, source.num_samples)
    per = -(-total // env.world_size)
    start, stop = env.rank * per, min(total, (env.rank + 1) * per)
    spans = plan_range(epoch_spans(source, 0, 0, shuffle=False), start, stop)
    # At the size the model is built for (what the export records), not the training views' size, which pretext
    # tasks set larger (a jigsaw puzzle or patch grid is cut from them): every method is scored on the same images.
    recipe = build_recipe(replace(cfg.augment, image_size=cfg.model.img_size), "eval")
    transform = SampleTransform(recipe, cfg.data.image_key, cfg.data.label_key,
                                cfg.data.text_key)
    policy = RetryPolicy(cfg.data.retries, cfg.data.retry_backoff_s)
    items, bad, example = [], 0, ""
    for i, sample in enumerate(iter_spans(spans, policy)):
        try:
            items.append(transform(sample, start + i))
        except BadSample as exc:
            bad, example = bad + 1, str(exc)
            continue
        if len(items) == cfg.eval.batch_size:
            yield collate(items).to(device)
            items = []
    if items:
        yield collate(items).to(device)
    if bad:
        print(f"warning: rank {env.rank} skipped {bad} bad samples of {source.describe()} (last: {example})",
              file=sys.stderr)
