"""The DALI backend: WebDataset shards -> ``fn.readers.webdataset`` -> decode (``mixed`` on a GPU, ``cpu``
without one) -> the recipe's views rendered as DALI ops -> ``DALIGenericIterator`` -> :class:`Batch`.

How an epoch is split, compared with the torch backend (``pipeline.data.torch_loader``):

- Same: the shard order is shuffled with :func:`~pipeline.data.plan.shard_order` seeded by ``(run.seed,
  epoch)`` and the shards are laid end to end; the stream is split at sample level into one contiguous range
  per rank (DALI's ``shard_id = rank``, ``num_shards = world size``), so every sample is read by at most one
  rank per epoch; every rank takes exactly ``steps_per_epoch = samples // (batch x world)`` batches.
- Different: DALI cuts the ranges at ``samples * rank // world`` (the torch backend at
  ``rank * steps * batch``), so the few samples left over by the floor division are dropped from the end of
  every rank's range instead of from the end of the stream. Within a rank, samples are shuffled by DALI's
  reader buffer (``random_shuffle``, ``initial_fill = loader.shuffle_buffer``, seeded by seed/epoch/rank),
  not webdataset's; and augmentation draws come from DALI's per-operator generators (seeded by
  seed/epoch/rank), not from per-sample torch seeds, so the two backends see different crops of a sample.
- Resume: pipelines are built with ``enable_checkpointing=True`` and every checkpoint of the run stores, per
  rank, DALI's own checkpoint of that rank's pipeline (reader position and every random generator, taken from
  ``DALIGenericIterator.checkpoints()``, which accounts for prefetched batches). A resume on the same number of
  ranks restores it: the next batch is the one an uninterrupted run would have produced, with no replay. Without
  a usable DALI checkpoint (another number of ranks, another DALI version, a checkpoint from a torch-backend
  run) the loader rebuilds epoch ``e``'s pipeline (same seeds) and runs and discards its first ``k`` batches:
  still exact, at the cost of decoding ``k`` batches again (at most one epoch's worth, once per resume).

Bad data: a sample without the image field is skipped by the reader (``missing_component_behavior="skip"``)
and counted from the index files before the run starts (``DaliLoader.skipped``). A sample whose image does not
decode cannot be skipped: DALI decodes a batch at a time and cannot ask the reader for a replacement sample
(NVIDIA/DALI#3913), so the loader stops with a :class:`ShardError` naming the shard and the key. A missing
index file is written next to its shard (or, if that folder is read-only, reported with the ``wds2idx``
command that writes it).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data.loader import Batch, LoaderPosition
from pipeline.data.plan import shard_order, steps_per_epoch
from pipeline.data.recipes import Recipe, ViewSpec
from pipeline.data.shards import ShardError, write_dali_index
from pipeline.data.sources import IMAGE_EXTS, DataSource, cache_index_path, resolve_for_job
from pipeline.distributed import DistEnv

_SOURCE_INFO = re.compile(r"(?P<shard>[^\s:'\"]+\.tar):(?P<offset>\d+):(?P<member>[^\s'\"]+)")


# ---------------------------------------------------------------------------------------------------------------
# Index files


@dataclass
class ShardIndex:
    """One shard as DALI will read it: tar, index file, and how many samples have every wanted field."""

    tar: Path
    index: Path
    samples: int
    usable: int


def index_command(tar: Path, index: Path) -> str:
    return f"wds2idx {tar} {index}"


def ensure_index(tar: Path, index: Path, expected: int | None = None) -> None:
    """Write ``index`` for ``tar`` if it is missing or does not match the manifest's sample count."""
    if index.is_file():
        with open(index) as f:
            header = f.readline().split()
        if len(header) == 2 and (expected is None or int(header[1]) == expected):
            return
        reason = f"index {index} does not match {tar} (header {' '.join(header)!r}, manifest: {expected} samples)"
    else:
        reason = f"index file {index} is missing"
    tmp = index.with_name(f".{index.name}.{os.getpid()}.tmp")  # ranks may write the same index at once
    try:
        write_dali_index(tar, tmp)
        os.replace(tmp, index)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ShardError(f"{reason} and cannot be written ({exc}); create it with: {index_command(tar, index)}") from exc


def read_index(tar: Path, index: Path, exts: list[set[str]]) -> ShardIndex:
    """Count the samples of a DALI index (format v1.2: ``ext offset size name`` per component) that have a
    component for every output (each output accepts a set of extensions)."""
    with open(index) as f:
        header = f.readline().split()
        if len(header) != 2 or not header[0].startswith("v1."):
            raise ShardError(f"{index} is not a DALI webdataset index; recreate it with: {index_command(tar, index)}")
        samples = usable = 0
        for line in f:
            parts = line.split()
            if not parts:
                continue
            samples += 1
            have = {parts[i] for i in range(0, len(parts), 4)}
            usable += all(have & want for want in exts)
    return ShardIndex(tar, index, samples, usable)


def ensure_indexes(source: DataSource, cache_dir: str | None = None) -> list[tuple[Path, Path]]:
    """``(tar, index)`` of every (local) shard of ``source``: the index it has, else one written beside the shard
    (or into the cache when the shard's folder is read-only; see :func:`pipeline.data.sources.cache_index_path`)."""
    out = []
    for shard in source.shards:
        tar = Path(shard.url)
        if shard.index:
            index = Path(shard.index)
        elif os.access(tar.parent, os.W_OK):
            index = tar.with_suffix(".idx")
        else:
            index = cache_index_path(shard.url, cache_dir)
            index.parent.mkdir(parents=True, exist_ok=True)
        ensure_index(tar, index, shard.num_samples)
        out.append((tar, index))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Rendering a ViewSpec as DALI ops


def render_dali(view: ViewSpec, images):
    """One view of decoded HWC uint8 ``images`` (a DataNode, CPU or GPU) as DALI ops, in the order of
    ``render_torchvision``: crop, flip, colour jitter, grayscale, blur, solarize, normalise -> float32 CHW.

    Known differences from torchvision (same parameter ranges, slightly different operators): DALI's
    ``color_twist`` applies brightness, contrast, saturation and hue in a fixed order (torchvision shuffles the
    order), scales contrast around mid-grey 128 (torchvision: around the image's mean grey) and rotates hue in
    YIQ space (torchvision: in HSV). Grayscale is saturation 0 in the same op (luma weights of ITU-R 601, as
    torchvision). Must be called inside a pipeline built with ``enable_conditionals=True``.
    """
    from nvidia.dali import fn, types

    size = [view.size, view.size]
    if view.center:
        out = fn.resize(images, resize_shorter=view.size, antialias=True)
    else:
        out = fn.random_resized_crop(images, size=size, random_area=list(view.scale),
                                     random_aspect_ratio=list(view.ratio), num_attempts=10, antialias=True)
    gray = None
    if view.grayscale_prob:
        gray = fn.cast(fn.random.coin_flip(probability=view.grayscale_prob), dtype=types.FLOAT)
    if view.jitter_prob:
        on = fn.cast(fn.random.coin_flip(probability=view.jitter_prob), dtype=types.FLOAT)

        def factor(strength: float):  # torchvision: uniform in [max(0, 1 - s), 1 + s] when applied
            if not strength:
                return 1.0
            return 1.0 + on * (fn.random.uniform(range=[max(0.0, 1 - strength), 1 + strength]) - 1.0)

        saturation = factor(view.saturation)
        if gray is not None:
            saturation = saturation * (1.0 - gray)  # grayscale after jitter == saturation 0 in the same matrix
        hue = on * fn.random.uniform(range=[-view.hue, view.hue]) * 360.0 if view.hue else 0.0
        out = fn.color_twist(out, brightness=factor(view.brightness), contrast=factor(view.contrast),
                             saturation=saturation, hue=hue)
    elif gray is not None:
        out = fn.hsv(out, saturation=1.0 - gray)
    if view.blur_prob:
        sigma = fn.random.uniform(range=list(view.blur_sigma))
        if view.blur_prob >= 1:
            out = fn.gaussian_blur(out, window_size=view.blur_kernel, sigma=sigma)
        else:
            out = _blur_sometimes(out, view, sigma)
    if view.solarize_prob:
        out = _solarize_sometimes(out, view.solarize_prob)
    extra = {"crop": size} if view.center else {}
    if view.flip_prob:
        extra["mirror"] = fn.random.coin_flip(probability=view.flip_prob)
    return fn.crop_mirror_normalize(out, dtype=types.FLOAT, output_layout="CHW", mean=[255 * m for m in view.mean],
                                    std=[255 * s for s in view.std], **extra)


def _blur_sometimes(out, view: ViewSpec, sigma):
    from nvidia.dali import fn, types

    if fn.random.coin_flip(probability=view.blur_prob, dtype=types.BOOL):  # a DALI conditional: blurs only those
        out = fn.gaussian_blur(out, window_size=view.blur_kernel, sigma=sigma)
    return out


def _solarize_sometimes(out, prob: float):
    from nvidia.dali import fn, types

    if fn.random.coin_flip(probability=prob, dtype=types.BOOL):
        high = fn.cast(out >= 128, dtype=types.INT32)  # torchvision: invert pixels >= threshold 128
        out = fn.cast(out + high * (255 - 2 * fn.cast(out, dtype=types.INT32)), dtype=types.UINT8)
    return out


def dali_pipeline(
    recipe: Recipe, *, paths: list[str], index_paths: list[str], exts: list[str], batch_size: int, num_threads: int,
    device_id: int | None, shard_id: int, num_shards: int, shuffle: bool, shuffle_buffer: int, reader_seed: int,
    seed: int, prefetch: int, with_label: bool, with_text: bool, checkpoint: bytes | None = None,
):
    """Build (not start) the DALI pipeline of one epoch, restored from ``checkpoint`` (``Pipeline.checkpoint()``
    of the same graph) if given. Outputs: one tensor per view, ``source_info`` bytes (``shard.tar:offset:member``,
    zero padded), then the label and caption bytes when present."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None

    @pipeline_def(enable_conditionals=True, enable_checkpointing=True)
    def graph():
        wanted = [";".join(exts)] + (["cls"] if with_label else []) + (["txt"] if with_text else [])
        fields = fn.readers.webdataset(
            paths=paths, index_paths=index_paths, ext=wanted, missing_component_behavior="skip",
            shard_id=shard_id, num_shards=num_shards, random_shuffle=shuffle and shuffle_buffer > 1,
            initial_fill=max(1, shuffle_buffer), seed=reader_seed, name="reader",
        )
        fields = fields if isinstance(fields, (list, tuple)) else [fields]
        encoded = fields[0]
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
        views = [render_dali(v, images) for v in recipe.views]
        meta = [fn.pad(fn.get_property(encoded, key="source_info"), fill_value=0)]
        meta += [fn.pad(f, fill_value=0) for f in fields[1:]]
        return (*views, *meta)

    return graph(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                 prefetch_queue_depth=prefetch, exec_dynamic=True, checkpoint=checkpoint)


def _strings(t: torch.Tensor) -> list[str]:
    arr = t.cpu().numpy().astype(np.uint8, copy=False)
    return [row.tobytes().rstrip(b"\0").decode("utf-8", "replace") for row in arr]


def _key_of(source_info: str) -> str:
    m = _SOURCE_INFO.search(source_info)
    member = m.group("member") if m else source_info
    base = member.rsplit("/", 1)[-1]
    return member[: len(member) - len(base)] + base.split(".", 1)[0]


# ---------------------------------------------------------------------------------------------------------------
# The loader


class DaliLoader(LoaderPosition):
    """The DALI backend of the :class:`~pipeline.data.loader.Loader` protocol."""

    def __init__(self, cfg: Config, env: DistEnv, device: torch.device, recipe: Recipe, *, shards: Any = None,
                 shuffle: bool = True, source: DataSource | None = None) -> None:
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as exc:
            raise ImportError("loader.backend=dali needs NVIDIA DALI: pip install -e '.[dali]' "
                              "(or loader.backend=torch)") from exc
        self.env, self.device = env, device
        self.shards = source or resolve_for_job(shards or cfg.data.train_shards, cfg.data)
        where = self.shards.describe()
        if self.shards.remote or self.shards.weighted:
            raise ShardError(f"loader.backend=dali reads local, unweighted sources only (for now): {where}; use "
                             f"loader.backend=torch (loader.backend=auto picks it for such sources)")
        self.recipe = recipe
        pairs = ensure_indexes(self.shards, cfg.data.cache_dir or None)
        fields = self.shards.fields
        if not self.shards.fields_known:  # e.g. counts from _stats.json: the index files name the fields
            with open(pairs[0][1]) as f:
                fields = sorted({p for line in itertools.islice(f, 1, 201) for p in line.split()[0::4]})
        if cfg.data.image_key == "auto":
            self.image_exts = list(self.shards.image_exts) or [e for e in IMAGE_EXTS if e in fields]
        else:
            self.image_exts = [k.strip() for k in cfg.data.image_key.split(";") if k.strip()]
        if not set(self.image_exts) & set(fields or self.image_exts):
            raise ShardError(f"shards in {where} have no {cfg.data.image_key!r} field "
                             f"(fields: {fields}); set data.image_key")
        if cfg.data.label_key != "cls" or cfg.data.text_key != "txt":
            raise NotImplementedError("the DALI backend reads labels from .cls and captions from .txt")
        self.with_label = "cls" in fields
        self.with_text = self.recipe.with_text and "txt" in fields
        if self.recipe.with_text and not self.with_text:
            raise ShardError(f"recipe {self.recipe.name!r} needs captions but {where} has no txt field")
        wanted = [set(self.image_exts)] + [{"cls"}] * self.with_label + [{"txt"}] * self.with_text
        self.index = [read_index(tar, index, wanted) for tar, index in pairs]
        self.num_samples = sum(s.usable for s in self.index)
        self.skipped = sum(s.samples - s.usable for s in self.index)
        """Samples the reader skips because they lack the image (or label/caption) field."""
        self.batch_size, self.seed, self.shuffle = cfg.loader.batch_size, cfg.run.seed, shuffle
        self.shuffle_buffer = cfg.loader.shuffle_buffer
        self.num_threads = max(1, cfg.loader.num_workers)
        self.prefetch = max(1, cfg.loader.prefetch_factor)
        self.steps_per_epoch = steps_per_epoch(self.num_samples, self.batch_size, env.world_size)
        if self.steps_per_epoch == 0:
            raise ShardError(f"{where} has {self.num_samples} readable samples: fewer than one global "
                             f"batch ({self.batch_size} x {env.world_size} ranks)")
        if self.skipped and env.is_main:
            print(f"dali loader: skipping {self.skipped} samples of {where} without a "
                  f"{'/'.join(self.image_exts)} field")
        self.epoch, self.batch = 0, 0
        self._it = None  # the running epoch's DALIGenericIterator
        self._restore: bytes | None = None  # DALI checkpoint of (epoch, batch) to resume from

    def load_state_dict(self, state: dict[str, int]) -> None:
        super().load_state_dict(state)
        self._restore = None

    def rank_state_dict(self) -> dict:
        """This rank's DALI checkpoint at the current position (none before the first batch of an epoch)."""
        state: dict = {"epoch": self.epoch, "batch": self.batch}
        if self._it is not None and 0 < self.batch < self.steps_per_epoch:
            state["dali"] = self._it.checkpoints()[0]
        return state

    def load_rank_state_dict(self, state: dict) -> None:
        """Use the saved DALI checkpoint if it was taken at the position ``load_state_dict`` set."""
        if state.get("dali") and (state.get("epoch"), state.get("batch")) == (self.epoch, self.batch):
            self._restore = state["dali"]

    def __iter__(self) -> Iterator[Batch]:
        while True:
            for batch in self._epoch_batches(self.epoch, self.batch, self._restore):
                self.batch += 1
                yield batch
            self.epoch, self.batch, self._restore = self.epoch + 1, 0, None

    def _seeds(self, epoch: int) -> tuple[int, int]:
        base = (self.seed * 1_000_003 + epoch) * 1_009 + self.env.rank
        return base % (2**31 - 1), (base * 7_919 + 17) % (2**31 - 1)

    def build_pipeline(self, epoch: int, checkpoint: bytes | None = None):
        order = shard_order(len(self.index), self.seed, epoch, self.shuffle)
        reader_seed, seed = self._seeds(epoch)
        gpu = self.device.type == "cuda"
        return dali_pipeline(
            self.recipe, paths=[str(self.index[i].tar) for i in order],
            index_paths=[str(self.index[i].index) for i in order], exts=self.image_exts,
            batch_size=self.batch_size, num_threads=self.num_threads,
            device_id=(self.device.index if self.device.index is not None else self.env.local_rank) if gpu else None,
            shard_id=self.env.rank, num_shards=self.env.world_size, shuffle=self.shuffle,
            shuffle_buffer=self.shuffle_buffer, reader_seed=reader_seed, seed=seed, prefetch=self.prefetch,
            with_label=self.with_label, with_text=self.with_text, checkpoint=checkpoint,
        )

    def _epoch_batches(self, epoch: int, start: int, checkpoint: bytes | None = None) -> Iterator[Batch]:
        """Batches ``start..steps_per_epoch`` of ``epoch``: from the DALI ``checkpoint`` taken at ``start`` if
        there is one, else by replaying and discarding the first ``start`` batches."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        if start >= self.steps_per_epoch:
            return
        n_views = len(self.recipe.views)
        names = [f"view{i}" for i in range(n_views)] + ["source_info"]
        names += ["label"] * self.with_label + ["text"] * self.with_text

        def start_pipeline(ckpt: bytes | None):
            # No reader_name/size: the iterator would stop at the end of this rank's range, which may hold a few
            # more batches than steps_per_epoch; we take exactly steps_per_epoch and drop the pipeline.
            pipe = self.build_pipeline(epoch, ckpt)
            return pipe, DALIGenericIterator([pipe], names, size=-1, auto_reset=False, prepare_first_batch=False)

        first = skip = 0
        if checkpoint is not None:
            try:
                pipe, it = start_pipeline(checkpoint)
                first = start
            except RuntimeError as exc:
                print(f"rank {self.env.rank}: cannot restore DALI's checkpoint ({str(exc).strip().splitlines()[-1]});"
                      f" replaying {start} batches of epoch {epoch} instead")
                checkpoint = None
        if checkpoint is None:
            pipe, it = start_pipeline(None)
            skip = start
        if start and self.env.is_main:
            how = "from DALI's checkpoint" if checkpoint is not None else f"by replaying {start} batches"
            print(f"dali loader: epoch {epoch} resumes at batch {start} {how}")
        self._it = it
        try:
            for b in range(first, self.steps_per_epoch):
                try:
                    out = next(it)[0]
                except StopIteration:
                    raise ShardError(f"rank {self.env.rank}: DALI ran out of samples at batch {b} of epoch {epoch}")
                except RuntimeError as exc:
                    if "decoders" not in str(exc):
                        raise
                    raise self._decode_error(exc, epoch, b) from exc
                if b < skip:
                    continue  # fast-forward of a resumed epoch: same seeds, so the kept batches are exact
                yield self._to_batch(out, n_views)
        finally:
            self._it = None
            del it, pipe

    def _to_batch(self, out: dict[str, torch.Tensor], n_views: int) -> Batch:
        views = [out[f"view{i}"].to(self.device, non_blocking=True) for i in range(n_views)]
        keys = [_key_of(s) for s in _strings(out["source_info"])]
        b = len(keys)
        if self.with_label:
            labels = torch.tensor([int(s) if s.strip() else -1 for s in _strings(out["label"])], dtype=torch.long)
        else:
            labels = torch.full((b,), -1, dtype=torch.long)
        texts = _strings(out["text"]) if self.with_text else None
        return Batch(views, labels.to(self.device, non_blocking=True), texts, keys)

    def _decode_error(self, exc: RuntimeError, epoch: int, batch: int) -> ShardError:
        """Name the shard and key of an image DALI could not decode: from DALI's message when it gives the
        sample, else by checking the image headers of the shards (only on this error path)."""
        msg = str(exc)
        bad = [f"{m.group('shard')}:{_key_of(m.group(0))}" for m in _SOURCE_INFO.finditer(msg)]
        if not bad:
            bad = find_undecodable(self.index, self.image_exts)
        where = ", ".join(dict.fromkeys(bad)) or "(not found by a header check: see DALI's message below)"
        first = msg.strip().splitlines()
        detail = next((ln for ln in reversed(first) if ln.strip() and "no longer valid" not in ln), "")
        return ShardError(
            f"rank {self.env.rank}, epoch {epoch}, batch {batch}: DALI could not decode the image of {where}. "
            f"DALI cannot drop one sample from a batch, so bad images must leave the shards: rewrite them with "
            f"`pipeline shards write` (it decode-checks every image) or use loader.backend=torch to locate more. "
            f"DALI said: {detail}"
        )


def find_undecodable(index: list[ShardIndex], exts: list[str], limit: int = 10) -> list[str]:
    """``shard:key`` of images whose header PIL cannot identify (garbage, empty or mislabelled files)."""
    from PIL import Image, UnidentifiedImageError

    bad: list[str] = []
    for shard in index:
        with open(shard.index) as f, open(shard.tar, "rb") as tar:
            f.readline()
            for line in f:
                parts = line.split()
                for i in range(0, len(parts), 4):
                    ext, offset, size, name = parts[i : i + 4]
                    if ext not in exts:
                        continue
                    tar.seek(int(offset))
                    data = tar.read(int(size))
                    try:
                        import io

                        Image.open(io.BytesIO(data))
                    except (UnidentifiedImageError, OSError, ValueError):
                        bad.append(f"{shard.tar}:{_key_of(name)}")
                        if len(bad) >= limit:
                            return bad
    return bad


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
