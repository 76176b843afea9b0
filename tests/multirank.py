"""Run a function on N real gloo ranks (spawned processes) and collect what each rank returns."""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, queue, init_pg: bool) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    try:
        if init_pg:
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
        queue.put((rank, "ok", pickle.dumps(fn(*args))))  # bytes: tensors must not travel as shared memory
    except BaseException:  # noqa: BLE001 report to the parent instead of hanging it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if init_pg and dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, *args: Any, world_size: int = 2, init_pg: bool = True, timeout: float = 600) -> list:
    """``fn(*args)`` on each rank (a module-level function: it is pickled); returns results in rank order.
    With ``init_pg=False`` the environment is set but the process group is left to ``fn`` (e.g. train())."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue, init_pg))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
            results[rank] = pickle.loads(value) if status == "ok" else value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
