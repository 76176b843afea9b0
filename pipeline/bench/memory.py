"""``bench memory``: what each engine keeps resident on each rank, counted tensor by tensor, and the process's
peak resident set size.

Each engine trains a few real steps on synthetic batches through its own ``micro_step`` and ``step`` (the
trainer's path). Before the last optimizer step, when gradients, parameters and optimizer state are all live,
``Engine.resident_tensors()`` names what the engine holds (parameters as this rank holds them, master copies,
gradients, optimizer state, reduce buckets) and every storage is counted once, at its full size: FSDP2 padding
and the whole of a gradient that a ZeRO partition only views are resident too. ``other`` is every further
tensor storage Python can reach (batches, small buffers). RSS figures are the process's resident set minus
its resident set just before the model was built (after torch, the process group and DeepSpeed were loaded):
parameters and state plus activations, allocator slack, and buffers that C++ holds. On GPUs the CUDA
allocator's figures (allocated now, and its peak) above the same point are reported too.
"""

from __future__ import annotations

import copy
import gc
import time
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import Config
from pipeline.data.synthetic import SyntheticLoader
from pipeline.distributed import DistEnv
from pipeline.engines import build_engine
from pipeline.engines.base import Engine, resolve_precision
from pipeline.methods import build_method, method_recipe
from pipeline.trainer import seed_everything

KINDS = ("params", "master", "grads", "optim", "buckets", "other")


def _status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` figure in bytes (``VmRSS``: resident now, ``VmHWM``: peak); None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:  # "5" resets VmHWM to the current resident set (Linux)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def storage_bytes(tensors: Iterable[torch.Tensor], seen: set[int]) -> int:
    """Bytes of the storages behind ``tensors`` not yet in ``seen`` (storage addresses), which it extends."""
    total = 0
    for t in tensors:
        if hasattr(t, "to_local"):  # DTensor: this rank's shard
            t = t.to_local()
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses without a storage
            continue
        if storage.nbytes() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def resident_bytes(engine: Engine) -> dict[str, int]:
    """Bytes per kind of ``engine.resident_tensors()``, each storage counted once (in the first kind that names
    it), and ``other``: every further tensor storage the garbage collector can reach."""
    seen: set[int] = set()
    held = engine.resident_tensors()
    out = {kind: storage_bytes(held.get(kind, []), seen) for kind in KINDS[:-1]}
    with warnings.catch_warnings():  # isinstance() on every object touches deprecated module attributes
        warnings.simplefilter("ignore")
        live = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    out["other"] = storage_bytes(live, seen)
    return out


def bench_memory_rank(cfg: Config, env: DistEnv, device: torch.device, steps: int) -> list[dict[str, Any]]:
    """Build ``cfg``'s method and engine, train ``steps`` (>= 2) steps, count what this rank holds before the
    last optimizer step; returns every rank's row (on every rank)."""
    if steps < 2:
        raise ValueError("bench memory needs >= 2 steps: optimizer state exists after the first")
    cfg = copy.deepcopy(cfg)
    cfg.loader.backend = "synthetic"
    if cfg.engine.name == "deepspeed":  # its import is not the engine's memory
        from pipeline.engines.deepspeed import _import_deepspeed

        _import_deepspeed(device.type)
    gc.collect()
    baseline = _status_bytes("VmRSS")
    peak_reset = _reset_peak_rss()
    cuda = device.type == "cuda"
    if cuda:  # GPUs: the device's allocator too, from the same point
        torch.cuda.reset_peak_memory_stats(device)
        cuda_baseline = torch.cuda.memory_allocated(device)
    seed_everything(cfg.run.seed)
    method = build_method(cfg)
    num_params = sum(p.numel() for p in method.parameters())
    trainable = sum(p.numel() for p in method.parameters() if p.requires_grad)
    engine = build_engine(cfg, env, device)
    engine.setup(method, steps)
    batches = iter(SyntheticLoader(cfg, env, device, method_recipe(cfg)))
    accum = cfg.optim.accumulation_steps
    start = time.perf_counter()
    for step in range(steps):
        for micro in range(accum):
            engine.micro_step(next(batches), sync=micro == accum - 1, scale=1.0 / accum)
        if step == steps - 1:
            held = resident_bytes(engine)
            rss_now = _status_bytes("VmRSS")
            cuda_now = torch.cuda.memory_allocated(device) if cuda else None
        engine.step()
        method.after_step(step, steps)
    seconds = (time.perf_counter() - start) / steps
    peak = _status_bytes("VmHWM")
    delta = (lambda v: v - baseline if v is not None and baseline is not None else None)
    row = {"engine": label(cfg), "precision": "bf16" if resolve_precision(cfg, device) is not None else "fp32",
           "method": cfg.method.name, "model": cfg.model.name, "image_size": cfg.augment.image_size,
           "batch_size": cfg.loader.batch_size, "world_size": env.world_size, "rank": env.rank, "steps": steps,
           "num_params": num_params, "trainable_params": trainable,
           **{f"{k}_bytes": v for k, v in held.items()},
           "step_time_s": seconds, "rss_baseline_bytes": baseline, "rss_at_count_bytes": delta(rss_now),
           "peak_rss_bytes": delta(peak) if peak_reset else None}
    if cuda:
        row.update(cuda_allocated_at_count_bytes=cuda_now - cuda_baseline,
                   cuda_peak_allocated_bytes=torch.cuda.max_memory_allocated(device) - cuda_baseline)
    rows: list[Any] = [None] * env.world_size
    if dist.is_initialized():
        dist.all_gather_object(rows, row)
    else:
        rows = [row]
    del engine, method, batches
    gc.collect()
    return rows


def label(cfg: Config) -> str:
    return f"zero{cfg.engine.zero_stage}" if cfg.engine.name == "deepspeed" else cfg.engine.name


def engine_overrides(name: str) -> dict[str, Any]:
    """``ddp``, ``fsdp``, ``zero1``, ``zero2``, ``zero3`` as config values."""
    if name in ("ddp", "fsdp"):
        return {"name": name}
    if name in ("zero1", "zero2", "zero3"):
        return {"name": "deepspeed", "zero_stage": int(name[-1])}
    raise ValueError(f"unknown engine {name!r} (ddp, fsdp, zero1, zero2, zero3)")


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row against DDP's row of the same rank and precision: parameters, gradients, optimizer state, and
    parameters + master copies + optimizer state (``state``)."""
    def state(r):
        return r["params_bytes"] + r["master_bytes"] + r["optim_bytes"]

    ddp = {(r["precision"], r["rank"]): r for r in rows if r["engine"] == "ddp"}
    for r in rows:
        ref = ddp.get((r["precision"], r["rank"]))
        if ref is None:
            continue
        for key, num, den in (("params", r["params_bytes"], ref["params_bytes"]),
                              ("grads", r["grads_bytes"], ref["grads_bytes"]),
                              ("optim", r["optim_bytes"], ref["optim_bytes"]), ("state", state(r), state(ref))):
            r[f"{key}_vs_ddp"] = num / den if den else None
