"""What every benchmark mode shares: placing N processes, clocks that wait for the device, peak memory, and a
record of the machine the numbers came from."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

from pipeline.config import Config
from pipeline.distributed import DistEnv, destroy_distributed, init_distributed, pick_device, read_dist_env


def sync(device: torch.device) -> None:
    """Wait for queued device work, so a host clock read after it measures the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def barrier_sync(device: torch.device) -> None:
    sync(device)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_gib(device: torch.device) -> float | None:
    """CUDA: peak memory allocated by tensors since the last reset. CPU: the process's peak resident set size
    (VmHWM), which also holds the interpreter and libraries."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def set_threads(cfg: Config, env: DistEnv, device: torch.device) -> None:
    """The trainer's rule: ``train.threads`` or cores / local processes (CPU only)."""
    if device.type == "cpu":
        torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // max(1, env.local_world_size)))


def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def hardware_slug(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower().replace("nvidia", "").strip()
        return "-".join("".join(c if c.isalnum() else " " for c in name).split())
    return f"cpu{os.cpu_count()}c"


def environment(device: torch.device, world_size: int) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "hardware": hardware_name(device), "device_type": device.type, "world_size": world_size,
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "host": platform.node(),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["device_count"] = torch.cuda.device_count()
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        info["git_commit"] = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                                            text=True, timeout=5, check=False).stdout.strip() or None
        status = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5, check=False).stdout
        info["git_dirty"] = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    if not info["git_commit"] and os.environ.get("PIPELINE_GIT_COMMIT"):
        # a copy of the tree without .git (the GPU run: benchmarks/gpu/run.sh) names its commit here
        info["git_commit"] = os.environ["PIPELINE_GIT_COMMIT"]
        info.pop("git_dirty", None)
    return info


@contextmanager
def stopwatch(device: torch.device, out: list[float]):
    """Append the seconds of the block to ``out``, device synchronised at both ends (all ranks at the start)."""
    barrier_sync(device)
    t = time.perf_counter()
    yield
    sync(device)
    out.append(time.perf_counter() - t)


# ---------------------------------------------------------------------------------------------------------------
# Processes


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        queue.put((rank, "ok", run_in_process(fn, *args)))
    except BaseException:  # noqa: BLE001 - report to the parent instead of leaving it waiting
        queue.put((rank, "error", traceback.format_exc()))


def run_in_process(fn: Callable, cfg: Config, *args: Any) -> Any:
    """``fn(cfg, env, device, *args)`` in this process as one rank of the job its environment describes
    (torchrun variables, or a single process): device picked, threads set, process group created."""
    env = read_dist_env()
    device = pick_device(env, cfg.loader.device)
    set_threads(cfg, env, device)
    created = not torch.distributed.is_initialized()
    init_distributed(env, device, cfg.engine.backend)
    try:
        return fn(cfg, env, device, *args)
    finally:
        if created:
            destroy_distributed()


def run_ranks(fn: Callable, cfg: Config, *args: Any, nprocs: int = 1, timeout: float = 7200,
              spawn: bool = False) -> Any:
    """Run ``fn(cfg, env, device, *args)`` on ``nprocs`` local ranks; returns rank 0's result.

    One process runs here, in this interpreter, unless ``spawn`` (a measurement that needs a fresh process, such
    as peak RSS). More are spawned with torchrun's environment variables (as the
    local launcher does), one device each on GPUs; ``fn`` must be a module-level function."""
    if (nprocs == 1 and not spawn) or "RANK" in os.environ:  # one process, or already one rank of a torchrun / srun job
        return run_in_process(fn, cfg, *args)
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_entry, args=(r, nprocs, port, fn, (cfg, *args), queue)) for r in range(nprocs)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(nprocs):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
                break
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=60 if not errors else 5)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("benchmark rank failed:\n" + "\n".join(errors))
    return results[0]
