"""The DALI backend: WebDataset shards -> DALI (decode ``mixed`` on a GPU, ``cpu`` without one; the recipe's views
rendered as DALI ops) -> ``DALIGenericIterator`` -> :class:`Batch`, from any source :mod:`pipeline.data.sources`
resolves.

Where the bytes come from (``loader.dali_reader``, logged once at start):

- ``native``: DALI's ``fn.readers.webdataset`` reads the shards itself through index files: local files, and
  ``s3://`` through DALI's AWS SDK (``AWS_ENDPOINT_URL`` and the usual AWS settings; one ranged GET per member,
  one after the other). Index files of remote shards are local (``data.cache_dir``).
- ``stream``: a reader thread streams each shard whole (one GET per remote shard, :mod:`pipeline.data.storage`,
  with the torch backend's retries and damaged-tar handling) and hands the members to DALI's
  ``fn.external_source``; decode and augmentation stay in DALI. The only way for ``http(s)://`` and ``pipe:``.
- ``auto``: native for local shards, stream for remote ones.

The epoch plan is the torch backend's (:func:`pipeline.data.plan.epoch_spans`, weighted mixtures included): shard
order seeded by ``(run.seed, epoch)``, one contiguous range of the stream per rank, ``steps_per_epoch`` batches on
every rank. Each rank reads exactly its range, in an order the loader knows: each span shuffled in blocks of
``loader.shuffle_buffer`` samples (seeded by seed, epoch and rank); the native reader gets it as derived index
files (:mod:`pipeline.data.dali_index`), with the reader's own shuffle off. Augmentation draws come from DALI's
per-operator generators, seeded by (seed, epoch, rank, first batch of the pipeline).

Bad samples are counted, not fatal. A sample whose members fail the check against the tar (native: past the end
of the file, no matching tar header), that a damaged shard lost (stream), or that has no image is replaced by
another sample of its batch. An image that does not decode stops DALI's pipeline (DALI decodes a batch at a time
and cannot ask the reader for another sample, NVIDIA/DALI#3913): the loader decodes that batch's images one by
one to find the bad ones, replaces them the same way and rebuilds the pipeline at that batch; they stay replaced
for the rest of the run. ``Batch.num_bad`` and ``bad_samples`` count replaced samples (the trainer reports and
bounds them, ``data.max_bad_fraction``).

Resume is exact: each rank saves DALI's own checkpoint of its pipeline (reader position or external source
iteration, and generator states, from ``DALIGenericIterator.checkpoints()``), the first batch of that pipeline
and the images it found undecodable; a resume on the same number of ranks rebuilds the same pipeline and
restores it. Without a usable DALI checkpoint the pipeline is rebuilt and its first batches are decoded again
and discarded (still exact).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Config, ConfigError
from pipeline.data import storage
from pipeline.data.dali_index import (
    EntryCache,
    Fields,
    RankOrder,
    ShardRef,
    block_shuffled,
    replace_bad,
    runs,
    write_run_indexes,
)
from pipeline.data.loader import Batch, LoaderPosition
from pipeline.data.plan import Span, epoch_samples, epoch_spans, plan_range, rank_range, steps_per_epoch
from pipeline.data.recipes import Recipe, ViewSpec
from pipeline.data.shards import ShardError
from pipeline.data.sources import IMAGE_EXTS, DataSource, cache_index_path, index_shard, resolve_for_job
from pipeline.data.storage import RetryPolicy
from pipeline.distributed import DistEnv

_SOURCE_INFO = re.compile(r"(?P<shard>[^\s:'\"]+\.tar):(?P<offset>\d+):(?P<member>[^\s'\"]+)")
UNDECODABLE = "the image does not decode"


# ---------------------------------------------------------------------------------------------------------------
# Rendering a ViewSpec as DALI ops


def render_dali(view: ViewSpec, images, seeds: Callable[[], dict] | None = None):
    """One view of decoded HWC uint8 ``images`` (a DataNode, CPU or GPU) as DALI ops, in the order of
    ``render_torchvision``: crop, flip, colour jitter, grayscale, blur, solarize, normalise -> float32 CHW.

    Known differences from torchvision (same parameter ranges, slightly different operators): DALI's
    ``color_twist`` applies brightness, contrast, saturation and hue in a fixed order (torchvision shuffles the
    order), scales contrast around mid-grey 128 (torchvision: around the image's mean grey) and rotates hue in
    YIQ space (torchvision: in HSV). Grayscale is saturation 0 in the same op (luma weights of ITU-R 601, as
    torchvision). Must be called inside a pipeline built with ``enable_conditionals=True``. ``seeds()`` gives each
    random operator its ``seed`` argument (default: the pipeline assigns them in the order operators are created).
    """
    from nvidia.dali import fn, types

    seeds = seeds or dict
    size = [view.size, view.size]
    if view.center:
        out = fn.resize(images, resize_shorter=view.size, antialias=True)
    else:
        out = fn.random_resized_crop(images, size=size, random_area=list(view.scale),
                                     random_aspect_ratio=list(view.ratio), num_attempts=10, antialias=True,
                                     **seeds())
    gray = None
    if view.grayscale_prob:
        gray = fn.cast(fn.random.coin_flip(probability=view.grayscale_prob, **seeds()), dtype=types.FLOAT)
    if view.jitter_prob:
        on = fn.cast(fn.random.coin_flip(probability=view.jitter_prob, **seeds()), dtype=types.FLOAT)

        def factor(strength: float):  # torchvision: uniform in [max(0, 1 - s), 1 + s] when applied
            if not strength:
                return 1.0
            return 1.0 + on * (fn.random.uniform(range=[max(0.0, 1 - strength), 1 + strength], **seeds()) - 1.0)

        saturation = factor(view.saturation)
        if gray is not None:
            saturation = saturation * (1.0 - gray)  # grayscale after jitter == saturation 0 in the same matrix
        hue = on * fn.random.uniform(range=[-view.hue, view.hue], **seeds()) * 360.0 if view.hue else 0.0
        out = fn.color_twist(out, brightness=factor(view.brightness), contrast=factor(view.contrast),
                             saturation=saturation, hue=hue)
    elif gray is not None:
        out = fn.hsv(out, saturation=1.0 - gray)
    if view.blur_prob:
        sigma = fn.random.uniform(range=list(view.blur_sigma), **seeds())
        if view.blur_prob >= 1:
            out = fn.gaussian_blur(out, window_size=view.blur_kernel, sigma=sigma)
        else:
            out = _blur_sometimes(out, view, sigma, seeds)
    if view.solarize_prob:
        out = _solarize_sometimes(out, view.solarize_prob, seeds)
    extra = {"crop": size} if view.center else {}
    if view.flip_prob:
        extra["mirror"] = fn.random.coin_flip(probability=view.flip_prob, **seeds())
    return fn.crop_mirror_normalize(out, dtype=types.FLOAT, output_layout="CHW", mean=[255 * m for m in view.mean],
                                    std=[255 * s for s in view.std], **extra)


def _blur_sometimes(out, view: ViewSpec, sigma, seeds: Callable[[], dict]):
    from nvidia.dali import fn, types

    # a DALI conditional: blurs only the samples whose coin came up
    if fn.random.coin_flip(probability=view.blur_prob, dtype=types.BOOL, **seeds()):
        out = fn.gaussian_blur(out, window_size=view.blur_kernel, sigma=sigma)
    return out


def _solarize_sometimes(out, prob: float, seeds: Callable[[], dict]):
    from nvidia.dali import fn, types

    if fn.random.coin_flip(probability=prob, dtype=types.BOOL, **seeds()):
        high = fn.cast(out >= 128, dtype=types.INT32)  # torchvision: invert pixels >= threshold 128
        out = fn.cast(out + high * (255 - 2 * fn.cast(out, dtype=types.INT32)), dtype=types.UINT8)
    return out


def _graph_tail(recipe: Recipe, encoded, info, extra: list, gpu: bool, seed: int) -> tuple:
    """Decode, the recipe's views, then the metadata outputs (``info()`` makes the sample-name node). Every random
    operator gets its seed from ``seed`` and its rank among them, not from the pipeline: the pipeline numbers all
    its operators, so a reader and an external source in front would shift them."""
    from nvidia.dali import fn, types

    counter = iter(range(1, 1 << 30))

    def seeds() -> dict:
        return {"seed": int(np.random.SeedSequence([seed, next(counter)]).generate_state(1)[0]) % (2**31 - 1)}

    images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
    views = [render_dali(v, images, seeds) for v in recipe.views]
    return (*views, fn.pad(info(), fill_value=0), *[fn.pad(f, fill_value=0) for f in extra])


def dali_pipeline(
    recipe: Recipe, *, paths: list[str], index_paths: list[str], fields: Fields, batch_size: int, num_threads: int,
    device_id: int | None, seed: int, prefetch: int, checkpoint: bytes | None = None,
):
    """Build (not start) the native pipeline reading ``paths`` through ``index_paths`` in order, restored from
    ``checkpoint`` (``Pipeline.checkpoint()`` of the same graph) if given. Outputs: one tensor per view,
    ``source_info`` bytes (``shard.tar:offset:member``, zero padded), then the label and caption member bytes when
    read."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(enable_conditionals=True, enable_checkpointing=True)
    def graph():
        # dont_use_mmap: a member past the end of a file (a shard truncated while the run reads it) then fails a
        # read with an error naming the file, where through a memory map it would crash the process
        outs = fn.readers.webdataset(
            paths=paths, index_paths=index_paths, ext=fields.reader_exts, missing_component_behavior="empty",
            random_shuffle=False, dont_use_mmap=True, name="reader",
        )
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        return _graph_tail(recipe, outs[0], lambda: fn.get_property(outs[0], key="source_info"), list(outs[1:]),
                           device_id is not None, seed)

    return graph(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                 prefetch_queue_depth=prefetch, exec_dynamic=True, checkpoint=checkpoint)


def fed_pipeline(recipe: Recipe, *, source, num_extra: int, batch_size: int, num_threads: int,
                 device_id: int | None, seed: int, prefetch: int, checkpoint: bytes | None = None):
    """The same graph fed by ``source(batch_info)`` (``fn.external_source``): per batch, the encoded images, the
    sample names and ``num_extra`` more byte arrays (label, caption). A source that takes ``BatchInfo`` is part of
    DALI's checkpoint: a restored pipeline asks it for the batches after the checkpoint."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(enable_conditionals=True, enable_checkpointing=True)
    def graph():
        outs = fn.external_source(source=source, num_outputs=2 + num_extra, batch=True, batch_info=True,
                                  dtype=[types.UINT8] * (2 + num_extra))
        return _graph_tail(recipe, outs[0], lambda: outs[1], list(outs[2:]), device_id is not None, seed)

    return graph(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                 prefetch_queue_depth=prefetch, exec_dynamic=True, checkpoint=checkpoint)


def undecodable(blobs: list[bytes], device_id: int | None) -> list[int]:
    """Indices of ``blobs`` that DALI's image decoder (on the loader's device) cannot decode, one image at a time.
    A failed run leaves a DALI pipeline unusable, so each failure costs a new (small) pipeline."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1)
    def graph():
        return fn.decoders.image(fn.external_source(name="encoded", dtype=types.UINT8),
                                 device="mixed" if device_id is not None else "cpu", output_type=types.RGB)

    bad, pipe = [], None
    for i, blob in enumerate(blobs):
        if pipe is None:
            pipe = graph()
            pipe.build()
        pipe.feed_input("encoded", [np.frombuffer(blob, dtype=np.uint8)])
        try:
            pipe.run()
        except RuntimeError:
            bad.append(i)
            pipe = None
    return bad


def _strings(t: torch.Tensor) -> list[str]:
    arr = t.cpu().numpy().astype(np.uint8, copy=False)
    return [row.tobytes().rstrip(b"\0").decode("utf-8", "replace") for row in arr]


def _key_of(source_info: str) -> str:
    m = _SOURCE_INFO.search(source_info)
    member = m.group("member") if m else source_info
    base = member.rsplit("/", 1)[-1]
    return member[: len(member) - len(base)] + base.split(".", 1)[0]


# ---------------------------------------------------------------------------------------------------------------
# The stream reader


_EMPTY = np.zeros(0, dtype=np.uint8)


class _Feeder:
    """Streams one epoch's positions of this rank, from batch ``first`` on, in a thread (each span's shard read
    once from its start, one block of ``loader.shuffle_buffer`` samples held at a time, a few batches ahead) and
    serves them to DALI's external source batch by batch, bad samples replaced."""

    def __init__(self, loader: DaliLoader, epoch: int, order: RankOrder, spans: list[tuple[int, int, int]],
                 first: int, depth: int) -> None:
        self.loader, self.order, self.first = loader, order, first
        self.batches: dict[int, list] = {}  # batch -> [(shard, sample, item)] as read, kept until yielded
        self.info: dict[int, tuple[int, str | None, list]] = {}  # batch -> (bad count, example, served sources)
        self.pipeline_first = first  # the batch the running pipeline's iteration 0 is
        self.next = first  # the next batch the thread will hand over
        self.q: queue.Queue = queue.Queue(maxsize=max(2, depth))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(spans,), daemon=True, name=f"dali-stream-e{epoch}")
        self.thread.start()

    def close(self) -> None:
        self.stop.set()

    def _put(self, item: tuple) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, spans: list[tuple[int, int, int]]) -> None:
        from pipeline.data.torch_loader import _ReadAhead, iter_span_samples

        ld, b_size = self.loader, self.loader.batch_size
        block = ld.shuffle_buffer if ld.shuffle and ld.shuffle_buffer > 1 else 1 << 62
        start_pos, pos, pending = self.first * b_size, 0, []
        todo = []  # (shard, span start, span stop, first block to read, position of the span's first sample)
        for s, lo, hi in spans:
            if pos + hi - lo > start_pos:
                todo.append((s, lo, hi, lo + max(0, start_pos - pos) // block * block, pos))
            pos += hi - lo

        def samples() -> Iterator:
            for s, _, hi, first, _ in todo:
                yield from iter_span_samples(Span(ld.source.shards[s].url, first, hi), ld.policy)

        # reading runs ahead in its own thread (the next shard is fetched while this one's blocks are served)
        ahead = _ReadAhead(samples(), max(4 * b_size, min(block, 4096)))
        items = iter(ahead)
        try:
            for s, lo, hi, first, span_pos in todo:
                for blk in range(first, hi, block):
                    got = [next(items) for _ in range(min(block, hi - blk))]
                    base = span_pos + blk - lo
                    for p in range(max(base, start_pos), base + len(got)):
                        sample = int(self.order.sample[p])
                        pending.append((s, sample, got[sample - blk]))
                        if len(pending) == b_size:
                            if not self._put(("batch", pending)):
                                return
                            pending = []
            self._put(("end", None))
        except BaseException as exc:  # noqa: BLE001 handed to the consumer, which raises it
            self._put(("error", exc))
        finally:
            ahead.close()

    def _read(self, b: int) -> list:
        while self.next <= b:
            kind, x = self.q.get()
            if kind == "error":
                raise x
            if kind == "end":
                raise ShardError(f"rank {self.loader.env.rank}: the stream ended before batch {b}")
            self.batches[self.next] = x
            self.next += 1
        return self.batches[b]

    def forget_before(self, b: int) -> None:
        """Drop what batches before ``b`` (already yielded) kept."""
        for k in [k for k in self.batches if k < b]:
            del self.batches[k]
        for k in [k for k in self.info if k < b]:
            del self.info[k]

    def __call__(self, info) -> list[list[np.ndarray]]:
        """The external source: batch ``pipeline_first + info.iteration``."""
        b = self.pipeline_first + info.iteration
        if b >= self.loader.steps_per_epoch:  # DALI prefetching past the epoch's end: never yielded
            return self._last
        self._last = self.serve(b)
        return self._last

    def serve(self, b: int) -> list[list[np.ndarray]]:
        ld = self.loader
        items = self._read(b)
        bad: dict[int, str] = {}
        for k, (s, sample, item) in enumerate(items):
            why = ld.sample_problem(s, sample, item)
            if why:
                bad[k] = why
        shard = np.array([s for s, _, _ in items])
        slot = np.arange(len(items))
        if bad:
            by_shard = {s: {k: why for k, why in bad.items() if shard[k] == s} for s in {int(shard[k]) for k in bad}}
            try:
                order = replace_bad(shard, slot, by_shard, len(items), ld.paths)
            except ShardError as exc:
                raise ShardError(f"rank {ld.env.rank}: no sample of batch {b} can be read ({exc})") from exc
            slot = order.sample
            s0, k0, why0 = next(iter(order.origin.values()))
            example = f"{ld.paths[s0]} sample {items[k0][1]}: {why0}"
        else:
            example = None
        self.info[b] = (len(bad), example, [(items[k][0], items[k][1]) for k in slot.tolist()])
        cols: list[list[np.ndarray]] = [[] for _ in range(2 + (ld.fields.label_ext is not None)
                                                           + (ld.fields.text_ext is not None))]
        for k in slot.tolist():
            s, sample, item = items[k]
            image = next(e for e in ld.fields.image_exts if e in item)
            cols[0].append(np.frombuffer(item[image], dtype=np.uint8))
            cols[1].append(np.frombuffer(f"{item.get('__key__', sample)}.{image}".encode(), dtype=np.uint8))
            c = 2
            for ext in (ld.fields.label_ext, ld.fields.text_ext):
                if ext is None:
                    continue
                raw = item.get(ext)
                cols[c].append(np.frombuffer(raw, dtype=np.uint8) if raw else _EMPTY)
                c += 1
        return cols

    def image_bytes(self, b: int) -> list[tuple[int, int, bytes]]:
        """(shard, sample, image bytes) of every distinct sample served as batch ``b``."""
        items = {(s, sample): item for s, sample, item in self._read(b)}
        out = []
        for s, sample in dict.fromkeys(self.info[b][2]):
            item = items[(s, sample)]
            image = next(e for e in self.loader.fields.image_exts if e in item)
            out.append((s, sample, item[image]))
        return out


# ---------------------------------------------------------------------------------------------------------------
# The loader


def _field_ext(key: str) -> str:
    """The member a label or caption comes from: ``cls``/``txt``/... as is, ``json:FIELD`` from ``json``."""
    return "json" if key.startswith("json:") else key


def _json_field(raw: str, path: str) -> Any:
    try:
        value = json.loads(raw) if raw.strip() else None
    except json.JSONDecodeError:
        return None
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _as_label(value: Any) -> int:
    if isinstance(value, bool) or value is None:
        return -1
    try:
        return int(str(value).strip())
    except ValueError:
        return -1


def dali_reader_mode(cfg: Config, source: DataSource) -> str:
    """``native`` or ``stream`` for ``source`` under ``loader.dali_reader`` (see :mod:`pipeline.data.dali_loader`)."""
    schemes = {storage.scheme_of(url) for url in source.paths}
    if cfg.loader.dali_reader == "native":
        if not schemes <= {"", "file", "s3"}:
            raise ConfigError(f"loader.dali_reader=native: DALI's reader opens local files and s3:// only, not "
                              f"{', '.join(sorted(schemes - {'', 'file', 's3'}))}:// sources; use "
                              f"loader.dali_reader=stream (or auto)")
        return "native"
    if cfg.loader.dali_reader == "stream":
        return "stream"
    return "native" if schemes <= {"", "file"} else "stream"


class DaliLoader(LoaderPosition):
    """The DALI backend of the :class:`~pipeline.data.loader.Loader` protocol."""

    def __init__(self, cfg: Config, env: DistEnv, device: torch.device, recipe: Recipe, *, shards: Any = None,
                 shuffle: bool = True, source: DataSource | None = None) -> None:
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as exc:
            raise ImportError("loader.backend=dali needs NVIDIA DALI: pip install -e '.[dali]' "
                              "(or loader.backend=torch)") from exc
        self.env, self.device, self.recipe = env, device, recipe
        self.source = source or resolve_for_job(shards or cfg.data.train_shards, cfg.data)
        where = self.source.describe()
        self.cache_dir = cfg.data.cache_dir or None
        self.policy = RetryPolicy(cfg.data.retries, cfg.data.retry_backoff_s)
        self.mode = dali_reader_mode(cfg, self.source)
        fields = self.source.fields
        if cfg.data.image_key == "auto":
            image_exts = IMAGE_EXTS
        else:
            image_exts = tuple(k.strip().lower() for k in cfg.data.image_key.split(";") if k.strip())
        if fields and not set(image_exts) & set(fields):
            raise ShardError(f"shards in {where} have no {cfg.data.image_key!r} field (fields: {fields}); "
                             f"set data.image_key")
        self.label_key, self.text_key = cfg.data.label_key, cfg.data.text_key
        label_ext, text_ext = _field_ext(self.label_key), _field_ext(self.text_key)
        with_label = not fields or label_ext in fields
        if recipe.with_text and fields and text_ext not in fields:
            raise ShardError(f"recipe {recipe.name!r} needs captions but {where} has no {text_ext} field")
        self.fields = Fields(tuple(image_exts), label_ext if with_label else None,
                             text_ext if recipe.with_text else None, require_text=recipe.with_text)
        self.paths = self.source.paths
        self._shard_of: dict[str, int] = {}
        for i, url in enumerate(self.paths):
            self._shard_of.setdefault(url, i)
        self._refs: dict[int, ShardRef] = {}
        self.num_samples = epoch_samples(self.source)
        self.batch_size, self.seed, self.shuffle = cfg.loader.batch_size, cfg.run.seed, shuffle
        self.shuffle_buffer = cfg.loader.shuffle_buffer
        self.num_threads = max(1, cfg.loader.num_workers)
        self.prefetch = max(1, cfg.loader.prefetch_factor)
        self.steps_per_epoch = steps_per_epoch(self.num_samples, self.batch_size, env.world_size)
        if self.steps_per_epoch == 0:
            raise ShardError(f"{where} has {self.num_samples} samples per epoch: fewer than one global batch "
                             f"({self.batch_size} x {env.world_size} ranks)")
        if env.is_main:
            how = {"native": "DALI's webdataset reader reads the shards itself",
                   "stream": "shards are streamed whole by a reader thread into DALI's external_source "
                             "(decode and augmentation in DALI)"}[self.mode]
            print(f"dali loader: {how} (loader.dali_reader={cfg.loader.dali_reader}); {where}")
        self.entries = EntryCache(self.fields)
        self.epoch, self.batch = 0, 0
        self.bad_samples, self.last_bad = 0, None
        self._found: dict[int, set[int]] = {}  # shard -> samples whose image DALI could not decode
        self._reported: set[int] = set()  # shards whose failed header checks were reported
        self._full: set[int] = set()  # shards whose every header was checked (one of their images did not decode)
        self._segment = 0  # first batch of the running pipeline (its generators are seeded by it)
        self._it = None  # the running pipeline's DALIGenericIterator
        self._feeder: _Feeder | None = None  # stream mode: the running epoch's reader
        self._restore: bytes | None = None  # DALI checkpoint of (epoch, batch) to resume from
        self._folder = Path(tempfile.mkdtemp(prefix=f"dali-plan-rank{env.rank}-"))
        weakref.finalize(self, shutil.rmtree, str(self._folder), True)

    # -- position and per-rank state ---------------------------------------------------------------------------

    def load_state_dict(self, state: dict[str, int]) -> None:
        super().load_state_dict(state)
        self._restore, self._segment = None, 0

    def rank_state_dict(self) -> dict:
        """This rank's state at the current position: the running pipeline's first batch and DALI checkpoint
        (none before the first batch of an epoch), the images found undecodable and the bad-sample count. Plain
        data (ints, strings, lists, bytes)."""
        state: dict = {"epoch": self.epoch, "batch": self.batch, "segment": self._segment,
                       "bad_samples": self.bad_samples, "last_bad": self.last_bad or "",
                       "undecodable": {self.paths[s]: sorted(ids) for s, ids in sorted(self._found.items())}}
        if self._it is not None and 0 < self.batch < self.steps_per_epoch:
            state["dali"] = self._it.checkpoints()[0]
        return state

    def load_rank_state_dict(self, state: dict) -> None:
        """Take the saved state if it was taken at the position ``load_state_dict`` set."""
        if (state.get("epoch"), state.get("batch")) != (self.epoch, self.batch):
            return
        self._segment = min(int(state.get("segment", 0)), self.batch)
        self._restore = state.get("dali") or None
        self.bad_samples, self.last_bad = int(state.get("bad_samples", 0)), state.get("last_bad") or None
        self._found = {self._shard_of[url]: set(ids) for url, ids in state.get("undecodable", {}).items()
                       if url in self._shard_of}

    # -- shards and the plan -----------------------------------------------------------------------------------

    def ref(self, s: int) -> ShardRef:
        """Shard ``s`` as the native reader opens it, with a local index file: the source's, a remote one copied
        into the cache, or one written now (beside a local shard, else in the cache). Only shards of this rank's
        spans are ever looked at."""
        hit = self._refs.get(s)
        if hit is not None:
            return hit
        shard = self.source.shards[s]
        url = storage.local_path(shard.url)
        index = shard.index
        if index and storage.is_remote(index):
            local = cache_index_path(shard.url, self.cache_dir)
            if not local.is_file():
                data = storage.read_bytes(index, self.policy)
                if data is None:
                    raise ShardError(f"the DALI index {index} of {shard.url} is gone; refresh the cache: "
                                     f"pipeline shards index {shard.url} --refresh")
                local.parent.mkdir(parents=True, exist_ok=True)
                storage.write_bytes_atomic(str(local), data)
            index = str(local)
        elif not index or not os.path.isfile(index):
            index = self._write_index(url)
        ref = ShardRef(url, str(index), shard.num_samples, shard.bytes or None)
        self._refs[s] = ref
        return ref

    def _write_index(self, url: str) -> str:
        if storage.is_remote(url):
            out = cache_index_path(url, self.cache_dir)
        else:
            beside = Path(url).with_suffix(".idx")
            out = beside if os.access(beside.parent, os.W_OK) else cache_index_path(url, self.cache_dir)
        if not out.is_file():
            try:
                index_shard(url, out, self.policy)
            except OSError as exc:
                raise ShardError(f"{url} has no DALI index and {out} cannot be written ({exc}); write the "
                                 f"indexes once with: pipeline shards index {url} --cache DIR (and data.cache_dir=DIR)"
                                 ) from exc
        return str(out)

    def rank_spans(self, epoch: int) -> list[tuple[int, int, int]]:
        """This rank's spans of ``epoch`` (shard, start, stop): the torch backend's plan."""
        spans = epoch_spans(self.source, self.seed, epoch, self.shuffle)
        start, stop = rank_range(self.steps_per_epoch, self.batch_size, self.env.rank)
        return [(self._shard_of[span.path], span.start, span.stop) for span in plan_range(spans, start, stop)]

    def rank_order(self, epoch: int, spans: list[tuple[int, int, int]] | None = None) -> RankOrder:
        """This rank's positions of ``epoch``; in native mode with every bad sample known so far replaced (the
        stream reader replaces them as it serves each batch)."""
        spans = self.rank_spans(epoch) if spans is None else spans
        rng = None
        if self.shuffle and self.shuffle_buffer > 1:
            rng = np.random.default_rng([self.seed, epoch, self.env.rank])
        shard, sample = block_shuffled(spans, self.shuffle_buffer, rng)
        if self.mode == "stream":
            return RankOrder(shard, sample, np.zeros(len(shard), dtype=bool))
        bad: dict[int, dict[int, str]] = {}
        for s in np.unique(shard).tolist():
            if s in self._found and s not in self._full:
                # damage between the header probes shows up as images that do not decode: check that shard in
                # full, here rather than where it was found, so a resumed run derives the same replacements
                self._full.add(s)
                self._reported.discard(s)
                known = self.entries.check_fully(self.ref(s))
            else:
                known = self.entries.bad(self.ref(s))
            if known and s not in self._reported:
                self._reported.add(s)
                first = min(known)
                print(f"dali loader: rank {self.env.rank}: {len(known)} of {self.source.shards[s].num_samples} "
                      f"samples of {self.paths[s]} cannot be read and count as bad samples (e.g. sample {first}: "
                      f"{known[first]})")
            found = {i: UNDECODABLE for i in self._found.get(s, ())}
            if known or found:
                bad[s] = {**known, **found}
        return replace_bad(shard, sample, bad, self.batch_size, self.paths)

    def sample_problem(self, s: int, sample: int, item: Any) -> str | None:
        """Why a streamed sample cannot be used (None when it can)."""
        if not isinstance(item, dict):
            return item.reason  # a Lost placeholder of a damaged or short shard
        if not any(e in item for e in self.fields.image_exts):
            return f"no {'/'.join(self.fields.image_exts)} member"
        if self.fields.require_text and self.fields.text_ext not in item:
            return f"no {self.fields.text_ext} member (the recipe needs captions)"
        if sample in self._found.get(s, ()):
            return UNDECODABLE
        return None

    def _seed(self, epoch: int, segment: int) -> int:
        state = np.random.SeedSequence([self.seed, epoch, self.env.rank, segment]).generate_state(1)
        return int(state[0]) % (2**31 - 1)

    def _device_id(self) -> int | None:
        if self.device.type != "cuda":
            return None
        return self.device.index if self.device.index is not None else self.env.local_rank

    def build_pipeline(self, epoch: int, segment: int, order: RankOrder, checkpoint: bytes | None = None):
        """The DALI pipeline reading ``order`` from batch ``segment`` to the end of the epoch."""
        common = {"batch_size": self.batch_size, "num_threads": self.num_threads, "device_id": self._device_id(),
                  "seed": self._seed(epoch, segment), "prefetch": self.prefetch, "checkpoint": checkpoint}
        if self.mode == "stream":
            self._feeder.pipeline_first = segment
            extra = (self.fields.label_ext is not None) + (self.fields.text_ext is not None)
            return fed_pipeline(self.recipe, source=self._feeder, num_extra=extra, **common)
        run_list = runs(order, segment * self.batch_size)
        folder = self._folder / f"epoch{epoch}"
        for old in self._folder.iterdir():
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
        index_paths = write_run_indexes(run_list, self.ref, self.entries, folder)
        return dali_pipeline(self.recipe, paths=[self.ref(s).url for s, _ in run_list], index_paths=index_paths,
                             fields=self.fields, **common)

    # -- iteration ---------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield from self._epoch()
            self.epoch, self.batch, self._segment, self._restore = self.epoch + 1, 0, 0, None

    def _output_names(self) -> list[str]:
        names = [f"view{i}" for i in range(len(self.recipe.views))] + ["source_info"]
        return names + ["label"] * (self.fields.label_ext is not None) + ["text"] * (self.fields.text_ext is not None)

    def _start(self, epoch: int, segment: int, order: RankOrder, spans, checkpoint: bytes | None):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        def start(ckpt: bytes | None, first: int):
            feeder = self._feeder  # reused after a rebuild at a batch it still holds
            if self.mode == "stream" and (feeder is None or feeder.first > first
                                          or first < feeder.next and first not in feeder.batches):
                if self._feeder is not None:
                    self._feeder.close()
                self._feeder = _Feeder(self, epoch, order, spans, first, self.prefetch + 2)
            # No reader_name/size: exactly the batches up to steps_per_epoch are taken, then the pipeline is dropped
            pipe = self.build_pipeline(epoch, segment, order, checkpoint=ckpt)
            it = DALIGenericIterator([pipe], self._output_names(), size=-1, auto_reset=False,
                                     prepare_first_batch=False)
            return pipe, it

        if checkpoint is not None:
            try:
                return (*start(checkpoint, self.batch), True)
            except RuntimeError as exc:
                print(f"rank {self.env.rank}: cannot restore DALI's checkpoint ({str(exc).strip().splitlines()[-1]});"
                      f" replaying {self.batch - segment} batches of epoch {epoch} instead")
        return (*start(None, segment), False)

    def _epoch(self) -> Iterator[Batch]:
        """The rest of the current epoch, from ``self.batch``; a pipeline that fails on an undecodable image is
        rebuilt at the failing batch with the bad images replaced."""
        epoch, steps = self.epoch, self.steps_per_epoch
        if self.batch >= steps:
            return
        spans = self.rank_spans(epoch)
        order = self.rank_order(epoch, spans)
        segment, checkpoint = min(self._segment, self.batch), self._restore
        self._restore = None
        if self.batch and self.env.is_main:
            how = "from DALI's checkpoint" if checkpoint is not None else f"by replaying {self.batch - segment} batches"
            print(f"dali loader: epoch {epoch} resumes at batch {self.batch} {how}")
        try:
            while self.batch < steps:
                self._segment = segment
                pipe, it, restored = self._start(epoch, segment, order, spans, checkpoint)
                checkpoint, failed = None, None
                b = self.batch if restored else segment
                self._it = it
                try:
                    while self.batch < steps:
                        try:
                            out = next(it)[0]
                        except StopIteration:
                            raise ShardError(f"rank {self.env.rank}: DALI ran out of samples at batch {b} of epoch "
                                             f"{epoch}") from None
                        except ShardError:
                            raise  # from the stream reader: already says what and where
                        except RuntimeError as exc:
                            failed = exc
                            break
                        if b < self.batch:  # replaying a resumed epoch: same seeds, so the kept batches are exact
                            b += 1
                            continue
                        batch = self._to_batch(out)
                        batch.num_bad, batch.bad_example = self._bad_in(order, b)
                        if batch.num_bad:
                            self.bad_samples += batch.num_bad
                            self.last_bad = batch.bad_example
                        b += 1
                        self.batch += 1
                        if self._feeder is not None:
                            self._feeder.forget_before(self.batch)
                        yield batch
                finally:
                    self._it = None
                    del it, pipe
                if failed is not None:
                    order = self._replace_undecodable(failed, epoch, b, order)
                    segment = b
        finally:
            if self._feeder is not None:
                self._feeder.close()
                self._feeder = None

    def _bad_in(self, order: RankOrder, b: int) -> tuple[int, str | None]:
        if self._feeder is not None:
            n, example, _ = self._feeder.info[b]
            return n, example
        lo = b * self.batch_size
        hit = np.flatnonzero(order.replaced[lo : lo + self.batch_size])
        if not len(hit):
            return 0, None
        s, i, why = order.origin[lo + int(hit[0])]
        return len(hit), f"{self.paths[s]} sample {i}: {why}"

    def _replace_undecodable(self, exc: RuntimeError, epoch: int, b: int, order: RankOrder) -> RankOrder:
        """After the pipeline failed at batch ``b``: find the images of that batch that do not decode, remember them
        and return the epoch's order with them replaced; anything else is raised as a :class:`ShardError`."""
        msg = str(exc)
        detail = next((ln for ln in reversed(msg.strip().splitlines()) if ln.strip() and "no longer valid" not in ln),
                      "")
        where = f"rank {self.env.rank}, epoch {epoch}, batch {b}"
        if "decoders.image" not in msg:
            m = _SOURCE_INFO.search(msg)
            shard = m.group("shard") if m else next((u for u in self.paths if u in msg), "a shard of this batch")
            raise ShardError(f"{where}: DALI could not read {shard}: {detail}") from exc
        if self._feeder is not None:
            candidates = self._feeder.image_bytes(b)
        else:
            lo = b * self.batch_size
            pairs = dict.fromkeys(zip(order.shard[lo : lo + self.batch_size].tolist(),
                                      order.sample[lo : lo + self.batch_size].tolist()))
            candidates = [(s, i, self._image_bytes(s, i)) for s, i in pairs]
        bad = [candidates[k][:2] for k in undecodable([c[2] for c in candidates], self._device_id())]
        if not bad:
            raise ShardError(f"{where}: DALI failed on this batch, yet each of its images decodes on its own: "
                             f"{detail}") from exc
        for s, i in bad:
            self._found.setdefault(s, set()).add(i)
            print(f"dali loader: {where}: {self.paths[s]} sample {i}: {UNDECODABLE}; it counts as a bad sample and "
                  f"is replaced for the rest of the run")
        return self.rank_order(epoch)

    def _image_bytes(self, s: int, i: int) -> bytes:
        ref = self.ref(s)
        off, size, _ = self.entries.get(ref).image_member(i, self.fields.image_exts)
        data = storage.read_bytes(ref.url, self.policy, off, size)
        if data is None:
            raise ShardError(f"shard {ref.url} is gone")
        return data

    def _to_batch(self, out: dict[str, torch.Tensor]) -> Batch:
        views = [out[f"view{i}"].to(self.device, non_blocking=True) for i in range(len(self.recipe.views))]
        keys = [_key_of(s) for s in _strings(out["source_info"])]
        labels = torch.full((len(keys),), -1, dtype=torch.long)
        if "label" in out:
            raw = _strings(out["label"])
            if self.label_key.startswith("json:"):
                labels = torch.tensor([_as_label(_json_field(r, self.label_key[5:])) for r in raw], dtype=torch.long)
            else:
                labels = torch.tensor([_as_label(r) if r.strip() else -1 for r in raw], dtype=torch.long)
        texts = None
        if "text" in out:
            raw = _strings(out["text"])
            if self.text_key.startswith("json:"):
                texts = [str(_json_field(r, self.text_key[5:]) or "") for r in raw]
            else:
                texts = raw
        return Batch(views, labels.to(self.device, non_blocking=True), texts, keys)


def render_arrays(view: ViewSpec, images: list[np.ndarray], seed: int = 0, num_threads: int = 1) -> np.ndarray:
    """Render ``view`` on HWC uint8 arrays on DALI's CPU backend (recipe checks and debugging): N x C x H x W."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(enable_conditionals=True)
    def graph():
        return render_dali(view, fn.external_source(source=lambda: images, batch=True, layout="HWC"))

    pipe = graph(batch_size=len(images), num_threads=num_threads, device_id=None, seed=seed)
    pipe.build()
    (out,) = pipe.run()
    return np.stack([np.array(out[i]) for i in range(len(images))])
