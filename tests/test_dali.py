"""DALI backend on DALI's CPU backend (real nvidia-dali wheel); GPU decode behind the gpu marker."""

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")
ROOT = Path(__file__).resolve().parents[1]

from pipeline.config import config_from_dict, load_config
from pipeline.data import dali_loader as D
from pipeline.data.shards import Item, ShardError, write_dali_index, write_shards
from pipeline.data.torch_loader import TorchLoader
from pipeline.distributed import DistEnv
from pipeline.methods import method_recipe
from tests.multirank import run_ranks


def jpeg_items(n: int, seed: int = 0) -> list[Item]:
    rng = np.random.default_rng(seed)
    return [Item(f"img{i}", (rng.random((24, 30, 3)) * 255).astype(np.uint8), "png", i % 3) for i in range(n)]


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory) -> Path:
    """70 JPEG samples in uneven shards (20, 20, 20, 10)."""
    out = tmp_path_factory.mktemp("jpegs") / "train"
    write_shards(jpeg_items(70), out, shard_size=20, image_format="jpg", progress=False)
    return out


def make_cfg(shards, **loader) -> "Config":  # noqa: F821
    return config_from_dict({
        "data": {"train_shards": str(shards)},
        "loader": {"backend": "dali", "batch_size": 4, "num_workers": 1, "shuffle_buffer": 16, **loader},
        "augment": {"image_size": 16},
    })


def dali_loader(cfg, env: DistEnv | None = None, device: torch.device | None = None) -> D.DaliLoader:
    return D.DaliLoader(cfg, env or DistEnv(), device or torch.device("cpu"), method_recipe(cfg))


def take(loader, n: int) -> list:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_dali_yields_the_same_batch_as_the_torch_backend(jpeg_shards):
    cfg = make_cfg(jpeg_shards)
    dali, tv = dali_loader(cfg), TorchLoader(cfg, DistEnv(), torch.device("cpu"), method_recipe(cfg))
    assert dali.steps_per_epoch == tv.steps_per_epoch == 70 // 4
    d, t = take(dali, 1)[0], take(tv, 1)[0]
    assert len(d.views) == len(t.views) == 2
    for a, b in zip(d.views, t.views):
        assert a.shape == b.shape == (4, 3, 16, 16) and a.dtype == b.dtype == torch.float32
        assert a.device == b.device
    assert d.labels.dtype == t.labels.dtype == torch.long and d.labels.shape == (4,)
    assert all(int(k) % 3 == int(lab) for k, lab in zip(d.keys, d.labels))  # labels travel with their image
    assert d.texts is None and len(d.keys) == 4


def test_epochs_cover_each_sample_once_and_reshuffle(jpeg_shards):
    loader = dali_loader(make_cfg(jpeg_shards))
    steps = loader.steps_per_epoch
    batches = take(loader, 2 * steps + 1)
    epoch0 = [k for b in batches[:steps] for k in b.keys]
    epoch1 = [k for b in batches[steps : 2 * steps] for k in b.keys]
    assert len(set(epoch0)) == len(epoch0) == steps * 4
    assert len(set(epoch1)) == len(epoch1) == steps * 4
    assert epoch0 != epoch1  # epoch-seeded order
    assert loader.state_dict() == {"epoch": 2, "batch": 1}


def _state_after(shards: str, n: int, reader: str = "native") -> tuple[dict, dict]:
    """In a fresh process: the loader's job and rank state after ``n`` batches."""
    loader = dali_loader(make_cfg(shards, dali_reader=reader))
    it = iter(loader)  # kept alive, as in the trainer: the state is taken between two batches
    for _ in range(n):
        next(it)
    return loader.state_dict(), loader.rank_state_dict()


def _resume(cfg, state: dict, rank_state: dict | None) -> tuple[list, list]:
    """Batches of a loader resumed at ``state``, and the DALI checkpoints its pipelines were built from."""
    loader = dali_loader(cfg)
    built, build = [], loader.build_pipeline
    loader.build_pipeline = lambda *a, checkpoint=None: built.append(checkpoint) or build(*a, checkpoint=checkpoint)
    loader.load_state_dict(state)
    if rank_state is not None:
        loader.load_rank_state_dict(rank_state)
    return take(loader, 2), built


@pytest.mark.parametrize(("how", "reader"), [("dali_checkpoint", "native"), ("replay", "native"),
                                             ("dali_checkpoint", "stream")])
def test_resume_mid_epoch_continues_exactly(jpeg_shards, how, reader):
    """The native reader's position, or the stream reader's external-source iteration, and every generator come
    back from DALI's checkpoint (or by replay)."""
    cfg = make_cfg(jpeg_shards, dali_reader=reader)
    steps = dali_loader(cfg).steps_per_epoch
    ref = take(dali_loader(cfg), steps + 3)
    for first in (5, steps + 1):
        # the state is taken in another process, as after a crash: DALI's checkpoint must travel
        (state, rank_state), = run_ranks(_state_after, str(jpeg_shards), first, reader, world_size=1,
                                         init_pg=False)
        assert state == {"epoch": first // steps, "batch": first % steps}
        assert "dali" in rank_state and rank_state["epoch"] == state["epoch"]
        got, built = _resume(cfg, state, rank_state if how == "dali_checkpoint" else None)
        # restored: one pipeline built from the checkpoint; replay: built fresh, its first batches discarded
        assert built == ([rank_state["dali"]] if how == "dali_checkpoint" else [None])
        for g, r in zip(got, ref[first : first + 2]):
            assert g.keys == r.keys
            for a, b in zip(g.views, r.views):
                assert torch.equal(a, b)  # same reader position and generator states as the uninterrupted run


def test_unusable_dali_checkpoint_falls_back_to_replay(jpeg_shards):
    cfg = make_cfg(jpeg_shards)
    ref = take(dali_loader(cfg), 6)
    bogus = {"epoch": 0, "batch": 4, "segment": 0, "dali": b"not a checkpoint"}
    got, built = _resume(cfg, {"epoch": 0, "batch": 4}, bogus)
    assert built == [b"not a checkpoint", None]
    assert [g.keys for g in got] == [r.keys for r in ref[4:6]]
    # a checkpoint of another position is not used at all
    got, built = _resume(cfg, {"epoch": 0, "batch": 4}, _state_after(str(jpeg_shards), 3)[1])
    assert built == [None] and [g.keys for g in got] == [r.keys for r in ref[4:6]]


def _rank_keys(shards: str, epochs: int, backend: str = "dali") -> tuple[int, list[list[str]]]:
    env = DistEnv(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    cfg = make_cfg(shards)
    if backend == "dali":
        loader = dali_loader(cfg, env, torch.device("cpu"))
    else:
        loader = TorchLoader(cfg, env, torch.device("cpu"), method_recipe(cfg))
    batches = take(loader, epochs * loader.steps_per_epoch)
    per_epoch = [[k for b in batches[e * loader.steps_per_epoch : (e + 1) * loader.steps_per_epoch] for k in b.keys]
                 for e in range(epochs)]
    return loader.steps_per_epoch, per_epoch


@pytest.mark.multirank
def test_two_ranks_read_disjoint_samples_with_the_torch_backends_plan(jpeg_shards):
    results = run_ranks(_rank_keys, str(jpeg_shards), 2, world_size=2, init_pg=False, timeout=300)
    steps = {s for s, _ in results}
    assert steps == {70 // 8}  # equal step counts on every rank
    for epoch in range(2):
        k0, k1 = results[0][1][epoch], results[1][1][epoch]
        assert len(k0) == len(k1) == 8 * 4
        assert len(set(k0)) == len(k0) and not set(k0) & set(k1)
    assert results[0][1][0] != results[0][1][1]  # epoch-seeded order
    # the same plan as the torch backend: each rank reads the same samples in each epoch (in another order)
    torch_results = run_ranks(_rank_keys, str(jpeg_shards), 2, "torch", world_size=2, init_pg=False, timeout=300)
    for rank in range(2):
        for epoch in range(2):
            assert sorted(results[rank][1][epoch]) == sorted(torch_results[rank][1][epoch])


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _bad_shards(tmp_path: Path, bad: bytes | None) -> Path:
    """Good shards, then one sample replaced: ``bad`` image bytes, or (None) no image at all."""
    root = tmp_path / "shards"
    write_shards(jpeg_items(12), root, shard_size=12, image_format="jpg", progress=False)
    tar_path = root / "shard-000000.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    out = []
    for name, data in members:
        if name == "000000005.jpg":
            if bad is None:
                continue
            data = bad
        out.append((name, data))
    _tar(tar_path, out)
    write_dali_index(tar_path, root / "shard-000000.idx")
    return root


def test_sample_without_image_is_replaced_and_counted(tmp_path):
    cfg = make_cfg(_bad_shards(tmp_path, None))
    cfg.data.verify = "none"  # the tar was rewritten after the manifest
    loader = dali_loader(cfg)
    assert loader.num_samples == 12 and loader.steps_per_epoch == 3  # the plan counts it: it is replaced, not dropped
    batches = take(loader, 2 * loader.steps_per_epoch)
    assert all(b.size == 4 and len(b.keys) == 4 for b in batches)
    keys = [k for b in batches for k in b.keys]
    assert "000000005" not in keys and len(set(keys)) == 11
    assert loader.bad_samples == 2 == sum(b.num_bad for b in batches)  # once per epoch
    assert "no jpg" in loader.last_bad and "sample 5" in loader.last_bad


def _jpeg_bytes(kind: str) -> bytes:
    from PIL import Image

    good = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((24, 30, 3)) * 255).astype(np.uint8)).save(good, "JPEG")
    return b"not a jpeg at all" if kind == "garbage" else good.getvalue()[: len(good.getvalue()) // 2]


def _undecodable_cfg(root: Path, reader: str = "native"):
    cfg = make_cfg(root, dali_reader=reader)
    cfg.data.verify = "none"
    return cfg


def _state_after_cfg(root: str, n: int, reader: str) -> tuple[dict, dict, list]:
    loader = dali_loader(_undecodable_cfg(Path(root), reader))
    batches = take(loader, n)
    return loader.state_dict(), loader.rank_state_dict(), [b.keys for b in batches]


@pytest.mark.parametrize(("kind", "reader"), [("garbage", "native"), ("truncated", "native"), ("garbage", "stream")])
def test_undecodable_image_is_replaced_counted_and_resumed_exactly(tmp_path, kind, reader):
    root = _bad_shards(tmp_path, _jpeg_bytes(kind))
    cfg = _undecodable_cfg(root, reader)
    loader = dali_loader(cfg)
    steps = loader.steps_per_epoch
    assert steps == 3
    ref = take(loader, 2 * steps)
    assert all(b.size == 4 and all(v.shape[0] == 4 for v in b.views) for b in ref)  # full batches, always
    keys = [k for b in ref for k in b.keys]
    assert "000000005" not in keys and len(set(keys)) == 11
    assert loader.bad_samples == 2 and [b.num_bad for b in ref].count(1) == 2
    assert f"{root / 'shard-000000.tar'} sample 5" in loader.last_bad and "does not decode" in loader.last_bad
    hit = next(i for i, b in enumerate(ref) if b.num_bad)  # the batch whose pipeline failed and was rebuilt
    # resume in another process, before the failure and after it: the same batches as the uninterrupted run
    for first in sorted({hit, hit + 1, steps + 1}):
        (state, rank_state, _), = run_ranks(_state_after_cfg, str(root), first, reader, world_size=1, init_pg=False)
        if first > hit:
            assert rank_state["undecodable"] == {str(root / "shard-000000.tar"): [5]}
        resumed = dali_loader(cfg)
        resumed.load_state_dict(state)
        resumed.load_rank_state_dict(rank_state)
        got = take(resumed, 2 * steps - first)
        for g, r in zip(got, ref[first:]):
            assert g.keys == r.keys
            for a, b in zip(g.views, r.views):
                assert torch.equal(a, b)
        assert resumed.bad_samples == loader.bad_samples


_READ_ALL = """
import sys
import torch
from pipeline.config import config_from_dict
from pipeline.data.dali_loader import DaliLoader
from pipeline.distributed import DistEnv
from pipeline.methods import method_recipe

cfg = config_from_dict({"data": {"train_shards": sys.argv[1], "verify": sys.argv[2]},
                        "loader": {"backend": "dali", "batch_size": 8, "num_workers": 2, "shuffle_buffer": 16},
                        "augment": {"image_size": 16}})
loader = DaliLoader(cfg, DistEnv(), torch.device("cpu"), method_recipe(cfg))
it = iter(loader)
sizes = {next(it).size for _ in range(2 * loader.steps_per_epoch)}
print(f"RESULT bad_samples={loader.bad_samples} sizes={sorted(sizes)}")
"""


@pytest.mark.parametrize("damage", ["zeroed", "truncated"])
def test_damaged_tar_never_crashes_the_process(tmp_path, damage):
    """A shard damaged after its index was written: 64 KiB zeroed in place (same size, so data.verify=size passes),
    or cut inside its last image with the old index kept (which made DALI read past its memory map: SIGSEGV).
    In a fresh process: it reads two epochs of full batches, counts the damaged samples as bad and names the
    shard."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    items = [Item(f"n{i}", (rng.random((96, 128, 3)) * 255).astype(np.uint8), "png", i % 3) for i in range(24)]
    root = tmp_path / "shards"
    write_shards(items, root, shard_size=12, image_format="jpg", progress=False)  # noise JPEGs: ~25 KiB each
    tar = root / "shard-000000.tar"
    if damage == "zeroed":
        with open(tar, "r+b") as f:
            f.seek(tar.stat().st_size // 3)
            f.write(b"\0" * 65536)
        verify = "size"
    else:
        last = (root / "shard-000000.idx").read_text().splitlines()[-1].split()
        os.truncate(tar, int(last[1]) + int(last[2]) // 2)
        verify = "none"  # a source without sizes to check, as most users' shards are
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _READ_ALL, str(root), verify], check=False, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])  # not -11 (SIGSEGV) nor -7 (SIGBUS)
    result = proc.stdout.strip().splitlines()[-1]
    bad = int(result.split("bad_samples=")[1].split()[0])
    assert bad > 0 and result.endswith("sizes=[8]")
    assert f"of {tar} cannot be read and count as bad samples" in proc.stdout
    # a training run on it: past data.max_bad_fraction (default 0.001) it stops with one line naming the shard
    from tests.conftest import tiny_overrides

    overrides = tiny_overrides({"train": root, "test": root}, tmp_path / "run", **{
        "data.verify": verify, "data.eval_train_shards": "", "data.eval_test_shards": "", "loader.backend": "dali",
        "loader.batch_size": 8, "augment.image_size": 16, "model.img_size": 16, "model.patch_size": 8,
        "train.steps": 4, "launcher.nprocs": 1})
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", str(ROOT / "configs/quickstart.yaml"),
                           *overrides], check=False, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    last = proc.stderr.strip().splitlines()[-1]
    assert "data.max_bad_fraction=0.001" in last and str(tar) in last, last


def test_missing_index_is_created_or_reported_with_its_command(tmp_path, monkeypatch):
    root = tmp_path / "shards"
    write_shards(jpeg_items(8), root, shard_size=8, image_format="jpg", progress=False)
    idx = root / "shard-000000.idx"
    expected = idx.read_text()
    idx.unlink()
    take(dali_loader(make_cfg(root)), 1)  # written when this rank first reads the shard
    assert idx.read_text() == expected

    idx.unlink()

    def read_only(url, out, policy=None):
        raise PermissionError(13, "Permission denied", str(out))

    monkeypatch.setattr(D, "index_shard", read_only)
    with pytest.raises(ShardError, match=f"pipeline shards index {root / 'shard-000000.tar'}"):
        take(dali_loader(make_cfg(root)), 1)


def test_captions_pass_through_the_clip_recipe(tmp_path):
    rng = np.random.default_rng(0)
    items = [Item(f"c{i}", (rng.random((20, 20, 3)) * 255).astype(np.uint8), "png", None, f"caption number {i}")
             for i in range(8)]
    write_shards(items, tmp_path / "caps", image_format="jpg", progress=False)
    cfg = make_cfg(tmp_path / "caps")
    cfg.augment.recipe = "clip"
    batch = take(dali_loader(cfg), 1)[0]
    assert len(batch.views) == 1
    assert [t for t in batch.texts] == [f"caption number {int(k)}" for k in batch.keys]
    assert (batch.labels == -1).all()


@pytest.mark.slow
def test_training_run_with_the_dali_backend(fmnist_shards, tmp_path):
    from pipeline.trainer import train
    from tests.conftest import tiny_overrides

    cfg = load_config("configs/quickstart.yaml", tiny_overrides(fmnist_shards, tmp_path / "run", **{
        "loader.backend": "dali", "train.steps": 4, "checkpoint.every_steps": 2, "launcher.nprocs": 1}))
    summary = train(cfg)
    assert summary["steps"] == 4 and np.isfinite(summary["final_loss"])


@pytest.mark.gpu
def test_mixed_decode_on_the_gpu(jpeg_shards):
    loader = dali_loader(make_cfg(jpeg_shards), DistEnv(), torch.device("cuda", 0))
    batch = take(loader, 1)[0]
    assert all(v.is_cuda and v.shape == (4, 3, 16, 16) for v in batch.views)
    assert batch.labels.is_cuda


def test_auto_backend_is_dali_where_installed(jpeg_shards):
    from pipeline.data.loader import build_loader, resolve_backend

    cfg = make_cfg(jpeg_shards, backend="auto")
    assert cfg.loader.backend == "auto" == config_from_dict({}).loader.backend  # the default
    assert resolve_backend(cfg) == "dali"
    assert isinstance(build_loader(cfg, DistEnv(), torch.device("cpu"), method_recipe(cfg)), D.DaliLoader)
    cfg.loader.backend = "torch"
    assert isinstance(build_loader(cfg, DistEnv(), torch.device("cpu"), method_recipe(cfg)), TorchLoader)


@pytest.mark.parametrize("source", ["dir", "brace", "list"])
def test_stream_reader_yields_the_native_readers_batches(jpeg_shards, source):
    """Same plan, order and generator seeds: streaming the shards into DALI gives bit-identical batches, whatever
    form the source is written in."""
    spec = {"dir": str(jpeg_shards), "brace": f"{jpeg_shards}/shard-{{000000..000003}}.tar",
            "list": [str(p) for p in sorted(jpeg_shards.glob("*.tar"))]}[source]
    native = make_cfg(jpeg_shards, dali_reader="native")
    stream = make_cfg(jpeg_shards, dali_reader="stream")
    stream.data.train_shards = spec
    a, b = dali_loader(native), dali_loader(stream)
    assert (a.mode, b.mode) == ("native", "stream") and a.steps_per_epoch == b.steps_per_epoch
    for x, y in zip(take(a, a.steps_per_epoch + 2), take(b, b.steps_per_epoch + 2)):
        assert x.keys == y.keys and torch.equal(x.labels, y.labels)
        for u, v in zip(x.views, y.views):
            assert torch.equal(u, v)


# ---------------------------------------------------------------------------------------------------------------
# Every kind of source (the S3 and HTTP servers are real, on 127.0.0.1: tests/data_servers.py)


def _same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys == y.keys and torch.equal(x.labels, y.labels)
        for u, v in zip(x.views, y.views):
            assert torch.equal(u, v)


def _remote_cfg(spec, cache: Path, reader: str):
    cfg = make_cfg(spec, dali_reader=reader)
    cfg.data.cache_dir = str(cache)
    return cfg


def test_s3_is_read_natively_by_dali_or_streamed_into_it(jpeg_shards, s3_server, tmp_path, capsys):
    """DALI's own reader on s3:// (its AWS SDK, AWS_ENDPOINT_URL of the moto server) and the stream reader give
    the batches of the same shards read from local disk; the log line says which reader ran."""
    url = s3_server.upload(jpeg_shards, "dali-native/shards")
    ref = take(dali_loader(make_cfg(jpeg_shards)), 5)
    native = dali_loader(_remote_cfg(url, tmp_path / "cache", "native"))
    assert native.mode == "native"
    assert "DALI's webdataset reader reads the shards itself" in capsys.readouterr().out
    _same_batches(take(native, 5), ref)
    assert all(Path(r.index).is_relative_to(tmp_path / "cache") for r in native._refs.values())  # indexes cached
    streamed = dali_loader(_remote_cfg(url, tmp_path / "cache", "auto"))
    assert streamed.mode == "stream"
    assert "streamed whole by a reader thread into DALI's external_source" in capsys.readouterr().out
    _same_batches(take(streamed, 5), ref)


@pytest.mark.parametrize("kind", ["http", "pipe"])
def test_http_and_pipe_sources_are_streamed_into_dali(jpeg_shards, http_server, tmp_path, capsys, kind):
    import shutil

    from pipeline.data.sources import index_source

    if kind == "http":
        shutil.copytree(jpeg_shards, http_server.root / "dali-shards")
        spec = f"{http_server.url}/dali-shards"
    else:
        spec = f"pipe:cat {jpeg_shards}/shard-{{000000..000003}}.tar"
        index_source(spec, cache_dir=str(tmp_path / "cache"), progress=False)  # counts, once (shards index)
    ref = take(dali_loader(make_cfg(jpeg_shards)), 5)
    loader = dali_loader(_remote_cfg(spec, tmp_path / "cache", "auto"))
    assert loader.mode == "stream"
    assert "streamed whole by a reader thread into DALI's external_source" in capsys.readouterr().out
    _same_batches(take(loader, 5), ref)
    with pytest.raises(Exception, match="DALI's reader opens local files and s3:// only"):
        dali_loader(_remote_cfg(spec, tmp_path / "cache", "native"))


def test_shardwriter_shards_with_json_captions(wds_shards, tmp_path):
    """img2dataset's layout (webdataset.ShardWriter, _stats.json counts, no manifest, no index): captions and
    labels from a field of the json member, on both readers."""
    out = []
    for reader in ("native", "stream"):
        cfg = make_cfg(wds_shards, dali_reader=reader)
        cfg.data.cache_dir = str(tmp_path / "cache")
        cfg.augment.recipe = "clip"
        cfg.data.text_key, cfg.data.label_key = "json:caption", "json:label"
        batches = take(dali_loader(cfg), 3)
        for b in batches:
            assert b.texts == [f"a photo number {int(k[5:])}" for k in b.keys]
            assert b.labels.tolist() == [int(k[5:]) % 3 for k in b.keys]
        out.append(batches)
    _same_batches(*out)


def test_weighted_mixture_follows_the_torch_backends_plan(jpeg_shards, wds_shards, tmp_path):
    spec = [{"shards": str(jpeg_shards), "weight": 0.5}, {"shards": str(wds_shards), "weight": 2}]
    keys = {}
    for backend in ("dali", "torch"):
        cfg = make_cfg(jpeg_shards)
        cfg.data.train_shards, cfg.data.cache_dir = spec, str(tmp_path / "cache")
        loader = (dali_loader(cfg) if backend == "dali" else
                  TorchLoader(cfg, DistEnv(), torch.device("cpu"), method_recipe(cfg)))
        assert loader.steps_per_epoch == (35 + 2 * 84) // 4
        keys[backend] = sorted(k for b in take(loader, loader.steps_per_epoch) for k in b.keys)
    assert keys["dali"] == keys["torch"]
    assert len(keys["dali"]) - len(set(keys["dali"])) >= 84 - 3  # weight 2: the second stream's samples twice
