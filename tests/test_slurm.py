"""Slurm launcher: sbatch parameter mapping (fast), then real jobs on a throwaway 2-node cluster (``-m slurm``).

The cluster tests start one slurmctld and two slurmd on this machine (see ``slurm_cluster.py``), submit through
``launch_slurm`` exactly as a user would, and train the tiny Fashion-MNIST SimCLR run with the real
``pipeline.trainer.train`` on 2 "nodes" x 1 task (DDP over gloo). No mocks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
from conftest import tiny_overrides
from slurm_cluster import ClusterUnavailable, SlurmCluster, ensure_slurm_installed

from launchers.slurm import (
    TrainJob,
    executor_parameters,
    launch_slurm,
    render_sbatch,
    submit_slurm,
    submitit_folder,
)
from pipeline.config import ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def slurm_config(run_dir: Path, overrides: list[str] | None = None, **extra):
    base = {"launcher.name": "slurm", "run.output_dir": str(run_dir.parent), "run.name": run_dir.name}
    base.update(extra)
    return load_config(QUICKSTART, [*(overrides or []), *(f"{k}={v}" for k, v in base.items())])


# ---------------------------------------------------------------------------------------------------------------
# Fast: parameter mapping and rendering (no cluster)


def test_executor_parameters_map_every_slurm_option(tmp_path):
    cfg = slurm_config(
        tmp_path / "big",
        [
            "launcher.slurm.nodes=4", "launcher.slurm.tasks_per_node=8", "launcher.slurm.gpus_per_node=8",
            "launcher.slurm.cpus_per_task=10", "launcher.slurm.mem_gb=480", "launcher.slurm.timeout_min=1440",
            "launcher.slurm.partition=gpu", "launcher.slurm.account=vision", "launcher.slurm.qos=high",
            "launcher.slurm.constraint=h100", "launcher.slurm.exclusive=true", "launcher.slurm.job_name=ssl-vit",
            "launcher.slurm.signal_delay_s=180", "launcher.slurm.additional_parameters={reservation: big}",
            "launcher.slurm.setup=['module load cuda/12.4']",
        ],
    )  # fmt: skip
    params = executor_parameters(cfg)
    assert params.pop("slurm_setup")[1:] == ["module load cuda/12.4"]
    assert params == {
        "name": "ssl-vit", "nodes": 4, "tasks_per_node": 8, "gpus_per_node": 8, "cpus_per_task": 10,
        "mem_gb": 480.0, "timeout_min": 1440, "slurm_partition": "gpu", "slurm_account": "vision",
        "slurm_qos": "high", "slurm_constraint": "h100", "slurm_exclusive": True, "slurm_signal_delay_s": 180,
        "slurm_additional_parameters": {"reservation": "big"},
    }  # fmt: skip


def test_executor_parameters_leave_unset_options_to_slurm(tmp_path):
    params = executor_parameters(slurm_config(tmp_path / "small"))
    assert params["name"] == "small"  # job name defaults to the run name
    for absent in ("gpus_per_node", "mem_gb", "slurm_partition", "slurm_account", "slurm_qos", "slurm_constraint",
                   "slurm_exclusive", "slurm_additional_parameters"):  # fmt: skip
        assert absent not in params


def test_dry_run_renders_the_sbatch_script(tmp_path, capsys):
    cfg = slurm_config(
        tmp_path / "big",
        [
            "launcher.slurm.nodes=4", "launcher.slurm.tasks_per_node=8", "launcher.slurm.gpus_per_node=8",
            "launcher.slurm.cpus_per_task=10", "launcher.slurm.mem_gb=480", "launcher.slurm.timeout_min=1440",
            "launcher.slurm.partition=gpu", "launcher.slurm.exclusive=true", "launcher.slurm.signal_delay_s=180",
            "launcher.slurm.additional_parameters={reservation: big}",
        ],
    )  # fmt: skip
    assert launch_slurm(cfg, dry_run=True) == 0
    script = capsys.readouterr().out
    folder = submitit_folder(cfg)
    assert folder == (tmp_path / "big" / "slurm" / "%j").absolute()
    for line in (
        "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=10",
        "#SBATCH --mem=480GB", "#SBATCH --time=1440", "#SBATCH --partition=gpu", "#SBATCH --exclusive",
        "#SBATCH --signal=USR2@180", "#SBATCH --reservation=big", "#SBATCH --job-name=big",
        f"#SBATCH --output={folder}/%j_0_log.out", "#SBATCH --open-mode=append",
    ):  # fmt: skip
        assert line in script.splitlines(), f"{line!r} missing from:\n{script}"
    assert "export PYTHONPATH=" in script
    srun = r"^srun --unbuffered --output .*_%t_log\.out .* -m submitit\.core\._submit "
    assert re.search(srun, script, re.MULTILINE)
    assert not folder.parent.exists(), "a dry run must not create the run directory"


@pytest.mark.skipif(shutil.which("srun") is None, reason="submitit's SlurmExecutor needs srun on PATH")
def test_dry_run_is_what_submission_would_write(tmp_path):
    """--dry-run renders without Slurm; it must match the executor that really submits."""
    from launchers.slurm import make_executor

    cfg = slurm_config(tmp_path / "r", ["launcher.slurm.nodes=2", "launcher.slurm.mem_gb=1.5",
                                        "launcher.slurm.qos=low"])  # fmt: skip
    executor = make_executor(cfg)._executor
    assert executor.max_num_timeout == cfg.launcher.slurm.max_num_timeout
    assert render_sbatch(cfg) == executor._make_submission_file_text(executor._submitit_command_str, uid="x")


def test_slurm_config_rejects_a_signal_after_the_time_limit(tmp_path):
    with pytest.raises(ConfigError, match="signal_delay_s"):
        slurm_config(tmp_path / "r", ["launcher.slurm.timeout_min=1", "launcher.slurm.signal_delay_s=60"])


def test_train_job_requeues_itself_with_an_absolute_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(QUICKSTART, ["launcher.name=slurm", "run.output_dir=relative/runs"])
    from launchers.slurm import _job_config

    job = TrainJob(_job_config(cfg))
    assert config_from_dict(job.config).run.dir == tmp_path / "relative" / "runs" / "quickstart"
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and delayed.function is job


# ---------------------------------------------------------------------------------------------------------------
# Real cluster


@pytest.fixture
def slurm_cluster(tmp_path, monkeypatch):
    """A fresh 2-node cluster (fresh state dir, job ids from its own FirstJobId) per test; always torn down."""
    try:
        ensure_slurm_installed()
    except ClusterUnavailable as exc:
        pytest.skip(str(exc))
    cluster = SlurmCluster(tmp_path / "cluster")
    try:
        cluster.start()
        monkeypatch.setenv("SLURM_CONF", str(cluster.conf))  # for sbatch/squeue run by submitit and the launcher
        yield cluster
    finally:
        cluster.stop()


def tiny_slurm_config(shards, run_dir: Path, **extra):
    """The tiny SimCLR run on 2 nodes x 1 task, one thread per process (2 processes share 2 cores)."""
    slurm = {
        "launcher.name": "slurm", "launcher.slurm.nodes": 2, "launcher.slurm.tasks_per_node": 1,
        "launcher.slurm.cpus_per_task": 1, "launcher.slurm.timeout_min": 10, "launcher.slurm.signal_delay_s": 30,
        "train.threads": 1,
    }  # fmt: skip
    slurm.update(extra)
    return load_config(QUICKSTART, tiny_overrides(shards, run_dir, **slurm))


def job_logs(run_dir: Path, job_id: str) -> list[str]:
    folder = run_dir / "slurm" / job_id
    return [(folder / f"{job_id}_{rank}_log.out").read_text() for rank in (0, 1)]


def assert_finished_run(run_dir: Path, steps: int) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == steps
    latest = (run_dir / "checkpoints" / "latest").resolve()
    assert latest.name == f"step_{steps:08d}"
    assert json.loads((latest / "trainer.json").read_text())["world_size"] == 2
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == steps


def resumed_steps(rank0_log: str) -> list[int]:
    return [int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", rank0_log)]


@pytest.mark.slurm
def test_two_node_job_trains_through_launch_slurm(fmnist_shards, slurm_cluster, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "two-node"
    cfg = tiny_slurm_config(fmnist_shards, run_dir)
    code = launch_slurm(cfg, wait=True)
    out = capsys.readouterr().out
    assert code == 0, out + slurm_cluster.logs()
    job_id = re.search(r"Submitted Slurm job (\d+)", out).group(1)
    assert f"squeue -j {job_id}" in out and f"scancel {job_id}" in out
    assert "all 2 task(s) succeeded" in out

    assert_finished_run(run_dir, cfg.train.steps)
    rank0, rank1 = job_logs(run_dir, job_id)
    # ranks and master come from Slurm: rank r on node n{r+1}, both rendezvous at the first node of the allocation
    m0 = re.search(r"rank 0/2 local_rank 0 node n1 master n1:(\d+)", rank0)
    m1 = re.search(r"rank 1/2 local_rank 0 node n2 master n1:(\d+)", rank1)
    assert m0 and m1 and m0.group(1) == m1.group(1), (rank0, rank1)
    assert "2 x cpu" in rank0  # the trainer itself saw a world of 2
    assert "2 x cpu" in out  # rank 0's log was streamed to the submitting terminal


# Runs that no machine can finish while a test watches them: a time limit or a requeue always interrupts them first,
# however fast the machine, and the test ends the job itself (scancel) once the requeued attempt has trained on.
ENDLESS = 1_000_000
# squeue's states of a job that has not ended (SIGNALING, STAGE_OUT and friends are passing states of a live job; a
# list of these missed SIGNALING once and failed CI): everything but "" (left the queue) and the terminal states.
_ENDED = ("", "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
          "OUT_OF_MEMORY", "REVOKED", "SPECIAL_EXIT")


def logged_steps(run_dir: Path) -> list[int]:
    """Steps in ``metrics.jsonl`` (complete lines only: a rank may be writing the last one)."""
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line)["step"] for line in text.split("\n")[:-1]]


def wait_until_resumed_and_trained_on(cluster: SlurmCluster, job: submitit.Job, run_dir: Path) -> int:
    """Wait (a 10-minute ceiling for a broken job, no timing assumption) until an attempt of ``job`` has resumed
    from a checkpoint and logged a later step; then cancel the job and wait for it to end. Returns the resume step."""
    log0 = run_dir / "slurm" / job.job_id / f"{job.job_id}_0_log.out"
    deadline = time.monotonic() + 600
    while True:
        resumed = resumed_steps(log0.read_text(errors="replace")) if log0.exists() else []
        logged = logged_steps(run_dir)
        if resumed and logged and logged[-1] > resumed[0]:
            break
        state = cluster.job_state(job.job_id)
        assert state not in _ENDED, f"job ended ({state}) before a requeued attempt trained on\n{cluster.logs()}"
        assert time.monotonic() < deadline, "no resumed attempt within 10 minutes\n" + cluster.logs()
        time.sleep(1)
    # Cancel until the job stays ended: an attempt that got its time-limit signal just before may still requeue the
    # cancelled job (scontrol requeue takes finished jobs too) once its checkpoint is saved.
    deadline = time.monotonic() + 300
    while (state := cluster.job_state(job.job_id)) not in _ENDED:
        assert time.monotonic() < deadline, f"job still {state} 5 minutes after scancel\n" + cluster.logs()
        cluster.run("scancel", job.job_id, check=False)
        time.sleep(1)
    return resumed[0]


def assert_each_step_trained_once(run_dir: Path, beyond: int) -> None:
    """``metrics.log_every=1``: every step 1..N logged exactly once across all attempts (a resume from anything but
    the step an attempt stopped at would log a step twice or skip one), and training went on past ``beyond``."""
    logged = logged_steps(run_dir)
    assert logged == list(range(1, len(logged) + 1)), logged
    assert logged[-1] > beyond, logged


@pytest.mark.slurm
def test_time_limit_signals_requeues_and_resumes(fmnist_shards, slurm_cluster, tmp_path):
    """3-minute limit, USR2 160 s before it, on a run of a million steps: Slurm's own time limit interrupts the first
    attempt whatever the machine's speed. Every rank stops after the same step, that step is checkpointed, submitit
    requeues the job, and the requeued attempt resumes from exactly that step and trains on; then the test cancels.

    ``checkpoint.every_steps`` is the length of the run, so the only checkpoints are those written on a signal: a
    resume from anything else, or a step trained twice, shows in ``metrics.jsonl``. slurmctld checks time limits
    every 30 s, so the signal lands 20-50 s into an attempt; an attempt that gets it before its first step still
    trains and saves one step (the ranks are asked only after a step), and has until the limit (3 minutes) to start,
    take that step and save it however loaded the machine is.
    """
    run_dir = tmp_path / "runs" / "timeout"
    cfg = tiny_slurm_config(
        fmnist_shards, run_dir, **{"train.steps": ENDLESS, "checkpoint.every_steps": ENDLESS, "metrics.log_every": 1,
                                   "launcher.slurm.timeout_min": 3, "launcher.slurm.signal_delay_s": 160,
                                   "launcher.slurm.max_num_timeout": 20}
    )  # fmt: skip
    job = submit_slurm(cfg)
    resumed_at = wait_until_resumed_and_trained_on(slurm_cluster, job, run_dir)

    rank0, rank1 = job_logs(run_dir, job.job_id)
    # rank 0 saved the step all ranks stopped at, then ran submitit's own handler: timeout bookkeeping and requeue
    saved = re.findall(r"\[slurm\] rank 0: USR2 at step (\d+): saved (\S+), requeueing", rank0)
    assert saved, rank0
    signalled = int(saved[0][0])
    assert 0 < signalled and Path(saved[0][1]) == (run_dir / "checkpoints" / f"step_{signalled:08d}").resolve()
    assert re.findall(r"rank 1: USR2: stopped at step (\d+)", rank1)[:1] == [str(signalled)], rank1
    assert "Caught signal SIGUSR2" in rank0 and "this job is timed-out" in rank0, rank0
    assert f"Requeued job {job.job_id}" in rank0
    # the requeued attempt resumed exactly where the first one stopped, and went on from there
    assert resumed_at == signalled, rank0
    assert_each_step_trained_once(run_dir, beyond=signalled)
    assert slurm_cluster.job_restart_count(job.job_id) >= 1


@pytest.mark.slurm
@pytest.mark.parametrize("backend", ["dali", "torch"])  # torch: its DataLoader workers must survive the SIGTERM
def test_preemption_by_scontrol_requeue_resumes(fmnist_shards, slurm_cluster, tmp_path, backend):
    """``scontrol requeue`` sends SIGTERM to every task (SIGKILL after KillWait) and queues the job again: the ranks
    stop together after the step in flight, save it, and exit; the same submitted TrainJob starts over and
    ``train`` resumes from that step. The run has a million steps, so the requeue always lands mid-run."""
    run_dir = tmp_path / "runs" / "preempt"
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    cfg = tiny_slurm_config(fmnist_shards, run_dir, **{"train.steps": ENDLESS, "checkpoint.every_steps": 50,
                                                       "metrics.log_every": 1, "loader.backend": backend})
    job = submit_slurm(cfg)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    while not latest.exists():
        assert time.monotonic() < deadline, "no checkpoint after 10 minutes\n" + slurm_cluster.logs()
        assert slurm_cluster.job_state(job.job_id) not in _ENDED, slurm_cluster.logs()
        time.sleep(0.5)
    periodic = int(latest.resolve().name.split("_")[1])
    slurm_cluster.run("scontrol", "requeue", job.job_id)
    resumed_at = wait_until_resumed_and_trained_on(slurm_cluster, job, run_dir)

    rank0, _ = job_logs(run_dir, job.job_id)
    saved = re.findall(r"\[slurm\] rank 0: SIGTERM at step (\d+): saved \S+step_0*(\d+)", rank0)
    assert saved and saved[0][0] == saved[0][1], rank0
    stopped = int(saved[0][0])
    assert periodic <= stopped, rank0  # the step in flight, not only the last periodic checkpoint
    assert resumed_at == stopped, rank0
    assert_each_step_trained_once(run_dir, beyond=stopped)
    assert slurm_cluster.job_restart_count(job.job_id) >= 1


@pytest.mark.slurm
def test_run_started_locally_resumes_on_slurm(fmnist_shards, slurm_cluster, tmp_path, capsys):
    """One run directory, two launchers: 2 local processes stop at step 6 (``train.stop_at_step``, so the schedule
    still spans all 12 steps), then a 2-node Slurm job resumes that run from step 6 and finishes it."""
    run_dir = tmp_path / "runs" / "moved"
    steps, stop_at = 12, 6
    common = {"train.steps": steps, "checkpoint.every_steps": 4, "metrics.log_every": 2, "train.threads": 1}
    local = tiny_overrides(fmnist_shards, run_dir, **common, **{"launcher.nprocs": 2, "train.stop_at_step": stop_at})
    proc = subprocess.run([sys.executable, "-m", "pipeline", "launch", str(QUICKSTART), *local], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"stopped at step {stop_at} of {steps}" in proc.stdout + proc.stderr
    assert (run_dir / "checkpoints" / "latest").resolve().name == f"step_{stop_at:08d}"  # not a periodic one
    assert not (run_dir / "summary.json").exists()

    cfg = tiny_slurm_config(fmnist_shards, run_dir, **common)
    assert cfg.train.stop_at_step == 0 and cfg.checkpoint.resume == "auto"
    code = launch_slurm(cfg, wait=True)
    out = capsys.readouterr().out
    assert code == 0, out + slurm_cluster.logs()
    job_id = re.search(r"Submitted Slurm job (\d+)", out).group(1)
    rank0, _ = job_logs(run_dir, job_id)
    assert resumed_steps(rank0) == [stop_at], rank0
    assert "2 x cpu (slurm)" in rank0
    assert_finished_run(run_dir, steps)
    # one metrics log: steps 2-6 written by the local processes, 8-12 by the Slurm job
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(2, steps + 1, 2)), logged


@pytest.mark.slurm
def test_dry_run_script_passes_sbatch_test_only(slurm_cluster, tmp_path, capsys):
    cfg = slurm_config(tmp_path / "dry", ["launcher.slurm.nodes=2", "launcher.slurm.cpus_per_task=1",
                                          "launcher.slurm.timeout_min=30", "launcher.slurm.partition=debug",
                                          "launcher.slurm.additional_parameters={comment: dry-run}"])  # fmt: skip
    assert launch_slurm(cfg, dry_run=True) == 0
    script = tmp_path / "job.sbatch"
    script.write_text(capsys.readouterr().out)
    proc = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "to start at" in proc.stderr, proc.stderr
    assert slurm_cluster.run("squeue", "-h").stdout.strip() == ""  # nothing was submitted


@pytest.mark.slurm
def test_wait_returns_nonzero_when_training_fails(fmnist_shards, slurm_cluster, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "broken"
    cfg = tiny_slurm_config(fmnist_shards, run_dir, **{"data.train_shards": str(tmp_path / "no-such-shards")})
    assert launch_slurm(cfg, wait=True) == 1
    out = capsys.readouterr().out
    # the first rank's expected error reaches the terminal as one line, not as every rank's traceback
    failed = [line for line in out.splitlines() if "failed" in line]
    assert len(failed) == 1 and re.search(r"failed \(state \w+\): rank [01]: shard folder not found: \S*no-such-shards",
                                          failed[0]), out
    assert "Traceback" not in out


@pytest.mark.slurm
def test_wait_shows_the_traceback_when_debugging(fmnist_shards, slurm_cluster, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PIPELINE_DEBUG", "1")
    cfg = tiny_slurm_config(fmnist_shards, tmp_path / "runs" / "broken", **{"data.train_shards": "no-such-shards"})
    assert launch_slurm(cfg, wait=True) == 1
    out = capsys.readouterr().out
    assert "Traceback" in out and "ShardError: shard folder not found" in out, out
