"""Data sources on local disk: every form resolves to the same shards, counts come from what is there (manifest,
img2dataset stats, DALI index, tar scan, cache), mixtures follow their weights, fields are found as the ecosystem
names them. Remote sources (S3, HTTP, pipe:) are in test_remote.py."""

import itertools
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, config_from_dict
from pipeline.data.plan import epoch_spans, plan_range
from pipeline.data.shards import ShardError, write_dali_index
from pipeline.data.sources import parse_sources, resolve_source
from pipeline.data.torch_loader import TorchLoader
from pipeline.distributed import DistEnv
from pipeline.methods import method_recipe
from tests.data_servers import write_wds_shards

CPU = torch.device("cpu")
COUNTS = [24, 24, 24, 12]


def cfg_for(source, tmp_path, **data):
    return config_from_dict({
        "data": {"train_shards": source, "cache_dir": str(tmp_path / "cache"), **data},
        "loader": {"backend": "torch", "batch_size": 8, "num_workers": 0, "shuffle_buffer": 16},
        "augment": {"image_size": 16},
    })


def test_every_local_form_resolves_to_the_same_shards(wds_shards, tmp_path, capsys):
    tars = [str(wds_shards / f"{i:05d}.tar") for i in range(4)]
    forms = [str(wds_shards), f"{wds_shards}/{{00000..00003}}.tar", f"{wds_shards}/*.tar",
             f"file://{wds_shards}/{{00000..00001}}.tar::{wds_shards}/0000[23].tar",
             [f"{wds_shards}/00000.tar", f"file://{wds_shards}/00001.tar", f"{wds_shards}/{{00002..00003}}.tar"]]
    for form in forms:
        src = resolve_source(form, cache_dir=tmp_path / "cache", progress=False)
        assert src.paths == tars and src.counts == COUNTS, form
        assert {st.origin for st in src.streams} == {"stats"}  # img2dataset's NNNNN_stats.json
        assert set(src.fields) == {"cls", "jpg", "json", "txt"} and src.image_exts == ["jpg"]
    src = resolve_source(f"{wds_shards}/{{00000..00005}}.tar", cache_dir=tmp_path / "cache", progress=False)
    assert src.counts == COUNTS  # holes in a pattern (img2dataset leaves them) are skipped with a warning
    assert "2 of 6 shards" in capsys.readouterr().err
    with pytest.raises(ShardError, match="shard folder not found"):
        resolve_source(str(tmp_path / "nope"), cache_dir=tmp_path / "cache")


def test_counts_from_each_origin_and_the_cache(wds_shards, fmnist_shards, tmp_path, capsys):
    cache = tmp_path / "cache"
    src = resolve_source(str(fmnist_shards["train"]), cache_dir=cache)
    assert src.streams[0].origin == "manifest" and src.classes[:2] == ["T-shirt/top", "Trouser"]

    idx_only = shutil.copytree(wds_shards, tmp_path / "idx")
    for i in range(4):
        (idx_only / f"{i:05d}_stats.json").unlink()
        write_dali_index(idx_only / f"{i:05d}.tar", idx_only / f"{i:05d}.idx")
    src = resolve_source(str(idx_only), cache_dir=cache)
    assert src.counts == COUNTS and src.streams[0].origin == "idx"
    assert [s.index for s in src.shards] == [str(idx_only / f"{i:05d}.idx") for i in range(4)]

    bare = tmp_path / "bare"
    bare.mkdir()
    for i in range(4):
        shutil.copy(wds_shards / f"{i:05d}.tar", bare)
    with pytest.raises(ShardError) as err:  # too many to scan at start: the exact command that counts them
        resolve_source(str(bare), cache_dir=cache, auto_index=3)
    assert f"pipeline shards index {bare} --cache {cache}" in str(err.value)
    src = resolve_source(str(bare), cache_dir=cache, auto_index=4)  # few and local: rank 0 scans them once
    assert src.counts == COUNTS and src.streams[0].origin == "scan"
    assert "scanning their tar headers once" in capsys.readouterr().err
    assert sorted(p.name for p in bare.glob("*.idx")) == [f"{i:05d}.idx" for i in range(4)]  # beside the shards
    src = resolve_source(str(bare), cache_dir=cache, auto_index=0)
    assert src.counts == COUNTS and src.streams[0].origin == "cache"
    assert list((cache / "sources").glob("*.json"))

    shutil.copy(wds_shards / "00000.tar", bare / "00000.tar.new")
    (bare / "00000.tar").write_bytes((bare / "00000.tar").read_bytes()[:-10240])  # rewritten: the cache is stale
    src = resolve_source(str(bare), cache_dir=cache, auto_index=4)
    assert src.streams[0].origin != "cache"


def test_index_command_writes_what_is_missing_and_copies_nothing(wds_shards, tmp_path):
    from pipeline.cli import main

    bare = tmp_path / "bare"
    bare.mkdir()
    for i in range(4):
        shutil.copy(wds_shards / f"{i:05d}.tar", bare)
    cache = tmp_path / "cache"
    assert main(["shards", "index", str(bare), "--cache", str(cache), "--no-progress"]) == 0
    manifest = json.loads((bare / "manifest.json").read_text())
    assert [s["num_samples"] for s in manifest["shards"]] == COUNTS and manifest["image_key"] == "jpg"
    assert set(manifest["fields"]) == {"cls", "jpg", "json", "txt"}
    for i in range(4):
        assert (bare / f"{i:05d}.idx").read_text().startswith(f"v1.2 {COUNTS[i]}\n")
    assert not list(cache.rglob("*.tar"))
    src = resolve_source(str(bare), cache_dir=cache, auto_index=0)
    assert src.streams[0].origin == "manifest" and src.counts == COUNTS


def test_index_command_on_a_read_only_folder_writes_into_the_cache(wds_shards, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    for i in range(4):
        shutil.copy(wds_shards / f"{i:05d}.tar", ro)
    cache = tmp_path / "cache"
    # A real read-only mount (root ignores file modes): a private mount namespace, ro bind mount of the folder.
    script = (f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && touch {ro}/x 2>/dev/null && exit 3; "
              f"python -m pipeline shards index {ro} --cache {cache} --no-progress")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=env,
                          capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0 and ("unshare" in proc.stderr or "mount" in proc.stderr) and not (cache).exists():
        pytest.skip(f"cannot make a read-only mount here: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stderr
    assert not list(ro.glob("*.idx")) and not (ro / "manifest.json").exists()
    cached = sorted(cache.rglob("*.idx"))
    assert len(cached) == 4 and not list(cache.rglob("*.tar"))
    assert sum(p.stat().st_size for p in cache.rglob("*")) < sum(p.stat().st_size for p in ro.glob("*.tar")) / 10
    src = resolve_source(str(ro), cache_dir=cache, auto_index=0)
    assert src.counts == COUNTS and all(s.index and s.index.startswith(str(cache)) for s in src.shards)


def test_mixture_epochs_follow_the_weights(wds_shards, tmp_path):
    a, b = f"{wds_shards}/{{00000..00001}}.tar", f"{wds_shards}/{{00002..00003}}.tar"  # 48 and 36 samples
    src = resolve_source([{"shards": a, "weight": 2}, {"shards": b, "weight": 0.5}], cache_dir=tmp_path / "c")
    assert src.weighted and src.num_samples == 84 and src.epoch_samples == 2 * 48 + 18
    seen_b = []
    for epoch in range(3):
        spans = epoch_spans(src, seed=0, epoch=epoch)
        per_shard = Counter()
        for s in spans:
            per_shard[Path(s.path).name] += s.stop - s.start
        assert per_shard["00000.tar"] == per_shard["00001.tar"] == 48  # each sample twice
        assert per_shard["00002.tar"] + per_shard["00003.tar"] == 18  # a seeded half
        seen_b.append(tuple(sorted((Path(s.path).name, s.stop) for s in spans if s.path.endswith(("2.tar", "3.tar")))))
    assert len(set(seen_b)) > 1  # a different half in different epochs
    assert epoch_spans(src, 0, 1) == epoch_spans(src, 0, 1)

    cfg = cfg_for([{"shards": a, "weight": 2}, {"shards": b, "weight": 0.5}], tmp_path, image_key="jpg")
    cfg.loader.batch_size = 6  # 114 samples = 19 batches: nothing dropped
    loader = TorchLoader(cfg, DistEnv(), CPU, method_recipe(cfg))
    assert loader.steps_per_epoch == 19
    keys = Counter(k for batch in itertools.islice(iter(loader), 19) for k in batch.keys)
    assert sum(keys.values()) == 114
    assert all(keys[k] == 2 for k in keys if k.startswith(("00000", "00001")))
    assert len([k for k in keys if k.startswith(("00000", "00001"))]) == 48
    assert sum(v for k, v in keys.items() if k.startswith(("00002", "00003"))) == 18


def test_fields_as_the_ecosystem_names_them(tmp_path):
    root = tmp_path / "mixed"
    write_wds_shards(root, (8,), seed=0, image_ext="png")
    write_wds_shards(tmp_path / "w", (8,), seed=1, image_ext="webp")
    shutil.copy(tmp_path / "w" / "00000.tar", root / "00001.tar")
    shutil.copy(tmp_path / "w" / "00000_stats.json", root / "00001_stats.json")
    cfg = cfg_for(str(root), tmp_path, text_key="json:caption", label_key="json:label")
    cfg.augment.recipe = "clip"
    cfg.loader.batch_size = 16
    loader = TorchLoader(cfg, DistEnv(), CPU, method_recipe(cfg))
    batch = next(iter(loader))
    assert batch.num_bad == 0 and batch.views[0].shape == (16, 3, 16, 16)  # png and webp, found per sample
    numbers = [int(t.rsplit(" ", 1)[1]) for t in batch.texts]
    assert sorted(numbers) == sorted(list(range(8)) * 2)  # captions from json:caption (both shards number from 0)
    assert batch.labels.tolist() == [n % 3 for n in numbers]  # labels from json:label travel with them
    cfg.data.text_key = "txt"
    assert next(iter(TorchLoader(cfg, DistEnv(), CPU, method_recipe(cfg)))).texts[0].startswith("a photo number")
    cfg.data.text_key = "caption"
    with pytest.raises(ShardError, match="no 'caption' field for captions"):
        TorchLoader(cfg, DistEnv(), CPU, method_recipe(cfg))
    cfg = cfg_for(str(root), tmp_path, image_key="jpg")
    with pytest.raises(ShardError, match="no 'jpg' field"):
        TorchLoader(cfg, DistEnv(), CPU, method_recipe(cfg))


def test_source_forms_are_checked(tmp_path):
    assert [(s.spec, s.weight) for s in parse_sources("a/{0..1}.tar::s3://b/x/::http://[::1]:8000/{0..1}.tar")] == [
        ("a/{0..1}.tar", 1.0), ("s3://b/x/", 1.0), ("http://[::1]:8000/{0..1}.tar", 1.0)]
    assert [s.weight for s in parse_sources([{"shards": "a", "weight": 0.5}, "b"])] == [0.5, 1.0]
    for bad, match in (("", "no data source"), ([{"shards": "a", "weight": 0}], "must be > 0"),
                       ([{"shards": "a", "wieght": 2}], "shards: SOURCE, weight: W")):
        with pytest.raises(ShardError, match=match):
            parse_sources(bad)
    with pytest.raises(ConfigError, match="data.train_shards must be a source"):
        config_from_dict({"data": {"train_shards": {"a": 1}}})
    with pytest.raises(ConfigError, match="max_bad_fraction"):
        config_from_dict({"data": {"max_bad_fraction": 2}})


def test_plan_covers_a_source_once_per_epoch(wds_shards, tmp_path):
    src = resolve_source(str(wds_shards), cache_dir=tmp_path / "c")
    spans = epoch_spans(src, 0, 0)
    cut = plan_range(spans, 10, 70)
    assert sum(s.stop - s.start for s in cut) == 60 and cut[0].start == 10


def _resolve_for_job_on_rank(parent: str, cache: str):
    import torch.distributed as dist

    from pipeline.data.sources import resolve_for_job

    os.chdir(parent if dist.get_rank() == 0 else "/")  # a relative source only rank 0 can resolve itself
    data = config_from_dict({"data": {"cache_dir": cache}}).data
    src = resolve_for_job("bare", data)
    try:
        resolve_for_job("bare/nope", data)
        err = ""
    except ShardError as exc:
        err = str(exc)
    return dist.get_rank(), src.counts, src.streams[0].origin, err


@pytest.mark.multirank
def test_rank_zero_resolves_and_every_rank_gets_the_result_or_the_error(wds_shards, tmp_path):
    from tests.multirank import run_ranks

    bare = tmp_path / "bare"
    bare.mkdir()
    for i in range(4):
        shutil.copy(wds_shards / f"{i:05d}.tar", bare)
    out = run_ranks(_resolve_for_job_on_rank, str(tmp_path), str(tmp_path / "cache"))
    assert [r[0] for r in out] == [0, 1]
    assert out[0][1:3] == out[1][1:3] == (COUNTS, "scan")  # rank 1 got rank 0's result: from "/" it finds nothing
    assert "shard folder not found" in out[0][3] and out[1][3].endswith("(reported by rank 0)")
