"""The prepared GPU run (benchmarks/gpu/, issue #16) on a CPU: the payload cut into parts, checked and joined as
the device calls would, the wheels installed with pip into a fresh --target folder, and every stage of run.sh
at tiny sizes (GPU_SMOKE=1), so the run on a GPU is its first and last try."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.shards import Item, open_shards, read_idx, write_shards

REPO = Path(__file__).resolve().parents[1]
GPU = REPO / "benchmarks" / "gpu"
# benchmarks/gpu/pack.py is a script (it runs before anything is installed there), loaded here by its path
_spec = importlib.util.spec_from_file_location("gpu_pack", GPU / "pack.py")
pack = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pack)

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def make_wheel(folder: Path, name: str, value: int, requires: tuple[str, ...] = ()) -> Path:
    """A minimal valid pure-Python wheel: ``import name; name.VALUE == value`` once installed."""
    dist = f"{name}-0.1"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {f"{name}/__init__.py": f"VALUE = {value}\n".encode(),
             f"{dist}.dist-info/METADATA": metadata.encode(),
             f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(
        f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).decode().rstrip('=')},{len(d)}\n"
        for n, d in files.items()) + f"{dist}.dist-info/RECORD,,\n"
    files[f"{dist}.dist-info/RECORD"] = record.encode()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
    return path


def jpeg_shards(out: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    items = [Item(f"img{i}", (rng.random((48, 64, 3)) * 255).astype(np.uint8), "png", i % 3) for i in range(n)]
    write_shards(items, out, shard_size=max(1, n // 3), image_format="jpg", progress=False)
    return out


def _random_files(root: Path, sizes: dict[str, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name, size in sizes.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())


def test_pack_cuts_parts_that_fit_each_call_and_join_restores_them(tmp_path, capsys):
    stage, gpu = tmp_path / "stage", tmp_path / ".gpu"
    _random_files(stage / "big", {"wheels/a.whl": 2_500_000, "shards/s/x.tar": 900_000, "shards/s/manifest.json": 50})
    _random_files(stage / "core", {"wheels/c.whl": 40_000, "fmnist/f.gz": 1000}, seed=1)
    m = pack.pack(stage, gpu, repo=tmp_path, part_mib=1, limit_mib=3.5)  # room per call: 1.5 MiB
    room = pack.call_room(m["tree_bytes"], 3.5)
    assert len(m["parts"]) == 4 and all(p["bytes"] <= pack.MIB for p in m["parts"])
    assert all(c["carried_bytes"] <= room for c in m["calls"])
    assert [c["command"] for c in m["calls"]] == ["bash benchmarks/gpu/have.sh"] * 3 + ["bash benchmarks/gpu/run.sh"]
    assert m["calls"][-1]["carry"] == [".gpu/call4"] and (gpu / "call4" / "core" / "wheels" / "c.whl").exists()
    assert all((gpu / f"call{k}" / pack.MANIFEST).exists() for k in range(1, 5))

    # Each part-carrying call's command says what has arrived; a machine gone cold loses the earlier parts.
    hidden = tmp_path / "part-01"
    shutil.move(gpu / "call2" / "part-01", hidden)
    assert pack.main(["check", "--gpu-dir", str(gpu)]) == 0
    assert "3/4 parts intact" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        pack.join(gpu, tmp_path / "payload")
    assert exc.value.code == 3 and not (tmp_path / "payload").exists()
    assert "call2/part-01 (missing)" in capsys.readouterr().err

    # A damaged part is refused too, by its sha256.
    damaged = bytearray(hidden.read_bytes())
    damaged[1000] ^= 0xFF
    (gpu / "call2" / "part-01").write_bytes(damaged)
    with pytest.raises(SystemExit):
        pack.join(gpu, tmp_path / "payload")
    assert "sha256 differs" in capsys.readouterr().err

    shutil.move(hidden, gpu / "call2" / "part-01")
    out = pack.join(gpu, tmp_path / "payload")
    for f in pack._files(stage / "big"):
        assert (out / f.relative_to(stage / "big")).read_bytes() == f.read_bytes()
    assert pack.check_core(gpu, m) == []
    # a second join on the same (warm) machine finds the payload in place
    (out / "wheels" / "a.whl").write_bytes(b"left alone")
    assert pack.join(gpu, out) == out and (out / "wheels" / "a.whl").read_bytes() == b"left alone"


def test_the_core_folder_gets_a_call_of_its_own_when_the_last_part_leaves_no_room(tmp_path):
    stage = tmp_path / "stage"
    _random_files(stage / "big", {"w.whl": int(2.9 * pack.MIB)})
    _random_files(stage / "core", {"c.whl": int(0.8 * pack.MIB)})
    m = pack.pack(stage, tmp_path / ".gpu", repo=tmp_path, part_mib=1, limit_mib=3.5)
    assert len(m["parts"]) == 3 and len(m["calls"]) == 4  # the last part (0.9 MiB) + core exceed 1.5 MiB
    assert m["calls"][-1]["carried_bytes"] == int(0.8 * pack.MIB)


def test_the_working_tree_leaves_room_for_full_parts():
    """Every device call sends the tracked tree besides its part: it must stay far below the 64 MiB a call
    carries, or the payload needs more calls (pack shrinks the parts to fit)."""
    assert 0 < pack.travelling_bytes(REPO) < 4 * pack.MIB


def test_stamp_names_the_commit_of_a_tree_that_travelled_without_git(tmp_path):
    repo, there = tmp_path / "repo", tmp_path / "there"
    repo.mkdir()
    (repo / "a.py").write_text("x = 1\n")
    (repo / "b.txt").write_text("b\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    info = pack.stamp(repo, repo / ".gpu" / "call1")
    assert info["commit"] == commit and not info["dirty_here"] and set(info["files"]) == {"a.py", "b.txt"}
    shutil.copytree(repo, there, ignore=shutil.ignore_patterns(".git"))
    assert pack.tree_line(there, there / ".gpu") == commit
    (there / "a.py").write_text("x = 2\n")
    assert pack.tree_line(there, there / ".gpu") == commit + "+local-changes"
    assert pack.tree_line(tmp_path / "nowhere", tmp_path / "nowhere") == "unknown"


def test_wheel_list_reads_and_every_requirement_of_a_wheel_is_carried_or_in_the_image(tmp_path):
    rows = pack.read_wheel_list(GPU / "wheels.txt")
    names = [pack._canon(n) for _, n, _, _ in rows]
    assert len(names) == len(set(names)), "one version of each package: two stop the whole install there"
    assert {"nvidia-dali-cuda130", "webdataset", "deepspeed", "submitit"} <= set(names)
    assert not set(names) & pack.IMAGE_HAS, "the image has these already: carrying them would shadow its versions"

    cache, stage = tmp_path / "cache", tmp_path / "stage"
    make_wheel(cache, "webdataset", 1).rename(cache / "webdataset-1.0.2-py3-none-any.whl")
    missing = pack.select_wheels(GPU / "wheels.txt", cache, stage)
    assert "webdataset==1.0.2" not in missing and "nvidia-dali-cuda130==2.4.0" in missing
    assert (stage / "core" / "wheels" / "webdataset-1.0.2-py3-none-any.whl").exists()

    # Requires-Dist is followed through the carried wheels (extras included) to what neither covers.
    a = make_wheel(tmp_path / "w", "alpha", 1, ("numpy", "beta[all]", "gamma; python_version < '3.10'"))
    b = make_wheel(tmp_path / "w", "beta", 2, ("delta; extra == 'all'", "epsilon; extra == 'docs'"))
    assert pack.uncovered_requirements([a, b]) == ['delta; extra == "all" (for beta)']


def test_idx_head_keeps_the_first_records(tmp_path):
    from tests.conftest import write_idx

    arr = np.arange(10 * 4 * 3, dtype=np.uint8).reshape(10, 4, 3)
    src = write_idx(tmp_path / "x-idx3-ubyte.gz", arr)
    pack.idx_head(src, tmp_path / "out" / "x-idx3-ubyte.gz", 3)
    assert np.array_equal(read_idx(tmp_path / "out" / "x-idx3-ubyte.gz"), arr[:3])


def test_repeat_shards_lengthens_the_epoch_for_both_backends(tmp_path):
    import torch

    from pipeline.bench.loader import repeat_shards
    from pipeline.config import config_from_dict
    from pipeline.data.recipes import build_recipe
    from pipeline.data.torch_loader import TorchLoader
    from pipeline.distributed import DistEnv

    src = jpeg_shards(tmp_path / "s", 30)
    dst = repeat_shards(src, tmp_path / "x3", 3)
    shards = open_shards(dst, verify="sha256")
    assert shards.num_samples == 90 and len(shards.paths) == 3 * len(open_shards(src).paths)
    assert repeat_shards(src, tmp_path / "x3", 3) == dst  # made once
    cfg = config_from_dict({"data": {"train_shards": str(dst)}, "augment": {"recipe": "simclr", "image_size": 16},
                            "loader": {"batch_size": 8, "num_workers": 0, "shuffle_buffer": 4}})
    recipe = build_recipe(cfg.augment)
    tv = TorchLoader(cfg, DistEnv(), torch.device("cpu"), recipe)
    assert tv.steps_per_epoch == 90 // 8
    it = iter(tv)
    assert all(next(it).size == 8 for _ in range(tv.steps_per_epoch)) and tv.epoch == 0
    pytest.importorskip("nvidia.dali")
    from pipeline.data.dali_loader import DaliLoader

    dali = DaliLoader(cfg, DistEnv(), torch.device("cpu"), recipe)
    assert dali.steps_per_epoch == 90 // 8
    it = iter(dali)
    assert all(next(it).views[0].shape == (8, 3, 16, 16) for _ in range(dali.steps_per_epoch)) and dali.epoch == 0


def test_bench_loader_measures_both_backends_on_repeated_shards(tmp_path):
    """`pipeline bench loader` as run.sh calls it (shards already in --workdir, each listed twice), in a process of
    its own: the benchmark pins its process to --cpu-cores."""
    pytest.importorskip("nvidia.dali")
    work, out = tmp_path / "work", tmp_path / "out"
    jpeg_shards(work / "shards-40", 40)
    p = subprocess.run([sys.executable, "-m", "pipeline", "bench", "loader", "--workdir", str(work), "--images", "40",
                        "--repeat", "2", "--image-size", "32", "--batch-size", "4", "--batches", "2", "--repeats", "1",
                        "--cpu-cores", "1", "--backends", "dali", "torch", "--output", str(out)],
                       capture_output=True, text=True, timeout=1800, cwd=REPO, check=False)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    data = json.loads((out / "loader.json").read_text())
    assert [r["backend"] for r in data["results"]] == ["dali", "torch"]
    assert all(r["images_per_sec"] > 0 and r["device"] == "cpu" and r["views"] == 2 for r in data["results"])
    assert data["meta"]["repeat"] == 2 and data["meta"]["environment"]["device_type"] == "cpu"
    assert "git_commit" in data["meta"]["environment"]
    assert open_shards(work / "shards-40-x2").num_samples == 80
    assert "| dali | cpu | 32 | 1 |" in (out / "loader.md").read_text()


def _run_sh(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, "GPU_WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out"),
            "RESULTS_DIR": str(tmp_path / "res"), **env}
    return subprocess.run(["bash", str(GPU / "run.sh")], env=full, capture_output=True, text=True, timeout=3600,
                          check=False)


def test_run_sh_stops_at_once_without_a_gpu(tmp_path):
    # a budget no machine's speed can exhaust: the test is about stopping, not time
    p = _run_sh(tmp_path, GPU_SMOKE="0", STAGES="check,pytest", GPU_DIR=str(tmp_path / "none"), GPU_BUDGET_S="3600")
    assert p.returncode != 0, p.stdout
    assert "torch sees no CUDA GPU" in p.stdout and "== pytest" not in p.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["check"] and summary["stages"][0]["rc"] == 2


@pytest.mark.slow
def test_run_sh_cpu_rehearsal_installs_the_parts_and_runs_every_stage(tmp_path):
    """run.sh end to end at tiny sizes: parts joined, wheels pip-installed into a fresh --target folder, check,
    pytest -m gpu, bench model (twice), bench loader (DALI vs torch on repeated shards), bench e2e; results in
    RESULTS_DIR and the four files of OUT."""
    stage, gpu = tmp_path / "stage", tmp_path / ".gpu"
    make_wheel(stage / "big" / "wheels", "gpu16_probe_big", 7)
    jpeg_shards(stage / "big" / "shards" / "shards-48", 48)
    make_wheel(stage / "core" / "wheels", "gpu16_probe_core", 8)
    if (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        for f, n in (("train-images-idx3-ubyte", 2048), ("train-labels-idx1-ubyte", 2048),
                     ("t10k-images-idx3-ubyte", 512), ("t10k-labels-idx1-ubyte", 512)):
            pack.idx_head(FASHION_MNIST / f"{f}.gz", stage / "core" / "fmnist" / f"{f}.gz", n)
    m = pack.pack(stage, gpu, repo=tmp_path, part_mib=0.05)
    assert len(m["parts"]) >= 2

    # the two files with -m gpu tests (collecting the whole suite again would only cost time here)
    p = _run_sh(tmp_path, GPU_SMOKE="1", GPU_DIR=str(gpu), GPU_BUDGET_S="3600",
                GPU_PYTEST_PATHS="tests/test_dali.py tests/test_bench.py")
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    out, res, site = tmp_path / "out", tmp_path / "res", tmp_path / "work" / "site"
    assert sorted(f.name for f in out.iterdir()) == ["results.tar.gz", "run.log", "summary.json", "summary.md"]
    for name, value in (("gpu16_probe_big", 7), ("gpu16_probe_core", 8)):  # installed from the joined parts
        probe = subprocess.run([sys.executable, "-c", f"import {name}; print({name}.VALUE)"], capture_output=True,
                               text=True, env={**os.environ, "PYTHONPATH": str(site)}, check=True)
        assert probe.stdout.strip() == str(value)
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["stage"], s["rc"]) for s in summary["stages"]] == [
        (s, 0) for s in ("install", "check", "pytest", "model-eager", "model-compile", "loader", "e2e")]
    assert summary["smoke"] and all(t["met"] is None for t in summary["targets"])
    assert summary["tests"]["failed"] == summary["tests"]["errors"] == 0 and summary["tests"]["skipped"] >= 2
    model = json.loads((res / "model_eager" / "model.json").read_text())
    assert [r["batch_size"] for r in model["results"]] == [2, 4] and model["results"][0]["precision"] == "bf16"
    loader = json.loads((res / "loader" / "loader.json").read_text())
    assert {r["backend"] for r in loader["results"]} == {"dali", "torch"} and loader["meta"]["repeat"] == 2
    assert all(r["images_per_sec"] > 0 for r in loader["results"])
    e2e = json.loads((res / "e2e" / "e2e.json").read_text())
    dali = next(r for r in e2e["results"] if r["backend"] == "dali")
    assert "error" not in dali and 0 <= dali["data_wait_fraction"] <= 1
    assert open_shards(tmp_path / "work" / "payload" / "shards" / "shards-48-x2").num_samples == 96
    env = json.loads((res / "env.json").read_text())
    assert env["smoke"] and not env["problems"] and all(v == "ok" for v in env["imports"].values())
    assert "CPU rehearsal" in (out / "summary.md").read_text()
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert {"res/README.md", "res/model_compile/model.json", "res/loader/loader.json", "res/e2e/e2e.json"} <= set(names)
