"""Submit a training run to Slurm with submitit.

Thin by design (dinov2 ``run/submit.py``): the job is :class:`TrainJob`, a picklable callable that exports the
torch.distributed environment from Slurm's variables and calls :func:`pipeline.trainer.train`. Timeouts and
preemptions requeue the same callable (``checkpoint()`` returns a ``DelayedSubmission`` of itself); the requeued
job calls ``train`` again, which resumes from ``run_dir/checkpoints/latest`` on its own. On the time-limit signal
the ranks first stop together after one more step and checkpoint it (see :class:`_SlurmSignals`).

``launcher.slurm`` in the config maps onto sbatch options (see :func:`executor_parameters`).
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn, TextIO

import submitit
from submitit.slurm.slurm import SlurmExecutor

from pipeline.config import Config, config_from_dict, config_to_dict
from pipeline.rundir import owner_writes_only

_PROJECT_ROOT = Path(__file__).resolve().parent.parent
_TERMINAL_STATES = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "SPECIAL_EXIT",
    "TIMEOUT",
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
        os.environ["PIPELINE_LAUNCHER"] = "slurm"  # lets read_dist_env() name its source
        signals = _SlurmSignals.install()
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        print(
            f"[slurm] job {os.environ.get('SLURM_JOB_ID')} restart {restarts} rank {dist_env.rank}/"
            f"{dist_env.world_size} local_rank {dist_env.local_rank} node {os.environ.get('SLURMD_NODENAME')} "
            f"master {dist_env.master_addr}:{dist_env.master_port}",
            flush=True,
        )
        from pipeline.trainer import train  # imported here: the submitting process needs no torch/timm

        cfg = config_from_dict(self.config)
        try:
            summary = train(cfg, stop=signals.stop_requested)
        except Exception:
            if not signals.terminated:
                raise
            # Slurm is taking the job down (requeue, preemption, time limit, scancel): the error is the fallout
            # (a DataLoader worker killed by SIGTERM, a peer rank gone), not a training failure. Exit without
            # letting submitit record it as the job's result: the requeued job will write the real one.
            try:
                # torch's DataLoader SIGCHLD handler raises again for every dead worker, even in this block
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                traceback.print_exc()
                print(
                    f"[slurm] rank {dist_env.rank}: training interrupted after SIGTERM; "
                    "exiting so that the job can be requeued (or cancelled) cleanly",
                    file=sys.stderr,
                    flush=True,
                )
                sys.stdout.flush()
            finally:
                os._exit(128 + signal.SIGTERM)
        if summary.get("interrupted") == "stop" and signals.usr_sig not in signals.received:
            # SIGTERM alone: Slurm is preempting, requeueing or cancelling the job and will requeue it (or not)
            # itself; the step in flight is saved, now leave before KillWait's SIGKILL
            where = f": saved {summary['checkpoint']}" if dist_env.rank == 0 else ""
            print(f"[slurm] rank {dist_env.rank}: SIGTERM at step {summary['steps']}{where}, exiting", flush=True)
            sys.stderr.flush()
            os._exit(128 + signal.SIGTERM)
        if summary.get("interrupted") == "stop":
            _hand_over_to_slurm(signals, dist_env.rank, summary, wait_s=cfg.launcher.slurm.signal_delay_s + 60)
        return summary

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 to requeue this same job: after the time-limit signal once ``train`` has
        saved a checkpoint at the step all ranks stopped at (see :func:`_hand_over_to_slurm`).

        Nothing is saved here; the requeued job resumes from ``checkpoints/latest`` (``checkpoint.resume=auto``).
        """
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _hand_over_to_slurm(signals: _SlurmSignals, rank: int, summary: dict[str, Any], wait_s: float) -> NoReturn:
    """Every rank stopped after the time-limit signal and the checkpoint of that step is complete.

    Rank 0 runs submitit's own handler, so its requeue bookkeeping (``max_num_timeout`` countdown) stays submitit's:
    ``checkpoint()`` becomes the job's new pickle, ``scontrol requeue`` ends this attempt, and it exits (or raises
    ``UncompletedJobError``, recorded as the result, once out of timeouts). The other ranks wait for the SIGTERM
    with which Slurm ends the step (requeue or time limit) and exit without a result.
    """
    step, name = summary["steps"], signals.usr_sig.name.removeprefix("SIG")
    if rank == 0:
        print(f"[slurm] rank 0: {name} at step {step}: saved {summary['checkpoint']}, requeueing", flush=True)
        signals.requeue()
    print(f"[slurm] rank {rank}: {name}: stopped at step {step}; waiting for Slurm to end the job step", flush=True)
    if signals.wait_for_sigterm(wait_s):
        sys.stderr.flush()
        os._exit(128 + signal.SIGTERM)
    raise RuntimeError(f"stopped at step {step} after {name}, but Slurm did not end the job step in {wait_s:.0f} s")


class _SlurmSignals:
    """Takes over the handlers submitit installed for Slurm's signals.

    - USR2 (``--signal=USR2@signal_delay_s``, time limit near): only recorded. ``train`` asks
      :meth:`stop_requested` after every step; the ranks agree to stop after the same step and checkpoint it, and
      only then is submitit's handler (checkpoint, requeue, exit) run, through :meth:`requeue`.
    - TERM (Slurm ending the step: requeue, preemption, time limit, scancel): recorded, then submitit's handler (a
      log line) runs. It also stops ``train`` after the step in flight, which is saved if that fits in Slurm's
      KillWait (DataLoader workers ignore it under Slurm, see ``pipeline.data.loader``); errors it causes are told
      from real failures.
    - Both act only in the task process: Slurm signals every process of the step, DataLoader workers included,
      and forked workers inherit the handlers.
    """

    def __init__(self) -> None:
        self.owner = os.getpid()
        self.usr_sig: signal.Signals = submitit.JobEnvironment._usr_sig()
        self.received: set[signal.Signals] = set()
        self._submitit_usr_handler: Any = None

    @classmethod
    def install(cls) -> _SlurmSignals:
        watcher = cls()
        term_handler = signal.getsignal(signal.SIGTERM)
        if callable(term_handler):
            signal.signal(signal.SIGTERM, watcher._wrap(term_handler))
        usr_handler = signal.getsignal(watcher.usr_sig)
        if callable(usr_handler):
            watcher._submitit_usr_handler = usr_handler
            signal.signal(watcher.usr_sig, watcher._wrap(None))
        return watcher

    def _wrap(self, handler: Any) -> Any:
        def record_in_owner(signum: int, frame: Any) -> None:
            if os.getpid() != self.owner:
                return
            self.received.add(signal.Signals(signum))
            if handler is not None:
                handler(signum, frame)

        return record_in_owner

    def stop_requested(self) -> bool:
        """The ``stop`` handed to ``train``: has the time-limit signal (or Slurm's SIGTERM) arrived?"""
        return self.usr_sig in self.received or self.terminated

    @property
    def terminated(self) -> bool:
        return signal.SIGTERM in self.received

    def requeue(self) -> None:
        """Run submitit's handler for the time-limit signal now (it exits, or raises ``UncompletedJobError``)."""
        self._submitit_usr_handler(self.usr_sig, None)

    def wait_for_sigterm(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.terminated and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.terminated


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


def submit_slurm(cfg: Config) -> submitit.Job:
    """Submit ``cfg`` as one Slurm job running :class:`TrainJob` on every task; returns submitit's handle.

    submitit's folder holds the job's pickle, which every (re)start of the job unpickles and runs: it is created
    writable by its owner only, and so is everything the job writes (sbatch hands our umask to the job)."""
    with owner_writes_only():
        return make_executor(cfg).submit(TrainJob(_job_config(cfg)))


def launch_slurm(cfg: Config, *, dry_run: bool = False, wait: bool = False) -> int:
    """Submit ``cfg`` as one Slurm job; print its id, log paths and how to watch or cancel it.

    ``dry_run`` prints the sbatch script instead of submitting. ``wait`` follows the job, streaming rank 0's
    log, and returns its exit status (0 once every task finished ``train``).
    """
    if dry_run:
        print(render_sbatch(cfg), end="")
        return 0
    job = submit_slurm(cfg)
    rank0 = job.task(0) if job.num_tasks > 1 else job
    s = cfg.launcher.slurm
    print(f"Submitted Slurm job {job.job_id} ({s.nodes} node(s) x {s.tasks_per_node} task(s))")
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
        proc = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        # squeue exits 1 with "Invalid job id specified" once the controller forgot the job
        return "" if "Invalid job id" in proc.stderr else None
    lines = proc.stdout.split()
    return lines[0] if lines else ""


class _Inert:
    """Stands in for every class or function a result pickle names: built, called or given state, it does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()

    def __setstate__(self, state: Any) -> None:
        pass


class _OutcomeUnpickler(pickle.Unpickler):
    """Reads submitit's ``(status, result or traceback)`` without importing or calling anything the file names
    (``pickle.load`` would, and the file sits in the run directory): status and traceback are plain strings, and
    that is all the launcher reads."""

    def find_class(self, module: str, name: str) -> Any:
        return _Inert


def _read_outcome(job: submitit.Job) -> tuple[str, Any] | None:
    path = job.paths.result_pickle
    if not path.exists():
        return None
    try:
        with path.open("rb") as f:
            return _OutcomeUnpickler(f).load()
    except Exception:  # noqa: BLE001 (half-written or garbled: no outcome yet, as before)
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
        new_state = _squeue_state(job.job_id)
        if new_state is not None and new_state != state:
            out.write(f"[slurm] job {job.job_id}: {new_state or 'left the queue'}\n")
            out.flush()
            state = new_state
        outcomes = [_read_outcome(t) for t in tasks]
        # A result pickle alone does not end the job: one left by an attempt that was then requeued is stale.
        # Slurm's state decides; pickles are trusted alone only while squeue cannot be reached.
        over = state == "" or state in _TERMINAL_STATES or (new_state is None and all(outcomes))
        if over and all(outcomes):
            break
        if over:
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
