"""Bytes of shards and their sidecar files, wherever they live: local paths, ``file://``, ``s3://`` (any
S3-compatible store), ``http(s)://``, ``pipe:COMMAND`` and any other fsspec protocol that is installed.

- ``s3://``: boto3, configured the standard AWS way only (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``,
  ``AWS_PROFILE``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID`` ..., ``~/.aws/config`` and ``~/.aws/credentials``,
  including ``endpoint_url`` and ``s3 = addressing_style = path`` in a profile), so MinIO, Ceph, R2, GCS's
  S3 API or moto all work without a project-specific setting. Shards are read with one streaming GET per
  shard: on the loopback S3 server that is ~3x the throughput of s3fs's ranged block reads.
- ``http(s)://``: fsspec's streaming HTTP file (one GET, no range requests needed from the server).
- ``pipe:CMD``: webdataset's ``gopen`` (runs CMD in a shell and reads its stdout, as webdataset and open_clip do).
- other schemes (``gs://``, ``az://``, ...): ``fsspec.open`` where the protocol's package is installed.

Every remote call is retried (``retries`` times, backoff doubling from ``backoff_s``, with jitter) on errors
that may pass (connection refused or reset, timeouts, 5xx, throttling); a missing object or a denied request is
not retried. When the retries are spent the call raises :class:`StorageError` naming the URL.
"""

from __future__ import annotations

import os
import random
import re
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, TypeVar
from urllib.parse import urlparse
from urllib.request import url2pathname

from pipeline.data.shards import ShardError

T = TypeVar("T")
LOCAL_SCHEMES = ("", "file")


class StorageError(ShardError):
    """A shard or sidecar file that could not be read after the configured retries, or at all."""


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 3
    """Attempts after the first one for errors that may pass."""
    backoff_s: float = 1.0
    """Sleep before the first retry; doubles after each, capped at 60 s, with +-25% jitter."""

    def sleep(self, attempt: int) -> None:
        delay = min(60.0, self.backoff_s * 2**attempt)
        time.sleep(delay * random.uniform(0.75, 1.25))


def scheme_of(url: str) -> str:
    """``''`` for a plain path, ``pipe`` for ``pipe:CMD``, else the URL scheme (``s3``, ``http``, ``file`` ...)."""
    if url.startswith("pipe:"):
        return "pipe"
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", url)
    return m.group(1).lower() if m else ""


def is_remote(url: str) -> bool:
    return scheme_of(url) not in LOCAL_SCHEMES


def local_path(url: str) -> str:
    """The filesystem path of a local URL (``file:///x`` -> ``/x``; a plain path unchanged)."""
    if scheme_of(url) == "file":
        return url2pathname(urlparse(url).path)
    return url


def join(base: str, name: str) -> str:
    """``name`` inside folder ``base`` (a path or URL)."""
    return base.rstrip("/") + "/" + name


def _s3_split(url: str) -> tuple[str, str]:
    p = urlparse(url)
    return p.netloc, p.path.lstrip("/")


# ---------------------------------------------------------------------------------------------------------------
# Clients (one per process: boto3 sessions are not fork-safe, DataLoader workers are forked)

_clients: dict[tuple[int, str], object] = {}
_lock = threading.Lock()


def s3_client():
    """A boto3 S3 client built from the standard AWS environment and config files (see module docstring)."""
    key = (os.getpid(), "s3")
    with _lock:
        if key not in _clients:
            try:
                import boto3
                from botocore.config import Config as BotoConfig
            except ImportError as exc:
                raise StorageError("s3:// sources need boto3: pip install boto3 (or pip install -e '.[s3]')") from exc
            # botocore's own retries stay at their defaults (or AWS_MAX_ATTEMPTS); ours wrap whole reads, which
            # botocore cannot retry once a streaming body is half read.
            _clients[key] = boto3.session.Session().client("s3", config=BotoConfig(max_pool_connections=64))
        return _clients[key]


def reset_clients() -> None:
    """Forget this process's clients (after the AWS environment changed, e.g. another endpoint)."""
    with _lock:
        _clients.clear()


def _fs(protocol: str):
    import fsspec

    return fsspec.filesystem(protocol)


# ---------------------------------------------------------------------------------------------------------------
# Error classification and retries


def _status(exc: BaseException) -> int | None:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        code = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(code) if code else None
    code = getattr(exc, "status", None) or getattr(exc, "code", None)
    return int(code) if isinstance(code, int) else None


def is_missing(exc: BaseException) -> bool:
    """A 404 / no such key / no such file: the object is not there (never retried)."""
    if isinstance(exc, FileNotFoundError):
        return True
    if _status(exc) == 404:
        return True
    code = getattr(exc, "response", {}).get("Error", {}).get("Code") if isinstance(
        getattr(exc, "response", None), dict) else None
    return code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound")


def is_permanent(exc: BaseException) -> bool:
    """Errors that another attempt will not fix: missing, denied, bad request, or a local file problem."""
    if is_missing(exc) or isinstance(exc, (PermissionError, IsADirectoryError, NotADirectoryError, ValueError,
                                           tarfile.TarError, EOFError)):
        return True
    status = _status(exc)
    return status is not None and 400 <= status < 500 and status not in (408, 429)


def retrying(fn: Callable[[], T], url: str, what: str, policy: RetryPolicy) -> T:
    """``fn()``, retried under ``policy`` on transient errors; :class:`StorageError` naming ``url`` at the end."""
    for attempt in range(policy.retries + 1):
        try:
            return fn()
        except ShardError:
            raise
        except Exception as exc:
            if is_permanent(exc) or attempt == policy.retries:
                tries = f" after {attempt + 1} attempts" if attempt else ""
                raise StorageError(f"cannot {what} {url}{tries}: {type(exc).__name__}: {exc}") from exc
            policy.sleep(attempt)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------------------------
# Streams and small files


class _S3Stream:
    """The body of one streaming GET as a read-only file object."""

    def __init__(self, url: str) -> None:
        bucket, key = _s3_split(url)
        self.body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        return self.body.read(None if n is None or n < 0 else n)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.body.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_stream(url: str, buffer_bytes: int = 1 << 20) -> BinaryIO:
    """Open ``url`` for one sequential read (no retries here: callers retry whole reads, see :func:`retrying`)."""
    scheme = scheme_of(url)
    if scheme in LOCAL_SCHEMES:
        return open(local_path(url), "rb", buffering=buffer_bytes)
    if scheme == "s3":
        return _S3Stream(url)
    if scheme == "pipe":
        from webdataset.gopen import gopen

        return gopen(url, "rb", bufsize=buffer_bytes)
    if scheme in ("http", "https"):
        return _fs("http").open(url, "rb", block_size=0)  # streaming: one GET, no range requests
    import fsspec

    return fsspec.open(url, "rb").open()


def read_bytes(url: str, policy: RetryPolicy, start: int = 0, length: int | None = None) -> bytes | None:
    """The bytes of a (small) file, ``None`` if it does not exist. ``start``/``length`` read a byte range."""

    def read() -> bytes | None:
        scheme = scheme_of(url)
        try:
            if scheme in LOCAL_SCHEMES:
                with open(local_path(url), "rb") as f:
                    f.seek(start)
                    return f.read() if length is None else f.read(length)
            if scheme == "s3":
                bucket, key = _s3_split(url)
                extra = {}
                if start or length is not None:
                    extra["Range"] = f"bytes={start}-{'' if length is None else start + length - 1}"
                return s3_client().get_object(Bucket=bucket, Key=key, **extra)["Body"].read()
            if scheme == "pipe":
                raise ValueError("pipe: sources have no sidecar files")
            if scheme in ("http", "https") and start == 0 and length is not None:
                with open_stream(url) as f:  # many servers ignore Range (python -m http.server does): stream the head
                    return f.read(length)
            fs = _fs("http" if scheme in ("http", "https") else scheme)
            if start or length is not None:
                return fs.cat_file(url, start=start, end=None if length is None else start + length)
            return fs.cat_file(url)
        except Exception as exc:
            if is_missing(exc):
                return None
            raise

    return retrying(read, url, "read", policy)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write a local file under a temporary name and rename it: a reader never sees half a file."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass(frozen=True)
class Entry:
    url: str
    size: int | None


def list_folder(url: str, policy: RetryPolicy) -> list[Entry]:
    """Files directly inside folder/prefix ``url`` (not recursive), sorted by URL."""
    scheme = scheme_of(url)
    if scheme in LOCAL_SCHEMES:
        root = local_path(url)
        with os.scandir(root) as it:
            out = [Entry(os.path.join(root, e.name), None) for e in it if e.is_file()]
        return sorted(out, key=lambda e: e.url)
    if scheme == "s3":
        bucket, prefix = _s3_split(url)
        prefix = prefix.rstrip("/") + "/" if prefix else ""

        def ls() -> list[Entry]:
            pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
            return [Entry(f"s3://{bucket}/{o['Key']}", int(o["Size"])) for page in pages
                    for o in page.get("Contents", [])]

        return sorted(retrying(ls, url, "list", policy), key=lambda e: e.url)
    if scheme in ("http", "https", "pipe"):
        raise StorageError(f"cannot list {url}: {scheme} has no folder listing; give the shards as a brace "
                           f"pattern (e.g. {url.rstrip('/')}/{{00000..00099}}.tar) or put a manifest.json there")
    fs = _fs(scheme)
    infos = retrying(lambda: fs.ls(url, detail=True), url, "list", policy)
    prefix = scheme + "://"
    return sorted((Entry(i["name"] if "://" in i["name"] else prefix + i["name"], i.get("size"))
                   for i in infos if i.get("type") == "file"), key=lambda e: e.url)


def glob(url: str, policy: RetryPolicy) -> list[Entry]:
    """Files matching a glob pattern (``*``, ``?``, ``[...]``), sorted."""
    scheme = scheme_of(url)
    if scheme in LOCAL_SCHEMES:
        import glob as _glob

        return [Entry(p, None) for p in sorted(_glob.glob(local_path(url))) if os.path.isfile(p)]
    if scheme in ("http", "https", "pipe"):
        raise StorageError(f"cannot glob {url}: {scheme} has no listing; use a brace pattern {{00000..00099}}")
    import fnmatch

    folder = url[: url.rfind("/", 0, re.search(r"[*?\[]", url).start())]
    if re.search(r"[*?\[]", folder):
        raise StorageError(f"{url}: wildcards are supported in the file name only, not in folders")
    return [e for e in list_folder(folder, policy) if fnmatch.fnmatchcase(e.url, url)]


def local_size(url: str) -> int | None:
    try:
        return os.stat(local_path(url)).st_size
    except OSError:
        return None
