"""Local launcher: N processes on this machine with torchrun semantics (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR/PORT set by torch's elastic agent), each running ``pipeline.trainer.train``."""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import uuid

from pipeline.config import Config, config_from_dict, config_to_dict
from pipeline.errors import debug_requested, first_rank_error, record_rank_error


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(cfg_dict: dict, error_dir: str) -> None:
    from pipeline.trainer import train

    try:
        train(config_from_dict(cfg_dict))
    except Exception as exc:
        # an expected error (bad data, no checkpoint, ...) is reported once, by the launcher: exit without a
        # traceback here, which every rank would otherwise print
        if record_rank_error(error_dir, int(os.environ.get("RANK", "0")), exc) and not debug_requested():
            sys.exit(1)
        raise


def launch_local(cfg: Config, *, dry_run: bool = False, wait: bool = True) -> int:
    n = cfg.launcher.nprocs
    if dry_run:
        print(f"would start {n} local process(es) running pipeline.trainer.train for run {cfg.run.dir}")
        return 0
    if n == 1:
        from pipeline.trainer import train

        train(cfg)
        return 0
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    port = free_port()
    launch = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"pipeline-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=0, monitor_interval=0.5,
        start_method="spawn",
    )
    with tempfile.TemporaryDirectory(prefix="pipeline-rank-errors-") as error_dir:
        # torch's per-rank failure report and "terminating process" notes repeat what we say once
        loggers = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing")]
        levels = [log.level for log in loggers]
        if not debug_requested():
            for log in loggers:
                log.setLevel(logging.CRITICAL)
        try:
            elastic_launch(launch, _worker)(config_to_dict(cfg), error_dir)
        except ChildFailedError:
            first = first_rank_error(error_dir)
            if first is None:
                raise
            raise first from None
        finally:
            for log, level in zip(loggers, levels):
                log.setLevel(level)
    return 0
