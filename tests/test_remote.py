"""Remote sources through real servers on 127.0.0.1: an S3-compatible store (moto's server), a plain HTTP
server, ``pipe:`` commands; shards written by webdataset.ShardWriter and by img2dataset."""

import itertools
import os
import time

import pytest
import torch

from pipeline.config import config_from_dict
from pipeline.data import storage
from pipeline.data.shards import ShardError
from pipeline.data.sources import resolve_source
from pipeline.data.storage import StorageError
from pipeline.data.torch_loader import TorchLoader
from pipeline.distributed import DistEnv
from pipeline.methods import method_recipe
from tests.data_servers import closed_port, write_wds_shards

CPU = torch.device("cpu")
COUNTS = [24, 24, 24, 12]


def cfg_for(source, tmp_path, **data):
    return config_from_dict({
        "data": {"train_shards": source, "cache_dir": str(tmp_path / "cache"), "retries": 1,
                 "retry_backoff_s": 0.05, **data},
        "loader": {"backend": "auto", "batch_size": 8, "num_workers": 2, "shuffle_buffer": 16},
        "augment": {"image_size": 16},
    })


@pytest.fixture(scope="module")
def s3_shards(s3_server, wds_shards):
    return s3_server.upload(wds_shards, "laion/part-a")


def bucket_keys(s3_server, bucket: str) -> set[str]:
    return {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])}


@pytest.fixture
def endpoint(monkeypatch):
    """Point the AWS environment at another endpoint for one test (fresh clients before and after)."""

    def point(url: str) -> None:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        storage.reset_clients()

    yield point
    storage.reset_clients()


def test_s3_sources_resolve_once_then_start_without_a_request(s3_server, s3_shards, tmp_path, endpoint):
    cache = tmp_path / "cache"
    for form in (f"{s3_shards}/", f"{s3_shards}/{{00000..00003}}.tar"):
        src = resolve_source(form, cache_dir=cache, progress=False)
        assert src.paths == [f"{s3_shards}/{i:05d}.tar" for i in range(4)] and src.counts == COUNTS
        assert src.remote and src.streams[0].origin == "stats"
        assert set(src.fields) == {"cls", "jpg", "json", "txt"}  # from the first shard's first members
    endpoint(f"http://127.0.0.1:{closed_port()}")  # the store is gone: a cached source needs no request
    src = resolve_source(f"{s3_shards}/", cache_dir=cache, progress=False)
    assert src.counts == COUNTS and src.streams[0].origin == "cache"


def test_torch_backend_streams_s3_and_resumes_exactly(s3_server, s3_shards, tmp_path):
    from pipeline.data.loader import resolve_backend

    cfg = cfg_for(f"{s3_shards}/", tmp_path)
    assert resolve_backend(cfg) == "torch"  # auto: the DALI backend does not read remote sources (yet)
    env = DistEnv(rank=1, world_size=2)
    full = TorchLoader(cfg, env, CPU, method_recipe(cfg))
    assert full.steps_per_epoch == 84 // 16
    it = iter(full)
    batches = [next(it) for _ in range(full.steps_per_epoch + 2)]  # into the next epoch
    for cut in (1, full.steps_per_epoch - 1):
        resumed = TorchLoader(cfg, env, CPU, method_recipe(cfg))
        resumed.load_state_dict({"epoch": 0, "batch": cut})
        rest = list(itertools.islice(iter(resumed), len(batches) - cut))
        for a, b in zip(batches[cut:], rest):
            assert a.keys == b.keys
            for va, vb in zip(a.views, b.views):
                assert torch.equal(va, vb)


def test_s3_stream_matches_the_same_shards_on_disk(s3_server, s3_shards, wds_shards, tmp_path):
    remote = TorchLoader(cfg_for(f"{s3_shards}/", tmp_path), DistEnv(), CPU, method_recipe(cfg_for("x", tmp_path)))
    local_cfg = cfg_for(str(wds_shards), tmp_path, cache_dir=str(tmp_path / "c2"))
    local = TorchLoader(local_cfg, DistEnv(), CPU, method_recipe(local_cfg))
    for a, b in zip(itertools.islice(iter(remote), 3), itertools.islice(iter(local), 3)):
        assert a.keys == b.keys and torch.equal(a.views[0], b.views[0])  # same plan, same bytes, same pixels


def test_http_and_pipe_sources(http_server, wds_shards, tmp_path):
    from pipeline.cli import main

    served = http_server.root / "wds"
    if not served.exists():
        served.mkdir()
        for f in wds_shards.iterdir():
            (served / f.name).write_bytes(f.read_bytes())
    http = f"{http_server.url}/wds/{{00000..00003}}.tar"
    src = resolve_source(http, cache_dir=tmp_path / "cache", progress=False)
    assert src.counts == COUNTS and src.streams[0].origin == "stats"  # _stats.json fetched beside each tar
    batch = next(iter(TorchLoader(cfg_for(http, tmp_path), DistEnv(), CPU, method_recipe(cfg_for(http, tmp_path)))))
    assert batch.size == 8 and batch.num_bad == 0

    pipe = f"pipe:cat {wds_shards}/{{00000..00003}}.tar"
    with pytest.raises(ShardError, match=r"have no sample count.*pipeline shards index 'pipe:cat"):
        resolve_source(pipe, cache_dir=tmp_path / "cache")
    assert main(["shards", "index", pipe, "--cache", str(tmp_path / "cache"), "--no-progress"]) == 0
    src = resolve_source(pipe, cache_dir=tmp_path / "cache")
    assert src.counts == COUNTS and all(s.index.startswith(str(tmp_path / "cache")) for s in src.shards)
    cfg = cfg_for(pipe, tmp_path)
    keys = [k for b in itertools.islice(iter(TorchLoader(cfg, DistEnv(), CPU, method_recipe(cfg))), 10) for k in b.keys]
    assert len(set(keys)) == 80  # one epoch: 84 samples, 10 batches of 8, each sample at most once


def test_index_command_on_s3_writes_the_cache_and_leaves_the_bucket_alone(s3_server, wds_shards, tmp_path):
    from pipeline.cli import main

    bare = tmp_path / "bare"
    bare.mkdir()
    for i in range(4):
        (bare / f"{i:05d}.tar").write_bytes((wds_shards / f"{i:05d}.tar").read_bytes())
    url = s3_server.upload(bare, "bare/shards")
    before = bucket_keys(s3_server, "bare")
    cache = tmp_path / "cache"
    cfg = cfg_for(f"{url}/{{00000..00003}}.tar", tmp_path)
    with pytest.raises(ShardError) as err:  # remote shards without counts: the run names the command
        TorchLoader(cfg, DistEnv(), CPU, method_recipe(cfg))
    assert f"pipeline shards index '{url}/{{00000..00003}}.tar' --cache {cache}" in str(err.value)
    assert main(["shards", "index", f"{url}/{{00000..00003}}.tar", "--cache", str(cache), "--no-progress"]) == 0
    assert bucket_keys(s3_server, "bare") == before  # nothing written to (or copied from) the bucket
    idx = sorted(cache.rglob("*.idx"))
    assert [p.relative_to(cache).as_posix() for p in idx] == [f"index/s3/bare/shards/{i:05d}.idx" for i in range(4)]
    assert not list(cache.rglob("*.tar"))
    loader = TorchLoader(cfg, DistEnv(), CPU, method_recipe(cfg))
    assert loader.shards.counts == COUNTS and loader.shards.streams[0].origin == "cache"
    assert [s.index for s in loader.shards.shards] == [str(p) for p in idx]  # where the DALI backend finds them


@pytest.mark.parametrize("kind", ["s3", "http"])
def test_unreachable_store_is_retried_then_named(kind, s3_server, s3_shards, tmp_path, endpoint):
    port = closed_port()
    if kind == "s3":
        endpoint(f"http://127.0.0.1:{port}")
        url = f"{s3_shards}/00000.tar"
    else:
        url = f"http://127.0.0.1:{port}/wds/00000.tar"
    cfg = cfg_for(url, tmp_path, retries=2, retry_backoff_s=0.2)
    t = time.monotonic()
    with pytest.raises(StorageError) as err:
        TorchLoader(cfg, DistEnv(), CPU, method_recipe(cfg))  # counting: reading NNNNN_stats.json fails
    assert "after 3 attempts" in str(err.value) and f"127.0.0.1:{port}" in str(err.value)
    assert time.monotonic() - t >= 0.2 * 0.75 * 3  # backoff 0.2, 0.4 (+-25%) between the three attempts
    # a shard that was counted before (cached) but whose store then fails mid-run: the reader names it
    if kind == "s3":
        endpoint(s3_server.endpoint)
        resolve_source(f"{s3_shards}/00000.tar", cache_dir=tmp_path / "cache")
        endpoint(f"http://127.0.0.1:{port}")
        cfg.loader.num_workers = 0
        loader = TorchLoader(cfg, DistEnv(), CPU, method_recipe(cfg))
        with pytest.raises(StorageError, match=f"cannot read {url} after 3 attempts"):
            next(iter(loader))


def test_img2dataset_shards_train_clip_from_s3(img2dataset_shards, s3_server, tmp_path):
    url = s3_server.upload(img2dataset_shards, "img2dataset/out")
    for text_key in ("txt", "json:caption"):
        cfg = cfg_for(f"{url}/", tmp_path, text_key=text_key)
        cfg.augment.recipe = "clip"
        loader = TorchLoader(cfg, DistEnv(), CPU, method_recipe(cfg))
        assert loader.shards.num_samples == 40  # img2dataset's _stats.json, then the cache
        assert loader.shards.streams[0].origin == ("stats" if text_key == "txt" else "cache")
        batch = next(iter(loader))
        assert batch.num_bad == 0 and batch.views[0].shape == (8, 3, 16, 16)
        assert all(t.startswith("a downloaded photo number ") for t in batch.texts)


@pytest.mark.slow
def test_training_run_on_a_mixture_of_every_kind_of_source(s3_server, s3_shards, http_server, wds_shards, tmp_path):
    """One real run reading local, S3, HTTP and pipe: shards in one weighted mixture, with a few undecodable
    images: it trains, reports the bad samples, and a second run with a strict bad-sample bound stops clearly."""
    import json

    from pipeline.config import load_config
    from pipeline.trainer import train
    from tests.conftest import tiny_overrides

    bad = write_wds_shards(tmp_path / "bad", (16,), seed=5)
    _corrupt_images(bad / "00000.tar", every=8)  # 2 of 16 images are garbage
    served = http_server.root / "mix"
    served.mkdir(exist_ok=True)
    for f in wds_shards.iterdir():
        (served / f.name).write_bytes(f.read_bytes())
    mixture = [{"shards": str(bad), "weight": 2},
               {"shards": f"{s3_shards}/{{00000..00001}}.tar", "weight": 1},
               {"shards": f"{http_server.url}/mix/00002.tar", "weight": 1},
               {"shards": f"pipe:cat {wds_shards}/00003.tar", "weight": 0.5}]
    from pipeline.cli import main

    assert main(["shards", "index", mixture[3]["shards"], "--cache", str(tmp_path / "cache"), "--no-progress"]) == 0
    shards = {"train": "unused", "test": "unused"}
    extra = {"data.train_shards": json.dumps(mixture), "data.cache_dir": str(tmp_path / "cache"),
             "data.eval_train_shards": "", "data.eval_test_shards": "", "data.max_bad_fraction": 0.5,
             "loader.backend": "auto", "loader.batch_size": 16, "augment.image_size": 16, "model.img_size": 16,
             "model.patch_size": 8, "train.steps": 4, "checkpoint.every_steps": 4}
    cfg = load_config("configs/quickstart.yaml", tiny_overrides(shards, tmp_path / "run", **extra))
    summary = train(cfg)
    assert summary["steps"] == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["bad_samples"] > 0  # 32 + 48 + 24 + 6 = 110 per epoch; 64 trained, the bad shard x2
    cfg = load_config("configs/quickstart.yaml", tiny_overrides(shards, tmp_path / "strict", **{
        **extra, "data.max_bad_fraction": 0.001}))
    with pytest.raises(ShardError, match=r"more than data.max_bad_fraction=0.001; last bad sample .*00000.tar"):
        train(cfg)


def _corrupt_images(tar_path, every: int) -> int:
    """Overwrite the image bytes of every ``every``-th sample in place (same size: a manifest size check passes)."""
    import tarfile

    n = 0
    data = bytearray(tar_path.read_bytes())
    with tarfile.open(tar_path) as tar:
        images = [m for m in tar if m.name.endswith(".jpg")]
    for m in images[::every]:
        data[m.offset_data : m.offset_data + m.size] = b"garbage!" * (m.size // 8) + b"!" * (m.size % 8)
        n += 1
    tar_path.write_bytes(bytes(data))
    os.sync()
    return n
