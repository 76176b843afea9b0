"""Submit a training run to Slurm with submitit.

Thin by design (dinov2 ``run/submit.py``): the job is :class:`TrainJob`, a picklable callable that exports the
torch.distributed environment from Slurm's variables and calls :func:`pipeline.trainer.train`. Timeouts and
preemptions requeue the same callable (``checkpoint()`` returns a ``DelayedSubmission`` of itself); the requeued
job calls ``train`` again, which resumes from ``run_dir/checkpoints/latest`` on its own.

``launcher.slurm`` in the config maps onto sbatch options (see :func:`executor_parameters`).
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import submitit
from submitit.slurm.slurm import SlurmExecutor

from pipeline.config import Config, config_from_dict, config_to_dict

_PROJECT_ROOT = Path(__file__).resolve().parent.parent
_TERMINAL_STATES = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
    "TIMEOUT", "SPECIAL_EXIT",
}  # fmt: skip


class TrainJob(submitit.helpers.Checkpointable):
    """What runs on every task of the allocation: Slurm env -> torch env, then ``train``."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        """The resolved config as a plain dict (``config_to_dict``), so the pickle does not pin dataclass layout."""

    def __call__(self) -> dict:
        dist_env = submitit.helpers.TorchDistributedEnvironment()
        # Leave CUDA_VISIBLE_DEVICES to Slurm: the trainer picks cuda:local_rank among the GPUs Slurm gave us
        # (submitit would otherwise narrow it to str(local_rank), wrong when Slurm hands out e.g. GPUs 4-7).
        # overwrite: a job submitted from inside another distributed job must not inherit its RANK/MASTER_*.
        dist_env.export(set_cuda_visible_devices=False, overwrite=True)
        _ignore_requeue_signal_in_children()
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        print(
            f"[slurm] job {os.environ.get('SLURM_JOB_ID')} restart {restarts} rank {dist_env.rank}/"
            f"{dist_env.world_size} local_rank {dist_env.local_rank} node {os.environ.get('SLURMD_NODENAME')} "
            f"master {dist_env.master_addr}:{dist_env.master_port}",
            flush=True,
        )
        from pipeline.trainer import train  # imported here: the submitting process needs no torch/timm

        return train(config_from_dict(self.config))

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 when Slurm signals a timeout or preemption: requeue this same job.

        Training state is not saved here: ``train`` checkpoints every ``checkpoint.every_steps`` and the
        requeued job resumes from the latest complete checkpoint (``checkpoint.resume=auto``).
        """
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _ignore_requeue_signal_in_children() -> None:
    """Make submitit's timeout/preemption handler act only in the task process, not in its forked children.

    Slurm signals every process of the step, DataLoader workers included, and forked workers inherit submitit's
    handler: each would run ``checkpoint()`` and ``scontrol requeue`` again. Children now ignore the signal.
    """
    usr_sig = submitit.JobEnvironment._usr_sig()
    handler = signal.getsignal(usr_sig)
    if not callable(handler):
        return
    owner = os.getpid()

    def handle_in_owner(signum: int, frame: Any) -> None:
        if os.getpid() == owner:
            handler(signum, frame)

    signal.signal(usr_sig, handle_in_owner)


# ---------------------------------------------------------------------------------------------------------------
# Submission


def submitit_folder(cfg: Config) -> Path:
    """Where submitit writes the sbatch script, pickles and logs (``%j`` is replaced by the job id)."""
    folder = cfg.launcher.slurm.folder or str(cfg.run.dir / "slurm" / "%j")
    return Path(folder).expanduser().absolute()


def executor_parameters(cfg: Config) -> dict[str, Any]:
    """``launcher.slurm`` -> ``AutoExecutor.update_parameters`` keyword arguments (empty/zero options left out)."""
    s = cfg.launcher.slurm
    params: dict[str, Any] = {
        "name": s.job_name or cfg.run.name,
        "nodes": s.nodes,
        "tasks_per_node": s.tasks_per_node,
        "cpus_per_task": s.cpus_per_task,
        "timeout_min": s.timeout_min,
        "slurm_signal_delay_s": s.signal_delay_s,
        # the job imports this checkout's code, whatever the submitting shell's PYTHONPATH was
        "slurm_setup": [f"export PYTHONPATH={_PROJECT_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}", *s.setup],
    }
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    if s.mem_gb:
        params["mem_gb"] = s.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(s, key):
            params[f"slurm_{key}"] = getattr(s, key)
    if s.exclusive:
        params["slurm_exclusive"] = True
    if s.additional_parameters:
        params["slurm_additional_parameters"] = dict(s.additional_parameters)
    return params


def make_executor(cfg: Config) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(
        folder=submitit_folder(cfg), cluster="slurm", slurm_max_num_timeout=cfg.launcher.slurm.max_num_timeout
    )
    executor.update_parameters(**executor_parameters(cfg))
    return executor


class _ScriptRenderer(SlurmExecutor):
    """A SlurmExecutor that only renders sbatch scripts, so ``--dry-run`` works where Slurm is not installed."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def render_sbatch(cfg: Config) -> str:
    """The sbatch script that :func:`launch_slurm` would submit, rendered by submitit itself."""
    renderer = _ScriptRenderer(submitit_folder(cfg), max_num_timeout=cfg.launcher.slurm.max_num_timeout)
    params = executor_parameters(cfg)
    # same translation as AutoExecutor: generic names through the executor's converter, slurm_* verbatim
    native = renderer._convert_parameters({k: v for k, v in params.items() if not k.startswith("slurm_")})
    native.update({k[len("slurm_") :]: v for k, v in params.items() if k.startswith("slurm_")})
    renderer.update_parameters(**native)
    return renderer._make_submission_file_text(renderer._submitit_command_str, uid="dry-run")


def _job_config(cfg: Config) -> dict[str, Any]:
    data = config_to_dict(cfg)
    # the job may start in another working directory (sbatch --chdir, a requeue after a cd): pin the run dir
    data["run"]["output_dir"] = str(Path(cfg.run.output_dir).expanduser().absolute())
    return data


def launch_slurm(cfg: Config, *, dry_run: bool = False, wait: bool = False) -> int:
    """Submit ``cfg`` as one Slurm job; print its id, log paths and how to watch or cancel it.

    ``dry_run`` prints the sbatch script instead of submitting. ``wait`` follows the job, streaming rank 0's
    log, and returns its exit status (0 once every task finished ``train``).
    """
    if dry_run:
        print(render_sbatch(cfg), end="")
        return 0
    executor = make_executor(cfg)
    job = executor.submit(TrainJob(_job_config(cfg)))
    rank0 = job.task(0) if job.num_tasks > 1 else job
    print(f"Submitted Slurm job {job.job_id} ({cfg.launcher.slurm.nodes} node(s) x {cfg.launcher.slurm.tasks_per_node} task(s))")
    print(f"  run dir:   {Path(cfg.run.dir).absolute()}")
    print(f"  stdout:    {rank0.paths.stdout}  (rank r: {rank0.paths.folder}/{job.job_id}_<r>_log.out)")
    print(f"  stderr:    {rank0.paths.stderr}")
    print(f"  watch:     squeue -j {job.job_id}")
    print(f"  cancel:    scancel {job.job_id}")
    sys.stdout.flush()
    if wait:
        return follow_job(job)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Following a job


def _squeue_state(job_id: str) -> str | None:
    """Job state from squeue ("" once the job left the queue, None if squeue itself failed)."""
    try:
        proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        # squeue exits 1 with "Invalid job id specified" once the controller forgot the job
        return "" if "Invalid job id" in proc.stderr else None
    lines = proc.stdout.split()
    return lines[0] if lines else ""


def _read_outcome(job: submitit.Job) -> tuple[str, Any] | None:
    path = job.paths.result_pickle
    if not path.exists():
        return None
    try:
        with path.open("rb") as f:
            return pickle.load(f)
    except (EOFError, pickle.UnpicklingError):
        return None


def _stream(path: Path, pos: int, out: TextIO) -> int:
    try:
        with path.open("rb") as f:
            f.seek(pos)
            chunk = f.read()
    except FileNotFoundError:
        return pos
    if chunk:
        out.write(chunk.decode(errors="replace"))
        out.flush()
    return pos + len(chunk)


def follow_job(job: submitit.Job, poll_s: float = 2.0, out: TextIO | None = None) -> int:
    """Stream rank 0's stdout until the job ends (requeues included); 0 if every task returned from ``train``.

    Works without Slurm accounting: states come from ``squeue``, outcomes from submitit's result pickles.
    """
    out = out or sys.stdout
    tasks = [job.task(i) for i in range(job.num_tasks)] if job.num_tasks > 1 else [job]
    log = tasks[0].paths.stdout
    pos, state, ended_at = 0, "SUBMITTED", None
    while True:
        pos = _stream(log, pos, out)
        outcomes = [_read_outcome(t) for t in tasks]
        if all(outcomes):
            break
        new_state = _squeue_state(job.job_id)
        if new_state is not None and new_state != state:
            out.write(f"[slurm] job {job.job_id}: {new_state or 'left the queue'}\n")
            out.flush()
            state = new_state
        if state == "" or state in _TERMINAL_STATES:
            # result pickles are written just before the tasks exit; give a slow shared filesystem a moment
            ended_at = ended_at or time.monotonic()
            if time.monotonic() - ended_at > 30:
                break
        else:
            ended_at = None
        time.sleep(poll_s)
    pos = _stream(log, pos, out)
    failed = [i for i, o in enumerate(outcomes) if not o or o[0] != "success"]
    if not failed:
        out.write(f"[slurm] job {job.job_id} finished: all {len(tasks)} task(s) succeeded\n")
        return 0
    out.write(f"[slurm] job {job.job_id} failed (state {state or 'unknown'}) on task(s) {failed}\n")
    first = outcomes[failed[0]]
    if first and first[0] == "error":
        out.write(str(first[1]))
    else:
        err = tasks[failed[0]].paths.stderr
        if err.exists():
            out.write(f"--- last lines of {err} ---\n" + "\n".join(err.read_text(errors="replace").splitlines()[-30:]))
    out.write("\n")
    out.flush()
    return 1
