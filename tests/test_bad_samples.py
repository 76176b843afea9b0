"""Bad data at corpus scale is counted, not fatal (torch backend): undecodable images and samples lost to a
damaged tar are replaced inside their batch, counted, and resume stays exact."""

import itertools
import tarfile

import torch

from pipeline.config import config_from_dict
from pipeline.data.plan import Span
from pipeline.data.sources import resolve_source
from pipeline.data.torch_loader import TorchLoader, iter_span_samples
from pipeline.distributed import DistEnv
from pipeline.methods import method_recipe
from tests.data_servers import write_wds_shards
from tests.test_remote import _corrupt_images

CPU = torch.device("cpu")


def cfg_for(source, tmp_path, **loader):
    return config_from_dict({
        "data": {"train_shards": str(source), "cache_dir": str(tmp_path / "cache")},
        "loader": {"backend": "torch", "batch_size": 8, "num_workers": 2, "shuffle_buffer": 16, **loader},
        "augment": {"image_size": 16},
    })


def test_undecodable_images_are_replaced_counted_and_resume_stays_exact(tmp_path):
    root = write_wds_shards(tmp_path / "shards", (24, 24, 16))
    bad = sum(_corrupt_images(root / f"{i:05d}.tar", every=7) for i in range(3))  # 4 + 4 + 3
    cfg = cfg_for(root, tmp_path)
    loader = TorchLoader(cfg, DistEnv(), CPU, method_recipe(cfg))
    steps = loader.steps_per_epoch
    assert steps == 64 // 8
    batches = list(itertools.islice(iter(loader), steps + 2))
    assert all(b.size == 8 and b.views[0].shape == (8, 3, 16, 16) for b in batches)  # sizes kept
    assert sum(b.num_bad for b in batches[:steps]) == bad == 11  # every bad image of the epoch, once
    assert loader.bad_samples == sum(b.num_bad for b in batches) and "cannot decode image" in loader.last_bad
    assert loader.rank_state_dict() == {"bad_samples": loader.bad_samples}
    cut = next(i for i, b in enumerate(batches) if b.num_bad)  # resume right at a batch with a replacement
    resumed = TorchLoader(cfg, DistEnv(), CPU, method_recipe(cfg))
    resumed.load_state_dict({"epoch": 0, "batch": cut})
    for a, b in zip(batches[cut:], itertools.islice(iter(resumed), len(batches) - cut)):
        assert a.keys == b.keys and a.num_bad == b.num_bad and torch.equal(a.views[0], b.views[0])


def test_zeroed_region_in_a_shard_is_skipped_not_the_rest_of_it(tmp_path):
    root = write_wds_shards(tmp_path / "shards", (200, 40), seed=3)
    shard = root / "00000.tar"
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 65536] = bytes(65536)  # 64 KiB zeroed in place, same size
    shard.write_bytes(bytes(data))
    items = list(iter_span_samples(Span(str(shard), 0, 200)))
    assert len(items) == 200
    good = [x for x in items if isinstance(x, dict)]
    assert 150 < len(good) < 200  # the reader resyncs after the zeroed blocks: only samples inside them are lost
    from webdataset.tariterators import tarfile_samples

    plain = sum(1 for _ in tarfile_samples([{"url": str(shard)}]))
    assert plain < len(good)  # webdataset's reader takes the first zero block for the end of the tar
    cfg = cfg_for(root, tmp_path, batch_size=16)
    loader = TorchLoader(cfg, DistEnv(), CPU, method_recipe(cfg))
    batches = list(itertools.islice(iter(loader), loader.steps_per_epoch))
    with_image = sum(1 for x in good if "jpg" in x)
    assert len(batches) == 240 // 16 and sum(b.num_bad for b in batches) == 240 - 40 - with_image  # all counted


def test_a_whole_chunk_of_lost_samples_falls_back_to_spares(tmp_path):
    root = write_wds_shards(tmp_path / "shards", (48, 48), seed=4)
    shard = root / "00001.tar"
    with tarfile.open(shard) as tar:
        cut = [m for m in tar][8].offset  # keep 2 samples of 48 (4 members each)
    shard.write_bytes(shard.read_bytes()[:cut])
    cfg = cfg_for(root, tmp_path, batch_size=8, num_workers=0, shuffle_buffer=8)
    loader = TorchLoader(cfg, DistEnv(), CPU, method_recipe(cfg))
    assert resolve_source(str(root), cache_dir=tmp_path / "cache").counts == [48, 48]  # the stats still say 48
    batches = list(itertools.islice(iter(loader), loader.steps_per_epoch))
    assert len(batches) == 12 and all(b.size == 8 for b in batches)
    assert sum(b.num_bad for b in batches) == 46 and "truncated" in loader.last_bad
