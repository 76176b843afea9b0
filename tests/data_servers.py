"""Real data parts for the data-plane tests (a pytest plugin, loaded by conftest.py):

- ``s3_server``: moto's standalone S3-compatible server (``python -m moto.server``, from ``moto[server]``) on
  127.0.0.1, with dummy credentials and ``AWS_ENDPOINT_URL`` in the environment for the session, so boto3,
  s3fs and DALI's AWS SDK all talk to it. ``s3_server.upload(folder, "bucket/prefix")`` copies files there.
- ``http_server``: Python's ``http.server`` serving a temporary folder on 127.0.0.1 (its own process).
- ``wds_shards``: shards written by ``webdataset.ShardWriter`` in img2dataset's layout: ``00000.tar`` ...
  with ``.jpg``, ``.txt``, ``.json`` (``caption``, ``label``) and ``.cls`` members and an img2dataset
  ``00000_stats.json`` (``successes``) beside each tar; 4 uneven shards (24, 24, 24, 12 samples).
- ``img2dataset_shards``: shards made by ``img2dataset`` itself (its own virtualenv ``.venv-img2dataset``, made
  by ``make test``: it pins webdataset<0.3) downloading JPEGs from a URL list served by ``http_server``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
IMG2DATASET = Path(os.environ.get("IMG2DATASET_VENV", ROOT / ".venv-img2dataset")) / "bin" / "img2dataset"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port() -> int:
    """A loopback port nothing listens on (bound and released: connection refused)."""
    return free_port()


def _wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def jpeg_bytes(rng: np.random.Generator, size: tuple[int, int] = (24, 32), fmt: str = "JPEG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(buf, fmt)
    return buf.getvalue()


def write_wds_shards(out: Path, counts: tuple[int, ...] = (24, 24, 24, 12), seed: int = 0, stats: bool = True,
                     image_ext: str = "jpg") -> Path:
    """img2dataset's layout, written by webdataset.ShardWriter (see the module docstring). Sample ``i`` has
    caption ``a photo number i``, label ``i % 3`` in ``.cls`` and ``json['label']``."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[image_ext]
    key = 0
    for shard, n in enumerate(counts):
        # one ShardWriter per shard: img2dataset's shards are uneven (failed downloads), one maxcount is not
        with wds.ShardWriter(str(out / "%05d.tar"), maxcount=n, start_shard=shard, verbose=0) as w:
            for _ in range(n):
                caption = f"a photo number {key}"
                w.write({"__key__": f"{shard:05d}{key:04d}", image_ext: jpeg_bytes(rng, fmt=fmt),
                         "txt": caption, "json": json.dumps({"caption": caption, "label": key % 3}).encode(),
                         "cls": str(key % 3)})
                key += 1
        if stats:
            (out / f"{shard:05d}_stats.json").write_text(json.dumps({"count": n, "successes": n, "failed": 0}))
    return out


@dataclass
class S3Server:
    endpoint: str
    port: int

    def client(self):
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=self.endpoint)

    def upload(self, folder: Path, dest: str) -> str:
        """Copy every file of ``folder`` to ``s3://dest/`` (``bucket/prefix``; the bucket is created)."""
        bucket, _, prefix = dest.partition("/")
        client = self.client()
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        for f in sorted(Path(folder).iterdir()):
            if f.is_file():
                client.upload_file(str(f), bucket, f"{prefix.rstrip('/')}/{f.name}" if prefix else f.name)
        return f"s3://{dest.rstrip('/')}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    pytest.importorskip("moto", reason="the S3 tests need moto[server] (pip install -e '.[test]')")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"]}
    try:
        _wait_for_port(port, proc, "moto.server")
        os.environ.update(env)
        for k in ("AWS_PROFILE",):
            os.environ.pop(k, None)
        os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(log.parent / "none")
        from pipeline.data import storage

        storage.reset_clients()
        yield S3Server(env["AWS_ENDPOINT_URL"], port)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class HttpServer:
    root: Path
    url: str


@pytest.fixture(scope="session")
def http_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("http-root")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                             str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_port(port, proc, "http.server")
        yield HttpServer(root, f"http://127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def wds_shards(tmp_path_factory) -> Path:
    return write_wds_shards(tmp_path_factory.mktemp("wds") / "shards")


@pytest.fixture(scope="session")
def img2dataset_shards(http_server, tmp_path_factory) -> Path:
    """40 JPEGs served on 127.0.0.1, downloaded into shards of 16 by img2dataset (captions from a CSV)."""
    if not IMG2DATASET.exists():
        pytest.skip(f"img2dataset is not installed at {IMG2DATASET} (make test creates .venv-img2dataset)")
    rng = np.random.default_rng(1)
    images = http_server.root / "images"
    images.mkdir(exist_ok=True)
    rows = ["url,caption"]
    for i in range(40):
        (images / f"{i}.jpg").write_bytes(jpeg_bytes(rng, (48, 64)))
        rows.append(f"{http_server.url}/images/{i}.jpg,a downloaded photo number {i}")
    work = tmp_path_factory.mktemp("img2dataset")
    (work / "urls.csv").write_text("\n".join(rows) + "\n")
    out = work / "shards"
    proc = subprocess.run(
        [str(IMG2DATASET), "--url_list", str(work / "urls.csv"), "--input_format", "csv", "--url_col", "url",
         "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(out),
         "--number_sample_per_shard", "16", "--processes_count", "1", "--thread_count", "4", "--image_size", "32",
         "--resize_mode", "border", "--enable_wandb", "False", "--timeout", "10", "--retries", "1"],
        check=False, capture_output=True, text=True, timeout=600, cwd=work,
        env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    if proc.returncode != 0 or not list(out.glob("*.tar")):
        raise RuntimeError(f"img2dataset failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return out


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
