"""Data sources: where a data set's shards are and how many samples each holds, resolved once and cached.

A source is a small value (mosaic streaming's ``Stream``, open_clip's ``--train-data``). ``data.train_shards``,
``data.eval_train_shards`` and ``data.eval_test_shards`` each take one of:

- a folder written by ``pipeline shards write`` (its ``manifest.json`` lists shards and counts), or the path of
  such a ``manifest.json``;
- any folder of ``.tar`` shards (img2dataset, ``webdataset.ShardWriter``, ...), or a single tar;
- a brace pattern ``/data/{00000..00099}.tar`` (expanded with ``braceexpand``, as webdataset does) or a glob
  ``/data/*.tar``; shards of a pattern that do not exist are skipped with a warning (img2dataset leaves holes);
- ``file://PATH``, ``s3://bucket/prefix/`` (a folder: its ``manifest.json`` or its ``.tar`` objects),
  ``s3://bucket/prefix/{00000..00099}.tar``, ``http(s)://host/path/{...}.tar`` (or a folder URL holding a
  ``manifest.json``) and ``pipe:COMMAND`` (braces expand into one command per shard); see
  :mod:`pipeline.data.storage` for credentials and endpoints;
- several of these: open_clip's ``'a/{0..9}.tar::b/{0..3}.tar'`` or a YAML list;
- a weighted mixture: a YAML list of ``{shards: SOURCE, weight: W}`` (plain strings in the list have weight 1).

**Weights** are per-epoch repeat factors (open_clip's upsampling factors, mosaic's ``repeat``): a stream of N
samples with weight ``w = k + f`` (k integer, 0 <= f < 1) contributes ``k * N + floor(f * N)`` samples to every
epoch: each of its shards k times, plus whole shards (and a prefix of one) drawn without replacement for the
fraction, with a seed of ``(run.seed, epoch, stream)``, so weight 0.5 reads a different half of the stream each
epoch and weight 2 reads every sample twice. All pieces of all streams are then shuffled together by
:func:`pipeline.data.plan.epoch_spans`. With every weight 1 a list is a plain concatenation.

**Counts** come from what is there, in this order: the manifest; then, per shard, a DALI index in the cache, an
img2dataset ``NNNNN_stats.json`` (``successes``) beside the shard, a DALI ``.idx`` beside the shard; and for
shards with none of these, a scan of the tar headers: done by the run itself for up to ``data.auto_index``
local shards, else by ``pipeline shards index SOURCE`` (the run stops and prints that exact command: scanning
tens of thousands of remote shards at every job start would hold every GPU idle for a full read of the corpus).

**Cache** (``data.cache_dir``, default ``$XDG_CACHE_HOME/ssl-pipeline``, i.e. ``~/.cache/ssl-pipeline``):
``sources/<hash of the spec>.json`` records a resolved stream (shard URLs, counts, sizes, index locations,
fields); ``index/<scheme>/<bucket or host>/<path>.idx`` holds DALI index files of shards that are remote or in
read-only folders. A cached remote stream is used as it is: a start touches no remote object (no listing, no
counting) until the entry is refreshed with ``pipeline shards index SOURCE --refresh``. A cached local stream is
re-listed (cheap) and re-resolved when its shard list or, with ``data.verify`` != none, a shard's size changed.
Only rank 0 resolves; it hands the result to the other ranks (:func:`resolve_for_job`), so a cold start costs
one rank's requests, not every rank's.

The API other modules build on (the DALI backend, the epoch plan, ``pipeline shards index``):

- :class:`Shard`: ``url`` (a local absolute path or a URL: ``s3://``, ``http(s)://``, ``pipe:``, what a
  reader opens), ``num_samples``, ``index`` (DALI index file when one exists: a local path beside the shard or in
  the cache, or a URL beside a remote shard; ``None`` otherwise) and ``bytes`` (size when known).
- :class:`Stream`: one source as written (``spec``, ``weight``) resolved into ``shards``, plus what is known of
  its samples: ``fields`` (extensions seen, e.g. ``["cls", "jpg", "json", "txt"]``; empty when unknown),
  ``image_exts`` (image extensions seen), ``classes`` (manifest class names) and ``origin`` (where counts came
  from).
- :class:`DataSource`: the resolved value of one config key: ``streams``; flattened ``shards``, ``paths``,
  ``counts`` (the epoch plan's ``ShardCounts``), ``groups``/``weights`` (mixtures), ``num_samples``,
  ``epoch_samples``, ``fields``, ``image_exts``, ``classes``, ``remote``, ``weighted``.
- :func:`parse_sources` (no I/O: the specs of a config value), :func:`resolve_source` (one process),
  :func:`resolve_for_job` (rank 0 resolves, all ranks get it), :func:`index_source` (the ``shards index``
  command), :func:`index_shard`, :func:`cache_index_path`, :func:`cache_root`, :func:`default_cache_dir`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.data import storage
from pipeline.data.shards import MANIFEST, ShardError, format_dali_index, open_shards, tar_bundles
from pipeline.data.storage import RetryPolicy, StorageError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
"""Sample fields that hold an image, in the order ``data.image_key=auto`` tries them."""
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class Shard:
    """One tar: ``url`` (local absolute path or URL), ``num_samples``, its DALI ``index`` (local path beside
    the shard or in the cache, or a URL beside a remote shard; ``None`` when there is none yet), ``bytes``."""

    url: str
    num_samples: int
    index: str | None = None
    bytes: int | None = None


@dataclass(frozen=True)
class SourceSpec:
    """One source as written in the config, before any I/O."""

    spec: str
    weight: float = 1.0

    @property
    def scheme(self) -> str:
        return storage.scheme_of(self.spec)

    @property
    def remote(self) -> bool:
        return storage.is_remote(self.spec)


@dataclass
class Stream:
    spec: str
    weight: float
    shards: list[Shard]
    fields: list[str] = field(default_factory=list)
    image_exts: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    origin: str = ""
    """Where the counts came from: manifest, cache, stats, idx, scan (several joined by +)."""

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def epoch_samples(self) -> int:
        k = math.floor(self.weight)
        return k * self.num_samples + math.floor((self.weight - k) * self.num_samples)


@dataclass
class DataSource:
    """A resolved config value: one or more streams. Satisfies :class:`pipeline.data.plan.ShardCounts`."""

    streams: list[Stream]

    @property
    def shards(self) -> list[Shard]:
        return [s for st in self.streams for s in st.shards]

    @property
    def paths(self) -> list[str]:
        return [s.url for s in self.shards]

    @property
    def counts(self) -> list[int]:
        return [s.num_samples for s in self.shards]

    @property
    def groups(self) -> list[list[int]]:
        """Indices into ``shards`` of each stream's shards."""
        out, i = [], 0
        for st in self.streams:
            out.append(list(range(i, i + len(st.shards))))
            i += len(st.shards)
        return out

    @property
    def weights(self) -> list[float]:
        return [st.weight for st in self.streams]

    @property
    def weighted(self) -> bool:
        return any(st.weight != 1 for st in self.streams)

    @property
    def num_samples(self) -> int:
        """Samples in all shards (each once)."""
        return sum(st.num_samples for st in self.streams)

    @property
    def epoch_samples(self) -> int:
        """Samples in one epoch of the mixture (``num_samples`` unless weighted)."""
        return sum(st.epoch_samples for st in self.streams)

    @property
    def remote(self) -> bool:
        return any(storage.is_remote(s.url) for s in self.shards)

    @property
    def fields(self) -> list[str]:
        """Fields seen in any stream (empty if no stream knows its fields)."""
        return sorted({f for st in self.streams for f in st.fields})

    @property
    def fields_known(self) -> bool:
        return all(st.fields for st in self.streams)

    @property
    def image_exts(self) -> list[str]:
        seen = {e for st in self.streams for e in st.image_exts}
        return [e for e in IMAGE_EXTS if e in seen] + sorted(seen - set(IMAGE_EXTS))

    @property
    def classes(self) -> list[str]:
        return next((st.classes for st in self.streams if st.classes), [])

    def describe(self) -> str:
        parts = []
        for st in self.streams:
            w = f" x{st.weight:g}" if self.weighted else ""
            parts.append(f"{st.spec} ({len(st.shards)} shards, {st.num_samples} samples{w}, counts from {st.origin})")
        return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Parsing (no I/O)


def _split_colons(spec: str) -> list[str]:
    """open_clip's ``a::b`` list separator, leaving IPv6 literals (``http://[::1]/``) alone."""
    return [p for p in re.split(r"::(?![^\[]*\])", spec) if p]


def parse_sources(value: Any, where: str = "data.train_shards") -> list[SourceSpec]:
    """The sources of a config value (see the module docstring for the forms). Raises ShardError on bad forms."""
    if value is None or value == "" or value == []:
        raise ShardError(f"no data source given: set {where} to a shard folder, a brace pattern, a URL or a list")
    items = value if isinstance(value, (list, tuple)) else [value]
    out: list[SourceSpec] = []
    for i, item in enumerate(items):
        here = f"{where}[{i}]" if isinstance(value, (list, tuple)) else where
        if isinstance(item, dict):
            unknown = set(item) - {"shards", "weight"}
            if unknown or "shards" not in item:
                raise ShardError(f"{here}: a weighted source is {{shards: SOURCE, weight: W}}, got {item!r}")
            try:
                weight = float(item.get("weight", 1.0))
            except (TypeError, ValueError):
                raise ShardError(f"{here}.weight must be a number, got {item.get('weight')!r}") from None
            if not weight > 0 or math.isinf(weight):
                raise ShardError(f"{here}.weight must be > 0, got {weight}")
            specs = item["shards"]
        elif isinstance(item, (str, os.PathLike)):
            weight, specs = 1.0, item
        else:
            raise ShardError(f"{here}: expected a source string or {{shards: ..., weight: ...}}, got {item!r}")
        if isinstance(specs, os.PathLike):
            specs = os.fspath(specs)
        if not isinstance(specs, str) or not specs.strip():
            raise ShardError(f"{here}: expected a source string, got {specs!r}")
        out.extend(SourceSpec(s.strip(), weight) for s in _split_colons(specs.strip()))
    if not out:
        raise ShardError(f"no data source given in {where}")
    return out


def is_remote_value(value: Any) -> bool:
    """Whether a config value names any remote source (no I/O; ``False`` for an empty value)."""
    try:
        return any(s.remote for s in parse_sources(value))
    except ShardError:
        return False


def is_weighted_value(value: Any) -> bool:
    try:
        return any(s.weight != 1 for s in parse_sources(value))
    except ShardError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# Cache locations


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ssl-pipeline`` (``~/.cache/ssl-pipeline`` when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ssl-pipeline"


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir``, or :func:`default_cache_dir` when it is empty."""
    return Path(cache_dir) if cache_dir else default_cache_dir()


def _safe_parts(path: str) -> list[str]:
    parts = [re.sub(r"[^A-Za-z0-9._=+-]", "_", p) for p in path.split("/") if p and p not in (".", "..")]
    return parts or ["_"]


def _strip_suffix(url: str) -> str:
    for suffix in SHARD_SUFFIXES:
        if url.endswith(suffix):
            return url[: -len(suffix)]
    return url


def cache_index_path(url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the DALI index of shard ``url`` goes in the cache: ``index/<scheme>/<bucket|host>/<path>.idx`` (a
    hash for ``pipe:`` commands)."""
    root = cache_root(cache_dir) / "index"
    scheme = storage.scheme_of(url)
    if scheme == "pipe":
        return root / "pipe" / (hashlib.sha256(url.encode()).hexdigest()[:24] + ".idx")
    if scheme in storage.LOCAL_SCHEMES:
        rel = os.path.abspath(storage.local_path(url))
        return root.joinpath("file", *_safe_parts(_strip_suffix(rel))).with_suffix(".idx")
    p = urlparse(url)
    parts = _safe_parts(_strip_suffix(p.path))
    parts[-1] += ".idx"
    return root.joinpath(scheme, *_safe_parts(p.netloc), *parts)


def _source_cache_path(spec: str, cache_dir: str | os.PathLike | None) -> Path:
    key = hashlib.sha256(f"v{CACHE_VERSION}\0{spec}".encode()).hexdigest()[:24]
    return cache_root(cache_dir) / "sources" / f"{key}.json"


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_bytes_atomic(str(path), json.dumps(data, indent=1).encode())


# ---------------------------------------------------------------------------------------------------------------
# Expansion: a spec -> a manifest, or a list of shard URLs


@dataclass
class _Expanded:
    entries: list[storage.Entry] = field(default_factory=list)
    manifest: dict | None = None
    manifest_url: str = ""
    listed: list[storage.Entry] | None = None
    """Everything in the listed folder(s), when a listing was made (tells which sidecar files exist)."""
    missing: list[str] = field(default_factory=list)
    folder: str | None = None
    """The local folder the spec names, when it names one (where ``shards index`` may write a manifest)."""


def _is_shard(url: str) -> bool:
    return url.endswith(SHARD_SUFFIXES)


def _shard_base(url: str) -> str:
    """``url`` without its shard suffix (and query string): where its sidecar files are named from."""
    if storage.scheme_of(url) in ("http", "https") and "?" in url:
        url = url.split("?", 1)[0]
    return _strip_suffix(url)


def _has_glob(spec: str) -> bool:
    return bool(re.search(r"[*?]|\[(?!:)", spec))


def _read_manifest(url: str, policy: RetryPolicy) -> dict | None:
    data = storage.read_bytes(url, policy)
    if data is None:
        return None
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise ShardError(f"{url} is not valid JSON: {exc}") from exc


def _expand(spec: str, policy: RetryPolicy) -> _Expanded:
    import braceexpand

    scheme = storage.scheme_of(spec)
    local = scheme in storage.LOCAL_SCHEMES
    if scheme == "pipe" or "{" in spec:
        urls = list(braceexpand.braceexpand(spec))
        if local:
            urls = [os.path.abspath(storage.local_path(u)) for u in urls]
            there = {u for u in urls if os.path.isfile(u)}
            return _Expanded([storage.Entry(u, None) for u in urls if u in there],
                             missing=[u for u in urls if u not in there])
        return _Expanded([storage.Entry(u, None) for u in urls])
    if scheme in ("http", "https") and _is_shard(urlparse(spec).path):
        return _Expanded([storage.Entry(spec, None)])  # one shard (maybe a presigned URL: '?' is no glob here)
    if _has_glob(spec):
        entries = [e for e in storage.glob(spec, policy) if _is_shard(e.url)]
        if local:
            entries = [storage.Entry(os.path.abspath(e.url), e.size) for e in entries]
        return _Expanded(entries)
    if local:
        path = os.path.abspath(storage.local_path(spec))
        if os.path.isdir(path):
            mpath = os.path.join(path, MANIFEST)
            if os.path.isfile(mpath):
                return _Expanded(manifest={}, manifest_url=mpath, folder=path)
            listed = storage.list_folder(path, policy)
            entries = [e for e in listed if _is_shard(e.url)]
            if not entries:
                raise ShardError(f"{path} has no {MANIFEST} and no .tar shards: point data.train_shards at a folder "
                                 f"of WebDataset shards, or write shards with `pipeline shards write ... --output "
                                 f"{path}`")
            return _Expanded(entries, listed=listed, folder=path)
        if os.path.isfile(path):
            if path.endswith(".json"):
                return _Expanded(manifest={}, manifest_url=path)
            return _Expanded([storage.Entry(path, None)])
        raise ShardError(f"shard folder not found: {path}" if not _is_shard(path) else f"shard not found: {path}")
    if _is_shard(spec):
        return _Expanded([storage.Entry(spec, None)])
    if spec.endswith(".json"):
        manifest = _read_manifest(spec, policy)
        if manifest is None:
            raise ShardError(f"manifest not found: {spec}")
        return _Expanded(manifest=manifest, manifest_url=spec)
    manifest_url = storage.join(spec, MANIFEST)
    if scheme in ("http", "https"):
        manifest = _read_manifest(manifest_url, policy)
        if manifest is None:
            raise ShardError(f"{spec}: no {MANIFEST} there, and HTTP servers have no folder listing; give the "
                             f"shards as a brace pattern, e.g. {spec.rstrip('/')}/{{00000..00099}}.tar")
        return _Expanded(manifest=manifest, manifest_url=manifest_url)
    listed = storage.list_folder(spec, policy)
    if any(e.url == manifest_url for e in listed):
        return _Expanded(manifest=_read_manifest(manifest_url, policy), manifest_url=manifest_url)
    entries = [e for e in listed if _is_shard(e.url)]
    if not entries:
        raise ShardError(f"no .tar shards (and no {MANIFEST}) under {spec}")
    return _Expanded(entries, listed=listed)


def _stream_from_manifest(spec: str, weight: float, exp: _Expanded, verify: str, policy: RetryPolicy) -> Stream:
    if storage.scheme_of(exp.manifest_url) in storage.LOCAL_SCHEMES:
        ss = open_shards(exp.manifest_url, verify)  # validates sizes (and hashes) as it always has
        entries = ss.manifest.get("shards", [])
        shards = []
        for i, (p, n) in enumerate(zip(ss.paths, ss.counts)):
            name = entries[i].get("index") if i < len(entries) else None
            idx = p.parent / name if name else p.with_suffix(".idx")
            shards.append(Shard(str(p), n, str(idx) if idx.is_file() else None, entries[i].get("bytes")))
        manifest = ss.manifest
    else:
        manifest = exp.manifest or {}
        base = exp.manifest_url.rsplit("/", 1)[0]
        if not manifest.get("shards"):
            raise ShardError(f"{exp.manifest_url} lists no shards")
        shards = [Shard(storage.join(base, e["file"]), int(e["num_samples"]),
                        storage.join(base, e["index"]) if e.get("index") else None, e.get("bytes"))
                  for e in manifest["shards"]]
    fields = list(manifest.get("fields", []))
    image_exts = list(manifest.get("image_keys") or ([manifest["image_key"]] if manifest.get("image_key") else []))
    return Stream(spec, weight, shards, fields, image_exts, list(manifest.get("classes", [])), "manifest")


# ---------------------------------------------------------------------------------------------------------------
# Counting


def _idx_header_count(data: bytes | None) -> int | None:
    if not data:
        return None
    head = data.split(b"\n", 1)[0].split()
    if len(head) == 2 and head[0].startswith(b"v1.") and head[1].isdigit():
        return int(head[1])
    return None


def _fields_of_index(text: str, limit: int = 200) -> set[str]:
    fields: set[str] = set()
    for line in text.splitlines()[1 : limit + 1]:
        parts = line.split()
        fields.update(parts[i] for i in range(0, len(parts), 4))
    return fields


@dataclass
class _Count:
    num_samples: int | None = None
    index: str | None = None
    origin: str = ""


def _count_one(url: str, cache_dir: str | None, sidecars: set[str] | None, policy: RetryPolicy) -> _Count:
    """The sample count of one shard from what exists (cache index, _stats.json, .idx beside it)."""
    cached = cache_index_path(url, cache_dir)
    if cached.is_file():
        with open(cached, "rb") as f:
            n = _idx_header_count(f.read(64))
        if n is not None:
            return _Count(n, str(cached), "cache")
    if storage.scheme_of(url) == "pipe":
        return _Count()
    base = _shard_base(url)
    beside_idx = base + ".idx"
    have_idx = None
    local = not storage.is_remote(url)

    def exists(u: str) -> bool | None:
        if local:
            return os.path.isfile(u)
        return None if sidecars is None else u in sidecars

    stats_url = base + "_stats.json"
    if exists(stats_url) is not False:
        data = storage.read_bytes(stats_url, policy)
        if data is not None:
            try:
                n = int(json.loads(data)["successes"])
            except (ValueError, KeyError, TypeError):
                n = None
            if n is not None:
                have_idx = exists(beside_idx)
                return _Count(n, beside_idx if have_idx else None, "stats")
    if exists(beside_idx) is not False:
        n = _idx_header_count(storage.read_bytes(beside_idx, policy, 0, 64))
        if n is not None:
            return _Count(n, beside_idx, "idx")
    return _Count()


def _parallel(fn: Callable, items: Sequence, workers: int, desc: str, progress: bool) -> list:
    from tqdm import tqdm

    if not items:
        return []
    with ThreadPoolExecutor(max(1, min(workers, len(items)))) as pool:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, unit="shard", disable=not progress,
                         mininterval=1.0, file=sys.stderr))


# ---------------------------------------------------------------------------------------------------------------
# Indexing (reads a shard once; never copies it)


@dataclass
class IndexResult:
    num_samples: int
    index: str
    fields: set[str]
    bytes: int | None


def index_shard(url: str, out: str | os.PathLike, policy: RetryPolicy | None = None) -> IndexResult:
    """Scan one shard's tar headers and write its DALI index (``v1.2``) to ``out`` (atomically). A local
    uncompressed tar is read header by header (seeking over the data); anything else is streamed once."""

    def scan() -> tuple[list, int | None]:
        if not storage.is_remote(url) and not url.endswith((".gz", ".tgz")):
            path = storage.local_path(url)
            with tarfile.open(path, ignore_zeros=True) as tar:
                return tar_bundles(tar), os.path.getsize(path)
        with storage.open_stream(url) as f, tarfile.open(fileobj=f, mode="r|*", ignore_zeros=True) as tar:
            return tar_bundles(tar), None

    try:
        bundles, size = storage.retrying(scan, url, "index", policy or RetryPolicy())
    except StorageError:
        raise
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardError(f"cannot index {url}: {type(exc).__name__}: {exc} (not a tar, or damaged)") from exc
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    storage.write_bytes_atomic(str(out), format_dali_index(bundles).encode())
    fields = {comp[0] for b in bundles for comp in b}
    return IndexResult(len(bundles), str(out), fields, size)


def _index_location(url: str, cache_dir: str | None) -> str:
    """Beside a local shard when its folder is writable, else in the cache."""
    if not storage.is_remote(url):
        path = storage.local_path(url)
        if os.access(os.path.dirname(path) or ".", os.W_OK):
            return _strip_suffix(path) + ".idx"
    return str(cache_index_path(url, cache_dir))


def _index_command(spec: str, cache_dir: str | None) -> str:
    cache = f" --cache {shlex.quote(str(cache_dir))}" if cache_dir else ""
    return f"pipeline shards index {shlex.quote(spec)}{cache}"


# ---------------------------------------------------------------------------------------------------------------
# Resolution


@dataclass
class ResolveOptions:
    cache_dir: str | None = None
    verify: str = "size"
    auto_index: int = 256
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    workers: int = 32
    progress: bool = True
    index_all: bool = False
    """``pipeline shards index``: write a DALI index for every shard without one, and a manifest beside a
    writable local folder."""
    refresh: bool = False
    """Ignore (and rewrite) the cached resolution."""


def _load_cached(spec: str, exp: _Expanded | None, opts: ResolveOptions) -> Stream | None:
    path = _source_cache_path(spec, opts.cache_dir)
    if opts.refresh or not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
        shards = [Shard(s["url"], int(s["num_samples"]), s.get("index"), s.get("bytes")) for s in rec["shards"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if exp is not None:  # a local spec: the cache holds only while the shards are the same
        if [e.url for e in exp.entries] != [s.url for s in shards]:
            return None
        if opts.verify != "none" and any(s.bytes is not None and storage.local_size(s.url) != s.bytes for s in shards):
            return None
        shards = [Shard(s.url, s.num_samples, s.index if s.index and os.path.isfile(s.index) else
                        _local_index_if_any(s.url, opts.cache_dir), s.bytes) for s in shards]
    return Stream(spec, 1.0, shards, rec.get("fields", []), rec.get("image_exts", []), rec.get("classes", []),
                  "cache")


def _local_index_if_any(url: str, cache_dir: str | None) -> str | None:
    for cand in (_strip_suffix(storage.local_path(url)) + ".idx", str(cache_index_path(url, cache_dir))):
        if os.path.isfile(cand):
            return cand
    return None


def _store_cached(stream: Stream, opts: ResolveOptions) -> None:
    rec = {"version": CACHE_VERSION, "spec": stream.spec, "created": time.time(), "origin": stream.origin,
           "fields": stream.fields, "image_exts": stream.image_exts, "classes": stream.classes,
           "shards": [asdict(s) for s in stream.shards]}
    try:
        _write_json_atomic(_source_cache_path(stream.spec, opts.cache_dir), rec)
    except OSError as exc:
        print(f"note: cannot write the source cache in {cache_root(opts.cache_dir)} ({exc}); the next start "
              f"resolves {stream.spec} again", file=sys.stderr)


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def _resolve_stream(src: SourceSpec, opts: ResolveOptions) -> Stream:
    spec = src.spec
    if src.remote and not opts.index_all:
        cached = _load_cached(spec, None, opts)  # a remote cache hit costs no request at all
        if cached is not None:
            cached.weight = src.weight
            return cached
    exp = _expand(spec, opts.policy)
    if exp.manifest is not None:
        stream = _stream_from_manifest(spec, src.weight, exp, opts.verify, opts.policy)
        if opts.index_all:
            missing = [i for i, s in enumerate(stream.shards) if not s.index or not _index_reachable(s.index)]
            built = _index_shards([stream.shards[i].url for i in missing], opts, f"indexing {spec}")
            for i, res in zip(missing, built):
                s = stream.shards[i]
                stream.shards[i] = Shard(s.url, s.num_samples, res.index, s.bytes)
        return stream
    if not src.remote and not opts.index_all:
        cached = _load_cached(spec, exp, opts)
        if cached is not None:
            cached.weight = src.weight
            return cached
    if exp.missing:
        if not exp.entries:
            raise ShardError(f"none of the {len(exp.missing)} shards of {spec} exist (first: {exp.missing[0]})")
        _warn(f"{len(exp.missing)} of {len(exp.missing) + len(exp.entries)} shards of {spec} do not exist and are "
              f"skipped (first: {', '.join(exp.missing[:3])})")
    if not exp.entries:
        raise ShardError(f"{spec} names no .tar shards")
    urls = [e.url for e in exp.entries]
    sizes = {e.url: e.size for e in exp.entries}
    sidecars = {e.url for e in exp.listed} if exp.listed is not None else None
    if sidecars is None and src.scheme == "s3" and len(urls) > 8:
        sidecars = _s3_sidecars(urls, opts.policy)
    counts = _parallel(lambda u: _count_one(u, opts.cache_dir, sidecars, opts.policy), urls, opts.workers,
                       f"counting {spec}", opts.progress and len(urls) > 16)
    todo = [u for u, c in zip(urls, counts) if c.num_samples is None or (opts.index_all and not c.index)]
    fields: set[str] = set()
    if todo:
        n_uncounted = sum(c.num_samples is None for c in counts)
        if not opts.index_all and (src.remote or n_uncounted > opts.auto_index):
            raise ShardError(
                f"{n_uncounted} of {len(urls)} shards of {spec} have no sample count (no {MANIFEST}, no "
                f"NNNNN_stats.json or .idx beside them, nothing in the cache {cache_root(opts.cache_dir)}). "
                f"Count them once (reads every shard, copies nothing) with: {_index_command(spec, opts.cache_dir)}")
        if not opts.index_all:
            _warn(f"{n_uncounted} local shards of {spec} have no sample count: scanning their tar headers once "
                  f"(results cached; `{_index_command(spec, opts.cache_dir)}` does this ahead of a run)")
        built = _index_shards(todo, opts, f"indexing {spec}")
        position = {u: i for i, u in enumerate(urls)}
        for u, res in zip(todo, built):
            counts[position[u]] = _Count(res.num_samples, res.index, "scan")
            fields |= res.fields
            sizes[u] = sizes.get(u) or res.bytes
    shards = [Shard(u, c.num_samples, c.index, sizes.get(u) if sizes.get(u) is not None
                    else (storage.local_size(u) if not src.remote else None)) for u, c in zip(urls, counts)]
    if not fields:
        fields = _fields_from_indexes(shards) or _peek_fields(shards[0].url, opts.policy)
    origins = sorted({c.origin for c in counts})
    image_exts = [e for e in IMAGE_EXTS if e in fields]
    stream = Stream(spec, src.weight, shards, sorted(fields), image_exts, [], "+".join(origins))
    empty = [s.url for s in shards if s.num_samples == 0]
    if len(empty) == len(shards):
        raise ShardError(f"the shards of {spec} hold no samples")
    _store_cached(stream, opts)
    if opts.index_all and exp.folder and os.access(exp.folder, os.W_OK) and exp.manifest is None:
        _write_manifest(exp.folder, stream)
    return stream


def _index_reachable(index: str) -> bool:
    return storage.is_remote(index) or os.path.isfile(index)


def _s3_sidecars(urls: list[str], policy: RetryPolicy) -> set[str] | None:
    """One listing per folder of a brace pattern tells which sidecar files exist: cheaper than a GET per shard
    that mostly answers 404."""
    folders = sorted({u.rsplit("/", 1)[0] for u in urls})
    if len(folders) > 16:
        return None
    out: set[str] = set()
    for f in folders:
        out |= {e.url for e in storage.list_folder(f, policy)}
    return out


def _fields_from_indexes(shards: list[Shard]) -> set[str]:
    """Fields from the first local index file (its first samples): cheap, and enough to pick image fields."""
    for s in shards[:1]:
        if s.index and not storage.is_remote(s.index) and os.path.isfile(s.index):
            with open(s.index) as f:
                head = "".join(f.readline() for _ in range(201))
            return _fields_of_index(head)
    return set()


def _peek_fields(url: str, policy: RetryPolicy, members: int = 64) -> set[str]:
    """Fields of the first samples of one shard (reads its first members only: one request for a remote shard).
    Unknown (empty) when the shard cannot be read: reading it for real will say why."""

    def peek() -> set[str]:
        fields: set[str] = set()
        with storage.open_stream(url, 1 << 16) as f, tarfile.open(fileobj=f, mode="r|*", ignore_zeros=True) as tar:
            for n, m in enumerate(tar):
                base = m.name.rsplit("/", 1)[-1]
                if m.isreg() and "." in base.lstrip("."):
                    fields.add(base.split(".", 1)[1].lower())
                if n >= members:
                    break
        return fields

    try:
        return storage.retrying(peek, url, "read", RetryPolicy(min(policy.retries, 1), policy.backoff_s))
    except ShardError:
        return set()


def _index_shards(urls: list[str], opts: ResolveOptions, desc: str) -> list[IndexResult]:
    def one(u: str) -> IndexResult:
        return index_shard(u, _index_location(u, opts.cache_dir), opts.policy)

    return _parallel(one, urls, opts.workers, desc, opts.progress)


def _write_manifest(folder: str, stream: Stream) -> None:
    """A manifest beside shards that had none (``shards index`` on a writable folder), in the format
    ``pipeline shards write`` writes minus ``sha256`` (which would mean reading every byte)."""
    entries = []
    for s in stream.shards:
        entry = {"file": os.path.relpath(s.url, folder), "num_samples": s.num_samples,
                 "bytes": s.bytes if s.bytes is not None else storage.local_size(s.url)}
        if s.index and os.path.dirname(os.path.abspath(s.index)) == os.path.dirname(os.path.abspath(s.url)):
            entry["index"] = os.path.basename(s.index)
        entries.append(entry)
    manifest = {
        "format": "webdataset", "version": 1, "source": f"pipeline shards index {folder}",
        "num_samples": stream.num_samples, "image_key": (stream.image_exts or ["jpg"])[0],
        "image_keys": stream.image_exts, "fields": stream.fields, "classes": [], "num_skipped": 0, "skipped": [],
        "shards": entries,
    }
    _write_json_atomic(Path(folder) / MANIFEST, manifest)


def resolve_source(value: Any, *, where: str = "data.train_shards", cache_dir: str | None = None,
                   verify: str = "size", auto_index: int = 256, policy: RetryPolicy | None = None,
                   progress: bool = True) -> DataSource:
    """Resolve a config value into shards with counts, in this process (see :func:`resolve_for_job`)."""
    opts = ResolveOptions(cache_dir or None, verify, auto_index, policy or RetryPolicy(), progress=progress)
    return DataSource([_resolve_stream(s, opts) for s in parse_sources(value, where)])


def index_source(value: Any, *, cache_dir: str | None = None, workers: int = 16, refresh: bool = False,
                 progress: bool = True, policy: RetryPolicy | None = None) -> DataSource:
    """``pipeline shards index``: resolve ``value`` and write what is missing: a DALI index for every shard
    without one (beside a local shard whose folder is writable, else in the cache) and a manifest beside a
    writable local folder that had none. Reads each shard at most once and copies nothing."""
    opts = ResolveOptions(cache_dir or None, "size", 0, policy or RetryPolicy(), workers, progress, index_all=True,
                          refresh=refresh)
    return DataSource([_resolve_stream(s, opts) for s in parse_sources(value, "SOURCE")])


def resolve_for_job(value: Any, data_cfg: Any, *, where: str = "data.train_shards",
                    progress: bool | None = None) -> DataSource:
    """:func:`resolve_source` with the options of ``data_cfg`` (a :class:`pipeline.config.DataConfig`). In a
    distributed job (process group initialized) rank 0 resolves and sends the result to every rank, and an
    error on rank 0 is raised on every rank: all ranks must call this together."""
    import torch.distributed as dist

    policy = RetryPolicy(data_cfg.retries, data_cfg.retry_backoff_s)

    def resolve(show: bool) -> DataSource:
        return resolve_source(value, where=where, cache_dir=data_cfg.cache_dir or None, verify=data_cfg.verify,
                              auto_index=data_cfg.auto_index, policy=policy, progress=show)

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return resolve(True if progress is None else progress)
    import torch

    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = resolve(True if progress is None else progress)
        except ShardError as exc:
            box[0] = exc
    device = None
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    dist.broadcast_object_list(box, src=0, device=device)
    if isinstance(box[0], BaseException):
        if dist.get_rank() == 0:
            raise box[0]
        raise ShardError(f"{box[0]} (reported by rank 0)")
    return box[0]


def iter_specs(value: Any) -> Iterable[str]:
    return (s.spec for s in parse_sources(value))
