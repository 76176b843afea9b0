"""The DALI backend's index checks and per-rank order (pure Python: no DALI needed)."""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.dali_index import (
    EntryCache,
    Fields,
    ShardRef,
    block_shuffled,
    read_entries,
    replace_bad,
    runs,
    write_run_indexes,
)
from pipeline.data.shards import Item, ShardError, write_dali_index, write_shards

FIELDS = Fields(("jpg", "png"), "cls", None)


@pytest.fixture
def shard(tmp_path):
    rng = np.random.default_rng(0)
    items = [Item(f"n{i}", (rng.random((64, 64, 3)) * 255).astype(np.uint8), "png", i % 3) for i in range(10)]
    write_shards(items, tmp_path, shard_size=10, image_format="jpg", progress=False)
    tar = tmp_path / "shard-000000.tar"
    return ShardRef(str(tar), str(tmp_path / "shard-000000.idx"), 10, tar.stat().st_size)


def test_a_sound_shard_has_no_bad_entries(shard):
    entries = read_entries(shard, FIELDS)
    assert entries.bad == {} and len(entries.lines) == 10
    off, size, name = entries.image_member(3, FIELDS.image_exts)
    with open(shard.url, "rb") as f:
        f.seek(off)
        assert f.read(size)[:2] == b"\xff\xd8" and name == "000000003.jpg"  # a JPEG's first bytes


def test_zeroed_region_and_truncation_are_bad_samples_not_reads_past_the_end(shard):
    lines = Path(shard.index).read_text().splitlines()[1:]
    fourth = int(lines[4].split()[1]) - 512  # the header of sample 4's image
    with open(shard.url, "r+b") as f:
        f.seek(fourth)
        f.write(b"\0" * 512)
    bad = read_entries(shard, FIELDS).bad
    assert list(bad) == [4] and "no tar header before it" in bad[4]
    last = lines[9].split()
    with open(shard.url, "r+b") as f:
        f.truncate(int(last[1]) + 100)  # inside the last image: the old index now points past the end
    bad = read_entries(shard, FIELDS).bad
    assert 9 in bad and "past the end of the file" in bad[9]


def test_a_stale_index_fails_the_probes_then_every_header_is_checked(shard, tmp_path):
    other = tmp_path / "other.tar"  # same members, written with other sizes: every offset moves
    with tarfile.open(shard.url) as src, tarfile.open(other, "w", format=tarfile.USTAR_FORMAT) as dst:
        for m in src:
            data = src.extractfile(m).read() + b"\0" * 700
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    stale = ShardRef(str(other), shard.index, 10, None)
    assert set(read_entries(stale, FIELDS).bad) == set(range(10))


def test_missing_image_and_two_images_per_sample(tmp_path):
    tar = tmp_path / "x.tar"
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in [("a.png", b"P" * 10), ("a.jpg", b"J" * 10), ("a.cls", b"1"), ("b.cls", b"2")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    write_dali_index(tar, tmp_path / "x.idx")
    ref = ShardRef(str(tar), str(tmp_path / "x.idx"), 2, None)
    entries = read_entries(ref, FIELDS)
    assert entries.bad == {1: "no jpg/png member"}
    assert entries.lines[0].split()[0::4] == [b"jpg", b"cls"]  # jpg preferred, the png dropped from the line
    cache = EntryCache(FIELDS)
    assert cache.get(ref).lines[0] == entries.lines[0]
    assert cache.get(ref).lines[0] == entries.lines[0]  # from what the first scan learned
    with pytest.raises(ShardError, match="not a DALI webdataset index"):
        read_entries(ShardRef(str(tar), str(tar), 2, None), FIELDS)


def test_replacements_stay_in_their_batch_and_prefer_the_same_shard():
    shard = np.array([0, 0, 1, 1, 1, 1, 2, 2])
    sample = np.arange(8)
    order = replace_bad(shard, sample, {1: {3: "bad"}, 2: {6: "bad", 7: "bad"}}, 4, ["a", "b", "c"])
    assert order.replaced.tolist() == [False, False, False, True, False, False, True, True]
    assert (order.shard[3], order.sample[3]) == (1, 2)  # same batch, same shard, nearest
    assert order.shard[6] == order.shard[7] == 1  # same batch, the shard 2 part is all bad
    assert order.origin[6] == (2, 6, "bad")
    with pytest.raises(ShardError, match="no readable sample"):
        replace_bad(shard, sample, {s: {int(i): "bad" for i in sample[shard == s]} for s in (0, 1, 2)}, 4,
                    ["a", "b", "c"])


def test_block_shuffle_keeps_each_span_and_runs_split_at_shard_changes(tmp_path, shard):
    spans = [(0, 2, 9), (1, 0, 5)]
    s, i = block_shuffled(spans, 3, np.random.default_rng(0))
    assert s.tolist() == [0] * 7 + [1] * 5
    assert sorted(i[:3].tolist()) == [2, 3, 4] and sorted(i[7:10].tolist()) == [0, 1, 2]  # blocks of 3 in place
    order = replace_bad(s, i, {}, 4, ["a", "b"])
    assert [(r, list(x)) for r, x in runs(order, 4)] == [(0, i[4:7].tolist()), (1, i[7:].tolist())]
    refs = [shard, shard]
    paths = write_run_indexes(runs(order, 0), lambda k: refs[k], EntryCache(FIELDS), tmp_path / "plan")
    text = Path(paths[0]).read_text().splitlines()
    assert text[0] == "v1.2 7" and len(text) == 8
    assert write_run_indexes(runs(order, 0), lambda k: refs[k], EntryCache(FIELDS), tmp_path / "plan") == paths
