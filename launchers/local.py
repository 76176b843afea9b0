"""Local launcher: N processes on this machine with torchrun semantics (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR/PORT set by torch's elastic agent), each running ``pipeline.trainer.train``."""

from __future__ import annotations

import socket
import uuid

from pipeline.config import Config, config_from_dict, config_to_dict


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(cfg_dict: dict) -> None:
    from pipeline.trainer import train

    train(config_from_dict(cfg_dict))


def launch_local(cfg: Config, *, dry_run: bool = False, wait: bool = True) -> int:
    n = cfg.launcher.nprocs
    if dry_run:
        print(f"would start {n} local process(es) running pipeline.trainer.train for run {cfg.run.dir}")
        return 0
    if n == 1:
        from pipeline.trainer import train

        train(cfg)
        return 0
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    port = free_port()
    launch = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"pipeline-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=0, monitor_interval=0.5,
        start_method="spawn",
    )
    elastic_launch(launch, _worker)(config_to_dict(cfg))
    return 0
