import itertools

import pytest
import torch

from pipeline.config import load_config
from pipeline.data.plan import epoch_spans, plan_range, shard_order, steps_per_epoch
from pipeline.data.shards import ShardError, open_shards
from pipeline.data.torch_loader import TorchLoader
from pipeline.distributed import DistEnv
from pipeline.methods import method_recipe
from tests.conftest import tiny_overrides

CPU = torch.device("cpu")


def _cfg(shards, tmp_path, **extra):
    return load_config("configs/quickstart.yaml", tiny_overrides(shards, tmp_path / "run", **extra))


def _epoch_keys(cfg, world, epoch=0):
    """Keys each rank's loader yields in one epoch, per batch."""
    out = []
    for rank in range(world):
        ld = TorchLoader(cfg, DistEnv(rank=rank, world_size=world), CPU, method_recipe(cfg))
        ld.load_state_dict({"epoch": epoch, "batch": 0})
        out.append([b.keys for b in itertools.islice(iter(ld), ld.steps_per_epoch)])
    return out


@pytest.mark.parametrize("world, workers", [(2, 1), (2, 2), (3, 2)])
def test_each_sample_read_once_per_epoch_with_equal_steps(fmnist_shards, tmp_path, world, workers):
    cfg = _cfg(fmnist_shards, tmp_path, **{"loader.num_workers": workers})
    shards = open_shards(fmnist_shards["train"])
    assert len(set(shards.counts)) > 1  # uneven shards (300 x 6 + 248): the case that hangs peers' DDP
    per_rank = _epoch_keys(cfg, world)
    steps = steps_per_epoch(shards.num_samples, 32, world)
    assert [len(r) for r in per_rank] == [steps] * world  # same number of steps on every rank: no hang
    keys = [k for r in per_rank for batch in r for k in batch]
    assert len(keys) == len(set(keys)) == steps * 32 * world  # disjoint, and covering the usable set


def test_epochs_differ_and_are_reproducible(fmnist_shards, tmp_path):
    cfg = _cfg(fmnist_shards, tmp_path)
    e0, e0_again, e1 = _epoch_keys(cfg, 1, 0), _epoch_keys(cfg, 1, 0), _epoch_keys(cfg, 1, 1)
    assert e0 == e0_again
    assert e0 != e1


def test_resume_mid_epoch_continues_with_identical_batches(fmnist_shards, tmp_path):
    cfg = _cfg(fmnist_shards, tmp_path, **{"loader.num_workers": 2})
    env = DistEnv(rank=1, world_size=2)
    full = TorchLoader(cfg, env, CPU, method_recipe(cfg))
    it = iter(full)
    batches = [next(it) for _ in range(full.steps_per_epoch + 3)]  # crosses into the next epoch
    for cut in (5, full.steps_per_epoch - 1):
        resumed = TorchLoader(cfg, env, CPU, method_recipe(cfg))
        resumed.load_state_dict({"epoch": 0, "batch": cut})
        rest = list(itertools.islice(iter(resumed), len(batches) - cut))
        for a, b in zip(batches[cut:], rest):
            assert a.keys == b.keys
            for va, vb in zip(a.views, b.views):
                assert torch.equal(va, vb)  # same pixels: augmentation is seeded per sample, not per worker


def test_next_epoch_workers_start_before_the_epoch_ends(fmnist_shards, tmp_path):
    """The next epoch's DataLoader (and its workers) is created while the last prefetch_factor x workers batches of
    the current one are consumed, not after its last batch: no idle steps at every epoch boundary."""
    cfg = _cfg(fmnist_shards, tmp_path, **{"loader.num_workers": 2, "loader.prefetch_factor": 2})
    made = []

    class Recording(TorchLoader):
        def _epoch_loader(self, epoch, skip_batches):
            made.append((epoch, skip_batches, self.epoch, self.batch))  # which loader, and where the run was
            return super()._epoch_loader(epoch, skip_batches)

    ld = Recording(cfg, DistEnv(), CPU, method_recipe(cfg))
    steps = ld.steps_per_epoch
    assert steps > 4
    batches = list(itertools.islice(iter(ld), steps + 1))
    assert made == [(0, 0, 0, 0), (1, 0, 0, steps - 4)]
    assert (ld.epoch, ld.batch) == (1, 1) and len(batches) == steps + 1


def test_two_views_differ_and_are_normalised(fmnist_shards, tmp_path):
    cfg = _cfg(fmnist_shards, tmp_path)
    batch = next(iter(TorchLoader(cfg, DistEnv(), CPU, method_recipe(cfg))))
    v1, v2 = batch.views
    assert v1.shape == v2.shape == (32, 3, 28, 28) and v1.dtype == torch.float32
    assert not torch.equal(v1, v2)
    assert batch.labels.min() >= 0 and batch.labels.max() <= 9
    assert -3 < v1.mean() < 3


def test_plan_range_spans_shard_boundaries(fmnist_shards):
    shards = open_shards(fmnist_shards["train"])
    spans = plan_range(epoch_spans(shards, 0, 0), 250, 700)
    order = shard_order(len(shards.paths), 0, 0)
    assert [s.path for s in spans] == [str(shards.paths[i]) for i in order[:3]]
    assert sum(s.stop - s.start for s in spans) == 450
    assert spans[0].start == 250 and len(spans) == 3


def test_truncated_shard_counts_its_lost_samples_and_errors_name_the_shard(fmnist_shards, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(fmnist_shards["train"], bad)
    cfg = _cfg({**fmnist_shards, "train": bad}, tmp_path, **{"data.verify": "none", "loader.num_workers": 0,
                                             "loader.shuffle_buffer": 0})
    shard = bad / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:40_000])  # truncate mid-sample: most of its 300 samples are gone
    ld = TorchLoader(cfg, DistEnv(), CPU, method_recipe(cfg))
    batches = list(itertools.islice(iter(ld), ld.steps_per_epoch))
    assert all(b.size == 32 for b in batches)  # every batch keeps its size: lost samples were replaced
    lost = sum(b.num_bad for b in batches)
    assert 250 < lost < 300 and ld.bad_samples == lost
    assert "shard-000000.tar" in ld.last_bad and "truncated" in ld.last_bad
    cfg = _cfg(fmnist_shards, tmp_path, **{"data.image_key": "jpg"})
    with pytest.raises(ShardError, match="no 'jpg' field"):
        TorchLoader(cfg, DistEnv(), CPU, method_recipe(cfg))
    with pytest.raises(ShardError, match="fewer than one global batch"):
        cfg = _cfg(fmnist_shards, tmp_path, **{"loader.batch_size": 4096})
        TorchLoader(cfg, DistEnv(), CPU, method_recipe(cfg))
