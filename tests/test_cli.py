"""The command line as a user meets it: each subcommand's typical mistakes give one clear line on stderr and a
non-zero exit status, without a traceback; ``PIPELINE_DEBUG=1`` or ``pipeline --traceback`` shows it, and a bug
keeps its traceback. Every case runs the real CLI in a subprocess."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2"]


def pipeline(*argv: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "PIPELINE_DEBUG"}
    env = {**base, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """Exit status ``code``, no traceback, and exactly one error line, naming the command and each fragment."""
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr[-4000:]
    assert re.match(r"pipeline [a-z ]+: error: ", errors[0]), errors[0]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Inputs of the typical mistakes: a file that is not IDX, an empty folder, a run directory without checkpoints,
    one with a (hand-made) complete checkpoint, and a real export folder."""
    from pipeline.export import export_encoder
    from pipeline.models import build_encoder

    root = tmp_path_factory.mktemp("cli")
    with gzip.open(root / "not-idx.gz", "wb") as f:
        f.write(b"hello")
    (root / "empty").mkdir()
    fresh = root / "runs" / "fresh"
    fresh.mkdir(parents=True)
    (fresh / "config.yaml").write_text((ROOT / "configs" / "quickstart.yaml").read_text())
    trained = root / "runs" / "trained" / "checkpoints" / "step_00000003"
    trained.mkdir(parents=True)
    (trained / "trainer.json").write_text(json.dumps({"step": 3, "world_size": 1}))
    os.symlink(trained.name, trained.parent / "latest")
    cfg = load_config(QUICKSTART, TINY)
    state = {f"encoder.{k}": v for k, v in build_encoder(cfg.model).state_dict().items()}
    export_encoder(state, cfg, root / "export")
    return root


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens on it once closed


MISTAKES = {
    # shards write
    "shards: input folder missing": (["shards", "write", "--format", "folder", "--input", "nope", "--output", "o"],
                                     1, ["pipeline shards write: error:", "image folder not found: nope"]),
    "shards: not an IDX file": (["shards", "write", "--format", "idx", "--input", "not-idx.gz", "--output", "o"],
                                1, ["not-idx.gz", "not an IDX file"]),
    "shards: no images": (["shards", "write", "--format", "folder", "--input", "empty", "--output", "o"],
                          1, ["no images"]),
    "shards: bad colour": (["shards", "write", "--format", "folder", "--input", "empty", "--output", "o",
                            "--background", "notacolor"], 2, ["not a colour: 'notacolor'"]),
    # train / launch: the config
    "config file missing": (["train", "nope.yaml"], 2, ["pipeline train: error:", "config file not found: nope.yaml"]),
    "unknown key": (["launch", QUICKSTART, "optim.lr_max=1"], 2,
                    ["pipeline launch: error:", "unknown config key 'optim.lr_max'", "valid keys of optim: lr"]),
    "bad value": (["train", QUICKSTART, "optim.lr=fast"], 2, ["optim.lr must be a number, got 'fast'"]),
    "bad choice": (["train", QUICKSTART, "engine.name=ddq"], 2, ["engine.name='ddq' is not one of ddp, fsdp"]),
    "not YAML": (["train", QUICKSTART, "augment.crop_scale=[0.2,"], 2, ["not valid YAML"]),
    "not key=value": (["train", QUICKSTART, "optim.lr"], 2, ["is not of the form key.sub=value"]),
    "unknown method": (["train", QUICKSTART, "method.name=simclr2", *TINY], 2, ["unknown method.name 'simclr2'"]),
    "unknown model": (["train", QUICKSTART, "model.name=vit_huge_typo"], 2, ["model.name='vit_huge_typo'"]),
    # train / launch: data, run directory, checkpoints
    "shards missing": (["train", QUICKSTART, "data.train_shards=nope", "run.output_dir=runs", *TINY], 1,
                       ["shard folder not found: ", "/nope"]),
    "nothing to resume": (["launch", QUICKSTART, "checkpoint.resume=true", "run.output_dir=runs", "run.name=fresh",
                           *TINY], 1, ["checkpoint.resume=true but", "has no complete checkpoint"]),
    "run exists": (["launch", QUICKSTART, "checkpoint.resume=false", "run.output_dir=runs", "run.name=trained",
                    *TINY], 1, ["already has checkpoints (latest: step_00000003)"]),
    # eval
    "eval: no export": (["eval", "nope", "--train-shards", "a", "--test-shards", "b"], 1,
                        ["pipeline eval: error:", "export folder not found: nope"]),
    "eval: not an export": (["eval", "empty", "--train-shards", "a", "--test-shards", "b"], 1,
                            ["empty is not an export folder", "pipeline export RUN_DIR"]),
    "eval: shards missing": (["eval", "export", "--train-shards", "nope", "--test-shards", "nope"], 1,
                             ["shard folder not found: ", "/nope"]),
    # export
    "export: not a run": (["export", "empty"], 1, ["pipeline export: error:", "empty is not a run directory"]),
    "export: no checkpoint": (["export", "runs/fresh"], 1, ["runs/fresh/checkpoints has no complete checkpoint"]),
    "export: bad --checkpoint": (["export", "runs/fresh", "--checkpoint", "nope"], 1,
                                 ["nope is not a complete checkpoint"]),
    # bench
    "bench: unknown key": (["bench", "model", "optim.lr_max=1"], 2, ["pipeline bench model: error:",
                                                                     "unknown config key 'optim.lr_max'"]),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_typical_mistakes_give_one_line(workspace, case):
    argv, code, fragments = MISTAKES[case]
    assert_one_line_error(pipeline(*argv, cwd=workspace), code, *fragments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the mistake is asking for CUDA where there is none")
def test_cuda_on_a_machine_without_it(workspace):
    proc = pipeline("train", QUICKSTART, "loader.device=cuda", cwd=workspace)
    assert_one_line_error(proc, 2, "loader.device='cuda' but CUDA is not available")


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="needs Slurm's client commands")
def test_unreachable_slurm_controller(workspace, tmp_path):
    conf = tmp_path / "slurm.conf"
    conf.write_text(f"ClusterName=gone\nSlurmctldHost=gone(127.0.0.1)\nSlurmctldPort={_closed_port()}\n"
                    "NodeName=n1 CPUs=1\nPartitionName=p Nodes=n1 Default=YES\n")
    proc = pipeline("launch", QUICKSTART, "launcher=slurm", "run.output_dir=runs", "run.name=on-slurm",
                    cwd=workspace, env={"SLURM_CONF": str(conf)})
    assert_one_line_error(proc, 1, "cannot reach the Slurm controller", "is DOWN", str(conf))
    assert not (workspace / "runs" / "on-slurm").exists()  # nothing submitted, nothing written


def test_unreachable_ray_cluster(workspace):
    pytest.importorskip("ray")
    address = f"127.0.0.1:{_closed_port()}"
    proc = pipeline("launch", QUICKSTART, "launcher=ray", f"launcher.ray.address={address}", "run.output_dir=runs",
                    cwd=workspace)
    assert_one_line_error(proc, 1, f"cannot reach the Ray cluster at launcher.ray.address={address}",
                          "Connection refused")


@pytest.mark.parametrize("how", [{"PIPELINE_DEBUG": "1"}, "--traceback"])
def test_debugging_shows_the_traceback(workspace, how):
    if how == "--traceback":
        proc = pipeline("--traceback", "train", "nope.yaml", cwd=workspace)
    else:
        proc = pipeline("train", "nope.yaml", cwd=workspace, env=how)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "pipeline.config.ConfigError: config file not found: nope.yaml"


def test_a_bug_keeps_its_traceback(monkeypatch):
    from pipeline import cli

    def broken(path, overrides):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "load_config", broken)
    with pytest.raises(ZeroDivisionError):
        cli.main(["train", "whatever.yaml"])


@pytest.mark.multirank
def test_an_error_in_every_rank_is_reported_once(workspace):
    """2 local processes, both failing on missing data: the launcher prints the first rank's message once, and no
    rank prints a traceback."""
    proc = pipeline("launch", QUICKSTART, "launcher.nprocs=2", "data.train_shards=nope", "run.output_dir=runs",
                    "run.name=two", *TINY, cwd=workspace)
    line = assert_one_line_error(proc, 1, "pipeline launch: error: rank ", "shard folder not found: ", "/nope")
    assert re.search(r"error: rank [01]: shard", line)


def test_expected_errors_are_told_from_bugs_by_type(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.data.shards import ShardError
    from pipeline.errors import exit_code, first_rank_error, record_rank_error, user_message

    assert user_message(ConfigError("unknown config key 'x'")) == "unknown config key 'x'" and \
        exit_code(ConfigError("x")) == 2
    assert user_message(ShardError("shard folder not found: a\n  (b)")) == "shard folder not found: a (b)"
    assert user_message(FileExistsError("runs/x already has checkpoints")) and exit_code(ShardError("x")) == 1
    missing = ModuleNotFoundError("No module named 'deepspeed'", name="deepspeed")
    assert user_message(missing).endswith("pip install deepspeed")
    try:  # our own message naming the pip command, raised from the missing module
        try:
            raise ModuleNotFoundError("No module named 'nvidia.dali'", name="nvidia.dali")
        except ImportError as exc:
            raise ImportError("loader.backend=dali needs NVIDIA DALI: pip install -e '.[dali]'") from exc
    except ImportError as exc:
        assert user_message(exc) == "loader.backend=dali needs NVIDIA DALI: pip install -e '.[dali]'"
    # bugs: a required module missing, anything not named as expected
    assert user_message(ModuleNotFoundError("No module named 'torchh'", name="torchh")) is None
    assert user_message(KeyError("step")) is None and user_message(RuntimeError("boom")) is None

    # ranks in other processes: the earliest recorded expected error is the one reported
    assert not record_rank_error(tmp_path, 0, RuntimeError("a bug: left to print its traceback"))
    assert first_rank_error(tmp_path) is None
    assert record_rank_error(tmp_path, 1, ShardError("rank 1 worker 0: ran out of samples"))
    assert record_rank_error(tmp_path, 0, ConfigError("later"))
    first = first_rank_error(tmp_path)
    assert str(first) == "rank 1: rank 1 worker 0: ran out of samples" and exit_code(first) == 1
