"""The DALI backend: WebDataset shards -> ``fn.readers.webdataset`` -> decode (``mixed`` on a GPU, ``cpu``
without one) -> the recipe's views rendered as DALI ops -> ``DALIGenericIterator`` -> :class:`Batch`.

The epoch plan is the torch backend's (:mod:`pipeline.data.plan`): shard order seeded by ``(run.seed, epoch)``,
one contiguous range of the stream per rank, ``steps_per_epoch`` batches on every rank. The reader is given
exactly this rank's range, as derived index files (:mod:`pipeline.data.dali_index`), in an order the loader
knows: each shard's piece of the range shuffled in blocks of ``loader.shuffle_buffer`` samples (seeded by seed,
epoch and rank), the reader's own shuffle off. Augmentation draws come from DALI's per-operator generators,
seeded by (seed, epoch, rank, first batch of the pipeline).

Bad samples are counted, not fatal. A sample whose members fail the check against the tar (past the end of the
file, no matching tar header: a damaged or rewritten shard), or that has no image, is replaced before the reader
sees it. An image that does not decode stops DALI's pipeline (DALI decodes a batch at a time and cannot ask the
reader for another sample, NVIDIA/DALI#3913): the loader decodes that batch's images one by one to find the bad
ones, replaces them by another sample of the same batch, and rebuilds the pipeline at that batch; they stay
replaced for the rest of the run. ``bad_samples`` counts replaced samples in the batches this rank yielded.

Resume is exact: each rank saves DALI's own checkpoint of its pipeline (reader position and generator states,
from ``DALIGenericIterator.checkpoints()``), the first batch of that pipeline and the images it found undecodable;
a resume on the same number of ranks rebuilds the same pipeline and restores it. Without a usable DALI checkpoint
the pipeline is rebuilt and its first batches are decoded again and discarded (still exact).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Config
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
from pipeline.data.plan import plan_range, rank_range, shard_order, steps_per_epoch
from pipeline.data.recipes import Recipe, ViewSpec
from pipeline.data.shards import ShardError, open_shards, write_dali_index
from pipeline.distributed import DistEnv

_SOURCE_INFO = re.compile(r"(?P<shard>[^\s:'\"]+\.tar):(?P<offset>\d+):(?P<member>[^\s'\"]+)")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
UNDECODABLE = "the image does not decode"


# ---------------------------------------------------------------------------------------------------------------
# Index files next to local shards


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
    recipe: Recipe, *, paths: list[str], index_paths: list[str], fields: Fields, batch_size: int, num_threads: int,
    device_id: int | None, seed: int, prefetch: int, checkpoint: bytes | None = None,
):
    """Build (not start) the DALI pipeline reading ``paths`` through ``index_paths`` in order, restored from
    ``checkpoint`` (``Pipeline.checkpoint()`` of the same graph) if given. Outputs: one tensor per view,
    ``source_info`` bytes (``shard.tar:offset:member``, zero padded), then the label and caption member bytes when
    read."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None

    @pipeline_def(enable_conditionals=True, enable_checkpointing=True)
    def graph():
        # dont_use_mmap: a member past the end of a file (a shard truncated while the run reads it) then fails a
        # read with an error naming the file, where through a memory map it would crash the process
        fields_out = fn.readers.webdataset(
            paths=paths, index_paths=index_paths, ext=fields.reader_exts, missing_component_behavior="empty",
            random_shuffle=False, dont_use_mmap=True, name="reader",
        )
        outs = fields_out if isinstance(fields_out, (list, tuple)) else [fields_out]
        encoded = outs[0]
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
        views = [render_dali(v, images) for v in recipe.views]
        meta = [fn.pad(fn.get_property(encoded, key="source_info"), fill_value=0)]
        meta += [fn.pad(f, fill_value=0) for f in outs[1:]]
        return (*views, *meta)

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

    bad, i, pipe = [], 0, None
    while i < len(blobs):
        if pipe is None:
            pipe = graph()
            pipe.build()
        pipe.feed_input("encoded", [np.frombuffer(blobs[i], dtype=np.uint8)])
        try:
            pipe.run()
        except RuntimeError:
            bad.append(i)
            pipe = None
        i += 1
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
# The loader


def _field_ext(key: str) -> str:
    """The member a label or caption comes from: ``cls``/``txt``/... as is, ``json:FIELD`` from ``json``."""
    return "json" if key.startswith("json:") else key


def _json_field(raw: str, path: str):
    import json

    try:
        value = json.loads(raw) if raw.strip() else None
    except json.JSONDecodeError:
        return None
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


class DaliLoader(LoaderPosition):
    """The DALI backend of the :class:`~pipeline.data.loader.Loader` protocol."""

    def __init__(self, cfg: Config, env: DistEnv, device: torch.device, recipe: Recipe, *, shards: str | None = None,
                 shuffle: bool = True) -> None:
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as exc:
            raise ImportError("loader.backend=dali needs NVIDIA DALI: pip install -e '.[dali]' "
                              "(or loader.backend=torch)") from exc
        self.env, self.device, self.recipe = env, device, recipe
        source = open_shards(shards or cfg.data.train_shards, cfg.data.verify)
        self.root = source.root
        fields = source.manifest.get("fields", [])
        if cfg.data.image_key == "auto":
            image_exts = tuple(source.manifest.get("image_keys") or IMAGE_EXTS)
        else:
            image_exts = tuple(cfg.data.image_key.split(";"))
        if fields and not set(image_exts) & set(fields):
            raise ShardError(f"shards in {self.root} have no {cfg.data.image_key!r} field (fields: {fields}); "
                             f"set data.image_key")
        self.label_key, self.text_key = cfg.data.label_key, cfg.data.text_key
        label_ext, text_ext = _field_ext(self.label_key), _field_ext(self.text_key)
        self.with_label = not fields or label_ext in fields
        self.with_text = recipe.with_text
        if self.with_text and fields and text_ext not in fields:
            raise ShardError(f"recipe {recipe.name!r} needs captions but {self.root} has no {text_ext} field")
        self.fields = Fields(image_exts, label_ext if self.with_label else None, text_ext if self.with_text else None,
                             require_text=self.with_text)
        entries = source.manifest.get("shards", [])
        self.shards: list[ShardRef] = []
        for i, tar in enumerate(source.paths):
            name = entries[i].get("index") if i < len(entries) else None
            index = tar.parent / name if name else tar.with_suffix(".idx")
            ensure_index(tar, index, source.counts[i])
            self.shards.append(ShardRef(str(tar), str(index), source.counts[i], tar.stat().st_size))
        self._shard_of = {ref.url: i for i, ref in enumerate(self.shards)}
        self.num_samples = sum(ref.count for ref in self.shards)
        self.batch_size, self.seed, self.shuffle = cfg.loader.batch_size, cfg.run.seed, shuffle
        self.shuffle_buffer = cfg.loader.shuffle_buffer
        self.num_threads = max(1, cfg.loader.num_workers)
        self.prefetch = max(1, cfg.loader.prefetch_factor)
        self.steps_per_epoch = steps_per_epoch(self.num_samples, self.batch_size, env.world_size)
        if self.steps_per_epoch == 0:
            raise ShardError(f"{self.root} has {self.num_samples} samples: fewer than one global batch "
                             f"({self.batch_size} x {env.world_size} ranks)")
        self.entries = EntryCache(self.fields)
        self.bad_samples = 0
        """Bad samples (replaced by another sample of their batch) in the batches this rank yielded, whole run."""
        self.last_bad = ""
        """The last of them, as ``shard sample N (key): reason``."""
        self.epoch, self.batch = 0, 0
        self._found: dict[int, set[int]] = {}  # shard -> samples whose image DALI could not decode
        self._reported: set[int] = set()  # shards whose failed header checks were reported
        self._segment = 0  # first batch of the running pipeline (its generators are seeded by it)
        self._it = None  # the running pipeline's DALIGenericIterator
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
                       "bad_samples": self.bad_samples, "last_bad": self.last_bad,
                       "undecodable": {self.shards[s].url: sorted(ids) for s, ids in sorted(self._found.items())}}
        if self._it is not None and 0 < self.batch < self.steps_per_epoch:
            state["dali"] = self._it.checkpoints()[0]
        return state

    def load_rank_state_dict(self, state: dict) -> None:
        """Take the saved state if it was taken at the position ``load_state_dict`` set."""
        if (state.get("epoch"), state.get("batch")) != (self.epoch, self.batch):
            return
        self._segment = min(int(state.get("segment", 0)), self.batch)
        self._restore = state.get("dali") or None
        self.bad_samples, self.last_bad = int(state.get("bad_samples", 0)), str(state.get("last_bad", ""))
        self._found = {self._shard_of[url]: set(ids) for url, ids in state.get("undecodable", {}).items()
                       if url in self._shard_of}

    # -- the plan ----------------------------------------------------------------------------------------------

    def rank_spans(self, epoch: int) -> list[tuple[int, int, int]]:
        """This rank's spans of ``epoch`` (shard, start, stop): the torch backend's plan."""
        order = shard_order(len(self.shards), self.seed, epoch, self.shuffle)
        start, stop = rank_range(self.steps_per_epoch, self.batch_size, self.env.rank)
        spans = plan_range(self, order, start, stop)
        return [(self._shard_of[span.path], span.start, span.stop) for span in spans]

    @property
    def paths(self) -> list[str]:
        return [ref.url for ref in self.shards]

    @property
    def counts(self) -> list[int]:
        return [ref.count for ref in self.shards]

    def rank_order(self, epoch: int) -> RankOrder:
        """This rank's positions of ``epoch`` with every bad sample known so far replaced."""
        spans = self.rank_spans(epoch)
        rng = None
        if self.shuffle and self.shuffle_buffer > 1:
            rng = np.random.default_rng([self.seed, epoch, self.env.rank])
        shard, sample = block_shuffled(spans, self.shuffle_buffer, rng)
        bad: dict[int, dict[int, str]] = {}
        for s in np.unique(shard).tolist():
            known = self.entries.bad(self.shards[s])
            if known and s not in self._reported:
                self._reported.add(s)
                first = min(known)
                print(f"dali loader: rank {self.env.rank}: {len(known)} of {self.shards[s].count} samples of "
                      f"{self.shards[s].url} cannot be read and count as bad samples (e.g. sample {first}: "
                      f"{known[first]})")
            found = {i: UNDECODABLE for i in self._found.get(s, ())}
            if known or found:
                bad[s] = {**known, **found}
        return replace_bad(shard, sample, bad, self.batch_size, self.paths)

    def _seed(self, epoch: int, segment: int) -> int:
        return int(np.random.SeedSequence([self.seed, epoch, self.env.rank, segment]).generate_state(1)[0]) % (2**31 - 1)

    def build_pipeline(self, epoch: int, segment: int, order: RankOrder, checkpoint: bytes | None = None):
        """The DALI pipeline reading ``order`` from batch ``segment`` to the end of the epoch."""
        run_list = runs(order, segment * self.batch_size)
        folder = self._folder / f"epoch{epoch}"
        for old in self._folder.iterdir():
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
        index_paths = write_run_indexes(run_list, self.shards, self.entries, folder)
        gpu = self.device.type == "cuda"
        return dali_pipeline(
            self.recipe, paths=[self.shards[s].url for s, _ in run_list], index_paths=index_paths, fields=self.fields,
            batch_size=self.batch_size, num_threads=self.num_threads,
            device_id=(self.device.index if self.device.index is not None else self.env.local_rank) if gpu else None,
            seed=self._seed(epoch, segment), prefetch=self.prefetch, checkpoint=checkpoint,
        )

    # -- iteration ---------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield from self._epoch()
            self.epoch, self.batch, self._segment, self._restore = self.epoch + 1, 0, 0, None

    def _output_names(self) -> list[str]:
        names = [f"view{i}" for i in range(len(self.recipe.views))] + ["source_info"]
        return names + ["label"] * (self.fields.label_ext is not None) + ["text"] * (self.fields.text_ext is not None)

    def _start(self, epoch: int, segment: int, order: RankOrder, checkpoint: bytes | None):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        def start(ckpt: bytes | None):
            # No reader_name/size: exactly the batches up to steps_per_epoch are taken, then the pipeline is dropped
            pipe = self.build_pipeline(epoch, segment, order, ckpt)
            it = DALIGenericIterator([pipe], self._output_names(), size=-1, auto_reset=False,
                                     prepare_first_batch=False)
            return pipe, it

        if checkpoint is not None:
            try:
                return (*start(checkpoint), True)
            except RuntimeError as exc:
                print(f"rank {self.env.rank}: cannot restore DALI's checkpoint ({str(exc).strip().splitlines()[-1]});"
                      f" replaying {self.batch - segment} batches of epoch {epoch} instead")
        return (*start(None), False)

    def _epoch(self) -> Iterator[Batch]:
        """The rest of the current epoch, from ``self.batch``; a pipeline that fails on an undecodable image is
        rebuilt at the failing batch with the bad images replaced."""
        epoch, steps, b_size = self.epoch, self.steps_per_epoch, self.batch_size
        if self.batch >= steps:
            return
        order = self.rank_order(epoch)
        segment, checkpoint = min(self._segment, self.batch), self._restore
        self._restore = None
        if self.batch and self.env.is_main:
            how = "from DALI's checkpoint" if checkpoint is not None else f"by replaying {self.batch - segment} batches"
            print(f"dali loader: epoch {epoch} resumes at batch {self.batch} {how}")
        while self.batch < steps:
            self._segment = segment
            pipe, it, restored = self._start(epoch, segment, order, checkpoint)
            checkpoint, failed = None, None
            b = self.batch if restored else segment
            self._it = it
            try:
                while self.batch < steps:
                    try:
                        out = next(it)[0]
                    except StopIteration:
                        raise ShardError(f"rank {self.env.rank}: DALI ran out of samples at batch {b} of epoch {epoch}")
                    except RuntimeError as exc:
                        failed = exc
                        break
                    if b < self.batch:  # replaying a resumed epoch: same seeds, so the kept batches are exact
                        b += 1
                        continue
                    batch = self._to_batch(out)
                    batch.num_bad = int(order.replaced[b * b_size : (b + 1) * b_size].sum())
                    if batch.num_bad:
                        batch.bad_example = self._describe_bad(order, b)
                        self.bad_samples += batch.num_bad
                        self.last_bad = batch.bad_example
                    b += 1
                    self.batch += 1
                    yield batch
            finally:
                self._it = None
                del it, pipe
            if failed is not None:
                order = self._replace_undecodable(failed, epoch, b, order)
                segment = b

    def _describe_bad(self, order: RankOrder, b: int) -> str:
        lo = b * self.batch_size
        p = next(p for p in range(lo, lo + self.batch_size) if order.replaced[p])
        s, i, why = order.origin[p]
        return f"{self.shards[s].url} sample {i}: {why}"

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
        lo = b * self.batch_size
        sources = list(dict.fromkeys(zip(order.shard[lo : lo + self.batch_size].tolist(),
                                         order.sample[lo : lo + self.batch_size].tolist())))
        blobs = [self._image_bytes(s, i) for s, i in sources]
        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else self.env.local_rank) if gpu else None
        bad = [sources[k] for k in undecodable(blobs, device_id)]
        if not bad:
            raise ShardError(f"{where}: DALI failed on this batch, yet each of its images decodes on its own: "
                             f"{detail}") from exc
        for s, i in bad:
            self._found.setdefault(s, set()).add(i)
            name = self.entries.get(self.shards[s]).image_member(i)[2]
            print(f"dali loader: {where}: {self.shards[s].url} sample {i} ({name}): {UNDECODABLE}; it counts as a "
                  f"bad sample and is replaced for the rest of the run")
        return self.rank_order(epoch)

    def _image_bytes(self, s: int, i: int) -> bytes:
        ref = self.shards[s]
        off, size, _ = self.entries.get(ref).image_member(i)
        with open(ref.url, "rb") as f:
            f.seek(off)
            return f.read(size)

    def _to_batch(self, out: dict[str, torch.Tensor]) -> Batch:
        views = [out[f"view{i}"].to(self.device, non_blocking=True) for i in range(len(self.recipe.views))]
        keys = [_key_of(s) for s in _strings(out["source_info"])]
        labels = torch.full((len(keys),), -1, dtype=torch.long)
        if "label" in out:
            raw = _strings(out["label"])
            if self.label_key.startswith("json:"):
                vals = [_json_field(r, self.label_key[5:]) for r in raw]
            else:
                vals = [r.strip() for r in raw]
            labels = torch.tensor([int(v) if _is_int(v) else -1 for v in vals], dtype=torch.long)
        texts = None
        if "text" in out:
            raw = _strings(out["text"])
            if self.text_key.startswith("json:"):
                texts = [str(_json_field(r, self.text_key[5:]) or "") for r in raw]
            else:
                texts = raw
        return Batch(views, labels.to(self.device, non_blocking=True), texts, keys)


def _is_int(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    try:
        int(str(v))
        return True
    except ValueError:
        return False


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
