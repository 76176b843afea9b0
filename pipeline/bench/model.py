"""``bench model``: the full training step of a method under an engine, on synthetic batches already on the
device, swept over batch size and image size.

One step is exactly what the trainer runs per optimizer step: ``engine.micro_step`` per micro-batch,
``engine.step`` (clip, AdamW, schedule), ``method.after_step``. Warm-up steps (allocator, cuDNN/cuBLAS
heuristics, ``torch.compile``) are excluded; the device is synchronised and ranks meet at a barrier before the
clock starts and the device is synchronised before it is read. The timed steps are cut into windows whose
spread is reported; with several processes a window lasts as long as its slowest rank.
"""

from __future__ import annotations

import copy
import gc
import itertools
import statistics
import time
from typing import Any

import torch

from pipeline.bench.common import peak_memory_gib, reset_peak_memory, sync
from pipeline.bench.flops import count_step_flops, device_name, measure_peak_flops, table_peak_flops
from pipeline.config import Config
from pipeline.data.synthetic import SyntheticLoader
from pipeline.distributed import DistEnv
from pipeline.engines import build_engine
from pipeline.engines.base import resolve_precision
from pipeline.methods import build_method, method_recipe
from pipeline.trainer import seed_everything


def point_config(cfg: Config, batch_size: int | None = None, image_size: int | None = None) -> Config:
    """``cfg`` with the per-device batch and the image size of one sweep point (model input follows views)."""
    cfg = copy.deepcopy(cfg)
    if batch_size:
        cfg.loader.batch_size = batch_size
    if image_size:
        cfg.augment.image_size = image_size
        cfg.model.img_size = image_size
    return cfg


def resolve_peak(device: torch.device, dtype: torch.dtype | None, peak_tflops: float = 0.0,
                 measure: bool = False) -> tuple[float | None, str]:
    """Peak FLOP/s per device for MFU and where it came from: the flag, a matmul measured here, or the table."""
    if peak_tflops:
        return peak_tflops * 1e12, "flag"
    if measure:
        return measure_peak_flops(device, dtype), "measured (matmul)"
    peak = table_peak_flops(device_name(device), dtype)
    return (peak, "datasheet") if peak else (None, "unknown (pass --peak-tflops or --measure-peak)")


def _max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def time_steps(cfg: Config, env: DistEnv, device: torch.device, warmup: int, steps: int, windows: int = 3,
               bar=None) -> dict[str, Any]:
    """Build ``cfg``'s method and engine, run ``warmup`` + ``steps`` training steps on synthetic device
    batches; returns per-window seconds per step (max over ranks), data-wait fraction and peak memory."""
    seed_everything(cfg.run.seed)
    method = build_method(cfg)
    engine = build_engine(cfg, env, device)
    total = warmup + steps
    engine.setup(method, total)
    it = iter(SyntheticLoader(cfg, env, device, method_recipe(cfg)))
    accum = cfg.optim.accumulation_steps
    windows = max(1, min(windows, steps))
    bounds = {warmup + round(i * steps / windows) for i in range(windows + 1)}
    marks: list[float] = []
    wait = 0.0
    for step in range(total):
        if step in bounds:
            if step == warmup:
                sync(device)
                if torch.distributed.is_initialized():
                    torch.distributed.barrier()
                reset_peak_memory(device)
            sync(device)
            marks.append(time.perf_counter())
        for micro in range(accum):
            t = time.perf_counter()
            batch = next(it)
            if step >= warmup:
                wait += time.perf_counter() - t
            engine.micro_step(batch, sync=micro == accum - 1, scale=1.0 / accum)
        engine.step()
        method.after_step(step, total)
        if bar is not None:
            bar.update(1)
    sync(device)
    marks.append(time.perf_counter())
    per_step = [(b - a) / n for (a, b), n in zip(itertools.pairwise(marks), _window_sizes(sorted(bounds)), strict=True)]
    per_step = _max_over_ranks(per_step, device)
    timed = marks[-1] - marks[0]
    out = {"window_step_time_s": per_step, "data_wait_fraction": wait / timed if timed > 0 else 0.0,
           "peak_memory_gib": peak_memory_gib(device),
           "num_params": sum(p.numel() for p in method.parameters() if p.requires_grad)}
    if device.type == "cuda":
        out["peak_memory_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    del engine, method, it
    if cfg.engine.compile:
        # Every sweep point compiles afresh, as a run of that one shape would: without the reset, dynamo marks the
        # batch dimension dynamic when the second shape arrives, and later points would time dynamic-shape code.
        torch.compiler.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _window_sizes(bounds: list[int]) -> list[int]:
    return [b - a for a, b in itertools.pairwise(bounds)]


def summarize_point(cfg: Config, env: DistEnv, device: torch.device, timing: dict[str, Any],
                    flops: dict[str, float], peak: float | None, peak_source: str) -> dict[str, Any]:
    """One result row: throughput per device and in total, step time with its spread, MFU, memory."""
    per_step = timing["window_step_time_s"]
    step_time = statistics.median(per_step)
    images = cfg.loader.batch_size * cfg.optim.accumulation_steps
    achieved = flops["step_flops"] / step_time
    dtype = resolve_precision(cfg, device)
    return {
        "method": cfg.method.name, "model": cfg.model.name, "engine": cfg.engine.name,
        "precision": "bf16" if dtype is not None else "fp32", "compile": cfg.engine.compile,
        "device": device_name(device), "world_size": env.world_size,
        "batch_size": cfg.loader.batch_size, "accumulation_steps": cfg.optim.accumulation_steps,
        "image_size": cfg.augment.image_size,
        "step_time_s": step_time, "step_time_s_min": min(per_step), "step_time_s_max": max(per_step),
        "images_per_sec_per_device": images / step_time,
        "images_per_sec": images * env.world_size / step_time,
        "flops_per_image": flops["flops_per_image"], "step_flops_per_device": flops["step_flops"],
        "achieved_tflops_per_device": achieved / 1e12,
        "peak_tflops_per_device": peak / 1e12 if peak else None, "peak_source": peak_source,
        "mfu": achieved / peak if peak else None,
        "data_wait_fraction": timing["data_wait_fraction"],
        "peak_memory_gib": timing["peak_memory_gib"],
        **({"peak_memory_reserved_gib": timing["peak_memory_reserved_gib"]}
           if "peak_memory_reserved_gib" in timing else {}),
        "num_params": timing["num_params"],
        "window_step_time_s": per_step,
    }


def bench_model_rank(cfg: Config, env: DistEnv, device: torch.device, batch_sizes: list[int],
                     image_sizes: list[int], warmup: int, steps: int, peak_tflops: float = 0.0,
                     measure_peak: bool = False, progress: bool = True, repeats: int = 1) -> list[dict[str, Any]]:
    """The sweep on one rank (every rank runs it; rows are identical up to rank-local memory).

    ``repeats`` > 1 runs the whole sweep again, in reverse order every other time, so a slow spell of a shared
    machine spreads over points instead of landing on one; a point's step time is the median of its windows
    over all repeats, and min/max their spread."""
    from tqdm import tqdm

    cfg = copy.deepcopy(cfg)
    cfg.loader.backend = "synthetic"
    dtype = resolve_precision(cfg, device)
    peak, peak_source = resolve_peak(device, dtype, peak_tflops, measure_peak)
    points = [(b, s) for s in image_sizes for b in batch_sizes]
    timings: dict[tuple[int, int], dict[str, Any] | None] = {}
    with tqdm(total=repeats * len(points) * (warmup + steps), disable=not (env.is_main and progress),
              desc="bench model", unit="step", dynamic_ncols=True) as bar:
        for r in range(repeats):
            for b, s in points if r % 2 == 0 else points[::-1]:
                if (b, s) in timings and timings[(b, s)] is None:  # out of memory before
                    bar.update(warmup + steps)
                    continue
                bar.set_postfix(repeat=r, batch=b, image=s, refresh=True)
                try:
                    t = time_steps(point_config(cfg, b, s), env, device, warmup, steps, bar=bar)
                except torch.OutOfMemoryError:
                    gc.collect()
                    torch.cuda.empty_cache()
                    timings[(b, s)] = None
                    continue
                if (b, s) in timings:
                    prev = timings[(b, s)]
                    t["window_step_time_s"] = prev["window_step_time_s"] + t["window_step_time_s"]
                    t["data_wait_fraction"] = (prev["data_wait_fraction"] * r + t["data_wait_fraction"]) / (r + 1)
                    for key in ("peak_memory_gib", "peak_memory_reserved_gib"):
                        if key in t and t[key] is not None and prev.get(key) is not None:
                            t[key] = max(t[key], prev[key])
                timings[(b, s)] = t
    rows: list[dict[str, Any]] = []
    for b, s in points:
        t = timings.get((b, s))
        if t is None:
            rows.append({"batch_size": b, "image_size": s, "error": "out of memory"})
            continue
        pcfg = point_config(cfg, b, s)
        rows.append({**summarize_point(pcfg, env, device, t, count_step_flops(pcfg), peak, peak_source),
                     "repeats": repeats})
    if measure_peak and not peak_tflops:
        # a shared machine's speed drifts: measure again after the sweep and keep the better of the two peaks
        again, _ = resolve_peak(device, dtype, 0.0, True)
        for r in rows:
            if "error" not in r and again > peak:
                r["peak_tflops_per_device"] = again / 1e12
                r["mfu"] = r["achieved_tflops_per_device"] * 1e12 / again
    return rows
