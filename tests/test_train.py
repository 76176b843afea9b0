"""End-to-end runs on real Fashion-MNIST shards: 2 processes over gloo through the local launcher."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def _launch_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "pipeline", "launch", "configs/quickstart.yaml", *overrides]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _run(overrides: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(_launch_cmd(overrides), cwd=ROOT, env=_env(), capture_output=True, text=True, check=False,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _last_lines_per_step(run_dir: Path) -> dict[tuple[int, int, int], list[str]]:
    """(rank, step, micro) -> keys, keeping the last record (a killed run's steps are redone after resume)."""
    out = {}
    for f in sorted((run_dir / "sample_keys").glob("rank*.txt")):
        rank = int(f.stem[4:])
        for line in f.read_text().splitlines():
            epoch, step, micro, *keys = line.split()
            out[(rank, int(step), int(micro))] = (int(epoch), keys)
    return out


def _checkpoint_step(latest: Path) -> int:
    return int(latest.resolve().name.split("_")[1])


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_sigkill_mid_run_then_resume_matches_uninterrupted_run(fmnist_shards, tmp_path, backend):
    """SIGKILL 2 processes once a checkpoint of step >= 10 exists, resume, stop both this run and an uninterrupted
    one at the same later step (``train.stop_at_step``): same weights, same samples in the same order.

    The schedule spans a million steps, so the kill always lands mid-run however fast the machine is, and the
    step both runs stop at is chosen after the kill (at least 8 steps past it, and past the first epoch)."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    steps_per_epoch = 2048 // (32 * 2)
    common = {"train.steps": 1_000_000, "checkpoint.every_steps": 5, "metrics.log_every": 5,
              "metrics.sample_keys": True, "launcher.nprocs": 2, "loader.backend": backend}
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"

    proc = subprocess.Popen(_launch_cmd(tiny_overrides(fmnist_shards, run_dir, **common)), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 600  # a ceiling for a broken run only
    while not (latest.exists() and _checkpoint_step(latest) >= 10):
        assert proc.poll() is None, f"the run exited with {proc.returncode} before its step-10 checkpoint"
        assert time.monotonic() < deadline, "no step-10 checkpoint in 10 minutes"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _checkpoint_step(latest)
    assert not (run_dir / "summary.json").exists()

    stop = max(killed_at + 8, steps_per_epoch + 8)
    _run(tiny_overrides(fmnist_shards, ref_dir, **common, **{"train.stop_at_step": stop}))
    resume_point = latest.resolve()
    out = _run(tiny_overrides(fmnist_shards, run_dir, **common, **{"train.stop_at_step": stop}))
    log = out.stdout + out.stderr
    assert f"resumed from {resume_point} at step {killed_at}" in log  # checkpoint.resume=auto picks up `latest`
    assert f"{backend} loader" in log
    if backend == "dali" and killed_at % steps_per_epoch:
        # mid-epoch: restored from DALI's own checkpoint, not by decoding the epoch's first batches again
        assert f"resumes at batch {killed_at % steps_per_epoch} from DALI's checkpoint" in log

    # both runs stopped at `stop` with a checkpoint there: `pipeline export` gives the weights of each
    for run in (ref_dir, run_dir):
        assert _checkpoint_step(run / "checkpoints" / "latest") == stop
        subprocess.run([sys.executable, "-m", "pipeline", "export", str(run)], cwd=ROOT, env=_env(), check=True,
                       capture_output=True)
    ref = load_file(ref_dir / "export" / "model.safetensors")
    got = load_file(run_dir / "export" / "model.safetensors")
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"{k} differs after kill + resume"

    # Every sample of epoch 0 (2048 samples = 32 steps x 32 x 2 ranks) consumed exactly once.
    records = _last_lines_per_step(run_dir)
    epoch0 = [k for (rank, step, _), (epoch, keys) in records.items() if epoch == 0 for k in keys]
    assert len(epoch0) == len(set(epoch0)) == 2048
    assert records == _last_lines_per_step(ref_dir)  # and in the same order as the uninterrupted run
    assert not list((run_dir / "checkpoints").glob("*.partial"))


@pytest.mark.slow
@pytest.mark.multirank
def test_two_process_run_evaluates_exports_and_logs(fmnist_shards, tmp_path):
    run_dir = tmp_path / "e2e"
    out = _run(tiny_overrides(fmnist_shards, run_dir, **{
        "train.steps": 8, "launcher.nprocs": 2, "eval.at_end": True, "metrics.tensorboard": True}))
    summary = json.loads((run_dir / "summary.json").read_text())
    for metric in ("linear_probe", "knn_k10", "knn_k20", "knn_k100", "knn_k200"):
        assert set(summary[metric]) == {"pretrained", "random_init", "raw_pixels"}
        assert all(0.1 <= v <= 1.0 for v in summary[metric].values())  # 10 classes: chance is 0.1
    assert summary["world_size"] == 2 and summary["images_per_sec"] > 0
    assert Path(summary["checkpoint"]).name == "step_00000008"
    assert "linear_probe" in out.stdout and "pretrained" in out.stdout and "kNN k=200" in out.stdout  # the table
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4, 6, 8]
    assert {"loss", "lr", "images_per_sec_per_process", "data_wait_fraction"} <= set(lines[0])
    assert 0 <= lines[-1]["data_wait_fraction"] <= 1
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    resolved = load_config(run_dir / "config.yaml")
    assert resolved.train.steps == 8 and resolved.data.train_shards == str(fmnist_shards["train"])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000006", "step_00000008"]
    # the export's model card shows the results of evaluating the exported file, and the command that made it
    card = (run_dir / "export" / "README.md").read_text()
    rows = dict(re.findall(r"^\| (.+?) \| (.+?) \|$", card, re.MULTILINE))

    def leaves(tree, path):  # whatever nesting evaluate() returns
        if isinstance(tree, dict):
            for k, v in tree.items():
                yield from leaves(v, f"{path} / {k}")
        else:
            yield path, tree

    for metric in ("linear_probe", "knn_k20"):
        for path, value in leaves(summary[metric], metric):
            assert rows[path] == f"{value:.4f}", (path, card)
    assert "pipeline launch configs/quickstart.yaml" in card and "launcher.nprocs=2" in card
    assert json.loads((run_dir / "export" / "pipeline.json").read_text())["images_seen"] == 8 * 32 * 2
    # re-exporting the same checkpoint keeps the results on the card
    subprocess.run([sys.executable, "-m", "pipeline", "export", str(run_dir), "--output", str(tmp_path / "again")],
                   cwd=ROOT, env=_env(), check=True, capture_output=True)
    assert (tmp_path / "again" / "README.md").read_text().split("## Evaluation")[1] == card.split("## Evaluation")[1]


def test_export_loads_into_timm_strictly_with_identical_features(fmnist_shards, tmp_path):
    import timm

    from pipeline.engines.ddp import DDPEngine
    from pipeline.export import load_exported
    from pipeline.methods import build_method
    from pipeline.trainer import train

    cfg = load_config("configs/quickstart.yaml", tiny_overrides(fmnist_shards, tmp_path / "run",
                                                                **{"launcher.nprocs": 1}))
    train(cfg)
    model = timm.create_model(f"local-dir:{tmp_path / 'run' / 'export'}", pretrained=True)  # loads strictly
    model.eval()
    assert model.global_pool == cfg.model.global_pool == "avg"  # the quickstart's mean pooling travels with the export

    method = build_method(cfg)
    method.load_state_dict(DDPEngine.read_model_state(tmp_path / "run" / "checkpoints" / "latest", method))
    method.eval()
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), method.encoder(x))
        assert torch.equal(load_exported(tmp_path / "run" / "export")(x), model(x))

    # `pipeline export` re-exports from the checkpoint, offline, to the same files
    subprocess.run([sys.executable, "-m", "pipeline", "export", str(tmp_path / "run"), "--output",
                    str(tmp_path / "again")], cwd=ROOT, env=_env(), check=True, capture_output=True)
    a, b = load_file(tmp_path / "again" / "model.safetensors"), load_file(tmp_path / "run" / "export" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == \
        json.loads((tmp_path / "run" / "export" / "config.json").read_text())
    again = json.loads((tmp_path / "again" / "pipeline.json").read_text())
    trained = json.loads((tmp_path / "run" / "export" / "pipeline.json").read_text())
    assert again["checkpoint"] == trained["checkpoint"] == str((tmp_path / "run" / "checkpoints" / "step_00000006").resolve())
    assert again == trained  # steps, images seen, the command: read back from the run
    assert trained["steps"] == 6 and trained["images_seen"] == 6 * 32


@pytest.mark.slow
def test_one_process_launch_runs_every_engine_without_torchrun_variables(fmnist_shards, tmp_path):
    """``launcher.nprocs=1`` trains in the launching process, where no torchrun variable is set; DeepSpeed
    asserts LOCAL_RANK is, so the engine supplies it. BYOL in bf16: head BatchNorm with bf16 weights."""
    env = {k: v for k, v in _env().items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    for engine in ("fsdp", "deepspeed"):
        run = tmp_path / engine
        cmd = [sys.executable, "-m", "pipeline", "launch", "configs/byol.yaml",
               *tiny_overrides(fmnist_shards, run, **{"launcher.nprocs": 1, "engine.name": engine,
                                                      "engine.precision": "bf16", "train.steps": 2,
                                                      "method.byol.pred_hidden_dim": 64})]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        summary = json.loads((run / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["world_size"] == 1 and math.isfinite(summary["final_loss"])


class _NaNAfter:
    """A SimCLR whose loss turns NaN from its 4th forward on (a real diverging run, made reproducible)."""

    @staticmethod
    def build(cfg):
        from pipeline.methods.simclr import SimCLR

        class Diverging(SimCLR):
            calls = 0

            def forward(self, batch):
                loss, metrics = super().forward(batch)
                Diverging.calls += 1
                return (loss * float("nan") if Diverging.calls > 3 else loss), metrics

        return Diverging(cfg)


def test_nan_loss_stops_with_step_and_never_checkpoints_it(fmnist_shards, tmp_path, monkeypatch):
    from pipeline import methods
    from pipeline.trainer import NonFiniteLossError, train

    monkeypatch.setitem(methods.METHODS, "diverging", _NaNAfter.build)
    cfg = load_config("configs/quickstart.yaml", tiny_overrides(
        fmnist_shards, tmp_path / "nan", **{"method.name": "diverging", "checkpoint.every_steps": 2,
                                            "metrics.log_every": 2, "train.steps": 10}))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3 \(detected at step 4\).*step_00000002"):
        train(cfg)
    assert os.readlink(tmp_path / "nan" / "checkpoints" / "latest") == "step_00000002"


def test_nan_policy_skip_keeps_weights_finite(fmnist_shards, tmp_path, monkeypatch):
    from pipeline import methods
    from pipeline.trainer import train

    monkeypatch.setitem(methods.METHODS, "diverging", _NaNAfter.build)
    cfg = load_config("configs/quickstart.yaml", tiny_overrides(
        fmnist_shards, tmp_path / "skip", **{"method.name": "diverging", "train.nan_policy": "skip",
                                             "metrics.log_every": 2, "train.steps": 6}))
    train(cfg)
    weights = load_file(tmp_path / "skip" / "export" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    last = json.loads((tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["skipped_steps"] == 3


def test_interrupted_checkpoint_write_never_becomes_latest(fmnist_shards, tmp_path, monkeypatch):
    from pipeline.engines.ddp import DDPEngine
    from pipeline.trainer import train

    cfg = load_config("configs/quickstart.yaml", tiny_overrides(fmnist_shards, tmp_path / "run"))
    real_save = DDPEngine.save

    def save_then_die(self, path):
        real_save(self, path)
        if path.name.startswith("step_00000006"):
            raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(DDPEngine, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert os.readlink(tmp_path / "run" / "checkpoints" / "latest") == "step_00000003"
    assert (tmp_path / "run" / "checkpoints" / "step_00000006.partial").exists()
    monkeypatch.setattr(DDPEngine, "save", real_save)
    summary = train(cfg)  # resumes from step 3, replaces the partial write
    assert summary["steps"] == 6 and not list((tmp_path / "run" / "checkpoints").glob("*.partial"))


def test_clear_errors_for_missing_data_and_existing_runs(fmnist_shards, tmp_path):
    from pipeline.data.shards import ShardError
    from pipeline.trainer import train

    cfg = load_config("configs/quickstart.yaml", tiny_overrides(fmnist_shards, tmp_path / "r",
                                                                **{"data.train_shards": str(tmp_path / "nope")}))
    with pytest.raises(ShardError, match="shard folder not found"):
        train(cfg)
    cfg = load_config("configs/quickstart.yaml", tiny_overrides(fmnist_shards, tmp_path / "r2"))
    train(cfg)
    cfg.checkpoint.resume = "false"
    with pytest.raises(FileExistsError, match="already has checkpoints"):
        train(cfg)
    proc = subprocess.run(_launch_cmd(["optim.lr_max=1"]), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 2 and "unknown config key 'optim.lr_max'" in proc.stderr


def _stop_scenario(shards: dict, root: Path, ports: list[int]) -> dict:
    """On each of 2 ranks: an uninterrupted run; a run whose ``stop`` says yes on rank 1 only, from its 3rd step on;
    that run resumed with ``train.stop_at_step=6``, then resumed to the end."""
    from pipeline.trainer import train

    rank = int(os.environ["RANK"])
    common = {"train.steps": 8, "checkpoint.every_steps": 5}
    reference = load_config(ROOT / "configs/quickstart.yaml", tiny_overrides(shards, root / "reference", **common))
    stopped = load_config(ROOT / "configs/quickstart.yaml", tiny_overrides(shards, root / "stopped", **common))
    asked = itertools.count(1)  # one question per optimizer step

    def run(cfg, port: int, **kwargs) -> dict:
        os.environ["MASTER_PORT"] = str(port)  # a fresh rendezvous per run: train() makes and ends its group
        return train(cfg, **kwargs)

    out = {"reference": run(reference, ports[0])}
    out["stop"] = run(stopped, ports[1], stop=lambda: rank == 1 and next(asked) >= 3)
    out["asked"] = next(asked) - 1 if rank == 1 else None
    checkpoints = root / "stopped" / "checkpoints"
    out["after_stop"] = {"latest": os.readlink(checkpoints / "latest"), "folders": sorted(os.listdir(checkpoints)),
                         "files": sorted(os.listdir(checkpoints / "latest")),
                         "trainer": json.loads((checkpoints / "latest" / "trainer.json").read_text())}
    stopped.train.stop_at_step = 6
    out["stop_at_step"] = run(stopped, ports[2])
    stopped.train.stop_at_step = 0
    out["end"] = run(stopped, ports[3])
    return out


@pytest.mark.multirank
def test_stop_on_one_rank_stops_every_rank_at_that_step_and_resumes_exactly(fmnist_shards, tmp_path):
    from tests.multirank import free_port, run_ranks

    ranks = run_ranks(_stop_scenario, fmnist_shards, tmp_path, [free_port() for _ in range(4)], init_pg=False)
    # Only rank 1 asked to stop (after step 3); rank 0 agreed through the all-reduce and stopped after the same step.
    assert ranks[1]["asked"] == 3
    for r in ranks:
        assert {k: r["stop"][k] for k in ("interrupted", "steps")} == {"interrupted": "stop", "steps": 3}
        # step 3 is not a multiple of every_steps: saved because of the stop, complete, and made `latest`
        assert r["after_stop"]["latest"] == "step_00000003"
        assert r["after_stop"]["folders"] == ["latest", "step_00000003"]
        assert {"trainer.json", "rng_rank0.pt", "rng_rank1.pt"} <= set(r["after_stop"]["files"])
        assert r["after_stop"]["trainer"]["step"] == 3 and r["after_stop"]["trainer"]["world_size"] == 2
        assert {k: r["stop_at_step"][k] for k in ("interrupted", "steps")} == {"interrupted": "stop_at_step",
                                                                                 "steps": 6}
        assert "interrupted" not in r["end"] and r["end"]["steps"] == 8
    assert "export" not in ranks[0]["stop"] and ranks[0]["stop"]["checkpoint"].endswith("step_00000003")

    run_dir = tmp_path / "stopped"
    # a stopped run neither exports nor evaluates; metrics of both stops and the end are in one log
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6, 8]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000006", "step_00000008"]
    # stopped twice, resumed twice, same schedule throughout: the weights of an uninterrupted run
    ref = load_file(tmp_path / "reference" / "export" / "model.safetensors")
    got = load_file(run_dir / "export" / "model.safetensors")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
