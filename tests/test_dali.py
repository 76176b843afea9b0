"""DALI backend on DALI's CPU backend (real nvidia-dali wheel); GPU decode behind the gpu marker."""

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

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


def _state_after(shards: str, n: int) -> tuple[dict, dict]:
    """In a fresh process: the loader's job and rank state after ``n`` batches."""
    loader = dali_loader(make_cfg(shards))
    it = iter(loader)  # kept alive, as in the trainer: the state is taken between two batches
    for _ in range(n):
        next(it)
    return loader.state_dict(), loader.rank_state_dict()


def _resume(cfg, state: dict, rank_state: dict | None) -> tuple[list, list]:
    """Batches of a loader resumed at ``state``, and the DALI checkpoints its pipelines were built from."""
    loader = dali_loader(cfg)
    built, build = [], loader.build_pipeline
    loader.build_pipeline = lambda epoch, checkpoint=None: built.append(checkpoint) or build(epoch, checkpoint)
    loader.load_state_dict(state)
    if rank_state is not None:
        loader.load_rank_state_dict(rank_state)
    return take(loader, 2), built


@pytest.mark.parametrize("how", ["dali_checkpoint", "replay"])
def test_resume_mid_epoch_continues_exactly(jpeg_shards, how):
    cfg = make_cfg(jpeg_shards)
    steps = dali_loader(cfg).steps_per_epoch
    ref = take(dali_loader(cfg), steps + 3)
    for first in (5, steps + 1):
        # the state is taken in another process, as after a crash: DALI's checkpoint must travel
        (state, rank_state), = run_ranks(_state_after, str(jpeg_shards), first, world_size=1, init_pg=False)
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
    got, built = _resume(cfg, {"epoch": 0, "batch": 4}, {"epoch": 0, "batch": 4, "dali": b"not a checkpoint"})
    assert built == [b"not a checkpoint", None]
    assert [g.keys for g in got] == [r.keys for r in ref[4:6]]
    # a checkpoint of another position is not used at all
    got, built = _resume(cfg, {"epoch": 0, "batch": 4}, _state_after(str(jpeg_shards), 3)[1])
    assert built == [None] and [g.keys for g in got] == [r.keys for r in ref[4:6]]


def _rank_keys(shards: str, epochs: int) -> tuple[int, list[list[str]]]:
    env = DistEnv(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    loader = dali_loader(make_cfg(shards), env, torch.device("cpu"))
    batches = take(loader, epochs * loader.steps_per_epoch)
    per_epoch = [[k for b in batches[e * loader.steps_per_epoch : (e + 1) * loader.steps_per_epoch] for k in b.keys]
                 for e in range(epochs)]
    return loader.steps_per_epoch, per_epoch


@pytest.mark.multirank
def test_two_ranks_read_disjoint_samples_each_epoch(jpeg_shards):
    results = run_ranks(_rank_keys, str(jpeg_shards), 2, world_size=2, init_pg=False, timeout=300)
    steps = {s for s, _ in results}
    assert steps == {70 // 8}  # equal step counts on every rank
    for epoch in range(2):
        k0, k1 = results[0][1][epoch], results[1][1][epoch]
        assert len(k0) == len(k1) == 8 * 4
        assert len(set(k0)) == len(k0) and not set(k0) & set(k1)


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


def test_sample_without_image_is_skipped_and_counted(tmp_path):
    cfg = make_cfg(_bad_shards(tmp_path, None))
    cfg.data.verify = "none"  # the tar was rewritten after the manifest
    loader = dali_loader(cfg)
    assert loader.skipped == 1 and loader.num_samples == 11 and loader.steps_per_epoch == 2
    keys = [k for b in take(loader, 2 * loader.steps_per_epoch) for k in b.keys]
    assert "000000005" not in keys


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_undecodable_image_names_shard_and_key(tmp_path, kind):
    good = io.BytesIO()
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((24, 30, 3)) * 255).astype(np.uint8)).save(good, "JPEG")
    bad = b"not a jpeg at all" if kind == "garbage" else good.getvalue()[: len(good.getvalue()) // 2]
    root = _bad_shards(tmp_path, bad)
    cfg = make_cfg(root, batch_size=12)
    cfg.data.verify = "none"
    loader = dali_loader(cfg)
    with pytest.raises(ShardError) as err:
        take(loader, 1)
    assert f"{root / 'shard-000000.tar'}:000000005" in str(err.value)


def test_missing_index_is_created_or_reported_with_its_command(tmp_path, monkeypatch):
    root = tmp_path / "shards"
    write_shards(jpeg_items(8), root, shard_size=8, image_format="jpg", progress=False)
    idx = root / "shard-000000.idx"
    expected = idx.read_text()
    idx.unlink()
    dali_loader(make_cfg(root))
    assert idx.read_text() == expected

    idx.unlink()

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(idx))

    monkeypatch.setattr(D, "write_dali_index", read_only)
    with pytest.raises(ShardError, match=f"wds2idx {root / 'shard-000000.tar'} {idx}"):
        dali_loader(make_cfg(root))


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


def test_auto_backend_is_dali_where_installed_and_readable(jpeg_shards):
    from pipeline.data.loader import build_loader, resolve_backend

    cfg = make_cfg(jpeg_shards, backend="auto")
    assert cfg.loader.backend == "auto" == config_from_dict({}).loader.backend  # the default
    assert resolve_backend(cfg) == "dali"
    assert isinstance(build_loader(cfg, DistEnv(), torch.device("cpu"), method_recipe(cfg)), D.DaliLoader)
    cfg.data.label_key = "label.txt"  # a field the DALI backend does not read: auto keeps to torch
    assert resolve_backend(cfg) == "torch"
    assert isinstance(build_loader(cfg, DistEnv(), torch.device("cpu"), method_recipe(cfg)), TorchLoader)
