"""Launch training with Ray Train (``launcher.name=ray``).

Thin on purpose: Ray places ``launcher.ray.num_workers`` worker actors, builds the torch process group and restarts
the whole worker group when one fails; everything about training lives in :func:`pipeline.trainer.train`, which every
worker calls with the same resolved config.

Fault tolerance does not go through Ray checkpoints. Our trainer writes its own checkpoints under
``run_dir/checkpoints`` and resumes from ``latest`` on start (``checkpoint.resume=auto``), so when Ray restarts the
worker group after a failure (up to ``launcher.ray.max_failures`` times) the new workers simply pick up from the last
complete checkpoint. ``run_dir`` must therefore be on storage every node sees (NFS, Lustre, ...), as must the
``run_dir/ray`` folder Ray Train keeps its run state in.

Run it as ``python -m launchers.ray CONFIG.yaml [key=value ...]`` or through the launcher registry. Either way this
process is the run's driver and stays in the foreground until training ends: Ray kills the actors a driver created
(the Ray Train controller and workers) when the driver exits, so there is no job to leave behind and return to. To
detach, submit the command as a Ray Job (``ray job submit``, see docs/cluster.md): the cluster then runs the driver.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import Config, config_from_dict, config_to_dict, load_config
from pipeline.errors import LaunchError, RankError, debug_requested, exit_code, user_message

try:  # Ray is an optional dependency: the module must import without it (dry runs, the launcher registry).
    from ray.train.v2.api.callback import UserCallback
except ImportError:  # pragma: no cover - exercised only without ray installed
    UserCallback = object  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""Folder holding ``pipeline/`` and ``launchers/``: put on the workers' PYTHONPATH (shared file system assumed)."""

# Torch's torchrun-style variables, read by pipeline.distributed.read_dist_env, from the Ray Train context.
_CONTEXT_ENV = {
    "RANK": "get_world_rank",
    "WORLD_SIZE": "get_world_size",
    "LOCAL_RANK": "get_local_rank",
    "LOCAL_WORLD_SIZE": "get_local_world_size",
    "NODE_RANK": "get_node_rank",
}


def _to_builtin(value: Any) -> Any:
    """Tensors and numpy scalars to plain Python numbers, so Ray can store and display them."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


def report_to_ray(metrics: dict[str, Any]) -> None:
    """The ``report`` callable handed to :func:`pipeline.trainer.train` on Ray workers.

    ``ray.train.report`` is a barrier across the worker group: every rank must call it the same number of times,
    which the trainer does by reporting on every rank at each log step.
    """
    import ray.train

    ray.train.report({key: _to_builtin(value) for key, value in metrics.items()})


def export_dist_env() -> dict[str, str]:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, ... from the Ray Train context (Ray 2.60 already sets them; older Ray
    Train versions do not) and mark the process as launched by Ray. Returns what was set."""
    import ray.train

    context = ray.train.get_context()
    values = {name: str(getattr(context, getter)()) for name, getter in _CONTEXT_ENV.items()}
    values["PIPELINE_LAUNCHER"] = "ray"
    os.environ.update(values)
    return values


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Runs on each Ray Train worker: the process group already exists (Ray's TorchConfig makes it)."""
    from pipeline.trainer import train

    export_dist_env()
    try:
        return train(config_from_dict(config), report=report_to_ray)
    except Exception as exc:
        message = user_message(exc)
        if message is None or debug_requested():
            raise
        # Expected (bad data, no checkpoint, ...): Ray logs what a worker raises, with its traceback, in the worker,
        # the controller and the driver; raise only the message, which the driver then reports once.
        raise RankError(message, exit_code(exc)) from None


class MetricsLog(UserCallback):
    """Append what the workers report, and worker failures, to ``run_dir/ray/metrics.jsonl``.

    Runs in the Ray Train controller actor (any node; the run dir is on shared storage). Without Ray checkpoints
    ``Result.metrics`` stays empty, so this file is Ray's record of the run: one ``report`` line per log step with
    rank 0's metrics, one ``worker_failure`` line per failed attempt (the next ``report`` lines show the resume).
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def _append(self, record: dict[str, Any]) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as out:
            out.write(json.dumps({"time": time.time(), **record}, default=str) + "\n")

    def after_report(self, run_context, metrics, checkpoint) -> None:
        self._append({"event": "report", "metrics": metrics[0] if metrics else {}, "world_size": len(metrics)})

    def after_exception(self, run_context, worker_exceptions) -> None:
        self._append({"event": "worker_failure", "ranks": sorted(worker_exceptions),
                      "errors": {rank: repr(exc)[:500] for rank, exc in worker_exceptions.items()}})


def check_ray_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Raise :class:`LaunchError` unless ``host:port`` (or ``ray://host:port``) accepts a TCP connection: an
    unreachable address would otherwise have ``ray.init`` retry for minutes. ``auto`` and other forms are left to
    Ray."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return
    hosts = [host]
    if host in ("127.0.0.1", "localhost"):  # Ray itself connects to this machine's routable address instead
        from ray.util import get_node_ip_address

        with contextlib.suppress(Exception):  # no routable address: loopback is all there is to try
            hosts.append(get_node_ip_address())
    errors = []
    for h in hosts:
        try:
            socket.create_connection((h, int(port)), timeout=timeout_s).close()
            return
        except OSError as exc:
            errors.append(f"{h}:{port}: {exc.strerror or exc}")
    raise LaunchError(f"cannot reach the Ray cluster at launcher.ray.address={address} ({'; '.join(errors)}); "
                      f"start it with `ray start --head`, or leave launcher.ray.address empty for a local cluster")


def _init_ray(cfg: Config) -> None:
    import ray

    ray_cfg = cfg.launcher.ray
    if ray_cfg.address:
        check_ray_reachable(ray_cfg.address)
        try:
            ray.init(address=ray_cfg.address, log_to_driver=True)
        except ConnectionError as exc:
            raise LaunchError(f"cannot connect to the Ray cluster at launcher.ray.address={ray_cfg.address}: "
                              f"{exc}") from exc
        return
    # Starting our own single-machine cluster. Ray would otherwise bind it to (and advertise) the machine's routable
    # address even when asked for 127.0.0.1; with this switch off every Ray process stays on loopback.
    if ray_cfg.local_loopback:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {"address": "local", "dashboard_host": ray_cfg.dashboard_host}
    if ray_cfg.temp_dir:
        kwargs["_temp_dir"] = str(Path(ray_cfg.temp_dir).resolve())
    if ray_cfg.local_num_cpus:
        kwargs["num_cpus"] = ray_cfg.local_num_cpus
    ray.init(**kwargs)


def build_trainer(cfg: Config):
    """The TorchTrainer for ``cfg`` (separate from running it, so it can be inspected in a dry run)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray_cfg = cfg.launcher.ray
    resources = {"CPU": ray_cfg.cpus_per_worker}
    if ray_cfg.gpus_per_worker:
        resources["GPU"] = ray_cfg.gpus_per_worker
    backend = None if cfg.engine.backend == "auto" else cfg.engine.backend
    pythonpath = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config_to_dict(cfg),
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(
            num_workers=ray_cfg.num_workers,
            use_gpu=ray_cfg.gpus_per_worker > 0,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=str(ray_storage_path(cfg)),
            failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
            # We keep no Ray checkpoints (the trainer resumes from its own); keep Ray's bookkeeping minimal.
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[MetricsLog(str(ray_storage_path(cfg) / "metrics.jsonl"))],
            worker_runtime_env={"env_vars": {"PIPELINE_LAUNCHER": "ray", "PYTHONPATH": pythonpath}},
        ),
    )


def ray_storage_path(cfg: Config) -> Path:
    """Where Ray Train keeps its run state: ``run_dir/ray`` (absolute, as Ray requires)."""
    return (Path(cfg.run.dir) / "ray").resolve()


def describe(cfg: Config) -> str:
    ray_cfg = cfg.launcher.ray
    where = f"cluster at {ray_cfg.address}" if ray_cfg.address else "a new local cluster"
    return (
        f"Ray Train on {where}: {ray_cfg.num_workers} workers x {ray_cfg.cpus_per_worker} CPU"
        f"{f' + {ray_cfg.gpus_per_worker} GPU' if ray_cfg.gpus_per_worker else ''}, "
        f"max_failures={ray_cfg.max_failures}, run_dir={Path(cfg.run.dir).resolve()}, "
        f"ray storage={ray_storage_path(cfg)}"
    )


def launch_ray(cfg: Config, *, dry_run: bool = False) -> int:
    """Run ``cfg`` with Ray Train and return once it ended: 0 when training finished, 1 when it failed past
    ``max_failures``. ``dry_run`` prints the plan and touches neither Ray nor the run directory.
    """
    if cfg.launcher.name != "ray":
        log.info("launcher.name=%s, launching with Ray anyway", cfg.launcher.name)
    print(describe(cfg), flush=True)
    if dry_run:
        return 0
    print("This process is the Ray Train driver: it stays in the foreground until the run ends, and stopping it "
          "stops the run (to detach, submit it as a Ray Job: see docs/cluster.md).", flush=True)

    import ray
    from ray.train import TrainingFailedError

    _init_ray(cfg)
    try:
        nodes = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
        print(f"Ray cluster nodes: {', '.join(nodes)}", flush=True)
        started = time.perf_counter()
        try:
            result = build_trainer(cfg).fit()
        except TrainingFailedError as exc:
            first = _first_expected_worker_error(exc)
            if first is not None:
                raise first from None  # bad data, no checkpoint, ...: one line, not every worker's traceback
            print(f"Ray Train run failed: {exc}", file=sys.stderr, flush=True)
            return 1
        print(f"Ray Train run finished in {time.perf_counter() - started:.1f}s; last metrics: {result.metrics}; "
              f"rank 0 returned: {result.return_value}", flush=True)
        return 0
    finally:
        ray.shutdown()


def _first_expected_worker_error(exc: Exception) -> RankError | None:
    """The expected error (see :mod:`pipeline.errors`) of the lowest worker rank that failed with one, if any."""
    for rank, failure in sorted(getattr(exc, "worker_failures", {}).items()):
        message = user_message(failure)  # Ray hands back what the worker raised (a RankError, see above)
        if message is not None:
            return RankError(f"rank {rank}: {message}", exit_code(failure))
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m launchers.ray CONFIG.yaml [key=value ...]")
        return 2
    logging.basicConfig(level=logging.INFO)
    return launch_ray(load_config(argv[0], argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
