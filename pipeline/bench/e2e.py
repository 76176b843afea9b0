"""``bench e2e``: real shards -> loader -> the trainer, timed through the trainer's own log steps; reports the
fraction of step time spent waiting for data. A synthetic-loader run of the same trainer is the reference
for how fast the step would be if data were free.

``time_trainer`` is also the "ours" side of ``bench baseline``: it runs ``pipeline.trainer.train`` itself, so
what is measured is the real loop (micro_step, step, after_step, device-side loss and NaN tracking, the
metrics logger at ``metrics.log_every``), not a re-implementation. The clock is read in the trainer's
``report`` callback, which runs right after the log step's ``.item()`` (a device sync), with the device
synchronised again; the windows before ``warmup`` steps and the final checkpoint and export fall outside.
"""

from __future__ import annotations

import copy
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.bench.common import peak_memory_gib, reset_peak_memory, sync
from pipeline.config import Config
from pipeline.distributed import DistEnv, barrier


def round_up(x: int, k: int) -> int:
    return max(k, -(-x // k) * k)


def trainer_config(cfg: Config, run_root: Path, name: str, warmup: int, steps: int) -> Config:
    """``cfg`` for a timed trainer run: warm-up and timed steps rounded up to whole log windows, checkpoints
    only at the end, no evaluation, no progress bar (the benchmark draws its own), a fresh run directory."""
    cfg = copy.deepcopy(cfg)
    every = cfg.metrics.log_every
    cfg.train.steps = round_up(warmup, every) + round_up(steps, every)
    cfg.checkpoint.every_steps = cfg.train.steps
    cfg.checkpoint.resume = "false"
    cfg.eval.at_end = False
    cfg.metrics.progress = False
    cfg.run.output_dir, cfg.run.name = str(run_root), name
    return cfg


def time_trainer(cfg: Config, env: DistEnv, device: torch.device, run_root: Path, name: str, warmup: int,
                 steps: int, bar=None) -> dict[str, Any]:
    """Run ``train(cfg)`` and time the log windows after the warm-up."""
    from pipeline.trainer import train

    tcfg = trainer_config(cfg, run_root, name, warmup, steps)
    every = tcfg.metrics.log_every
    start, end = round_up(warmup, every), tcfg.train.steps
    marks: dict[int, float] = {}
    windows: list[dict[str, Any]] = []
    peak: list[float | None] = []

    def report(metrics: dict[str, Any]) -> None:
        sync(device)
        step = metrics["step"]
        marks[step] = time.perf_counter()
        if step == start:
            reset_peak_memory(device)
        if start < step <= end:
            windows.append(metrics)
        if step == end:
            peak.append(peak_memory_gib(device))
        if bar is not None:
            bar.update(step - max([s for s in marks if s < step], default=0))

    reset_peak_memory(device)
    train(tcfg, report=report)
    barrier()
    if env.is_main:
        shutil.rmtree(run_root / name, ignore_errors=True)
    timed = end - start
    step_time = (marks[end] - marks[start]) / timed
    images = tcfg.loader.batch_size * tcfg.optim.accumulation_steps
    per_window = [(marks[s] - marks[s - every]) / every for s in range(start + every, end + 1, every)]
    return {
        "step_time_s": step_time, "step_time_s_min": min(per_window), "step_time_s_max": max(per_window),
        "images_per_sec_per_device": images / step_time, "images_per_sec": images * env.world_size / step_time,
        "data_wait_fraction": statistics.fmean(w["data_wait_fraction"] for w in windows),
        "peak_memory_gib": peak[0] if peak else None,
        "warmup_steps": start, "timed_steps": timed, "log_every": every,
        "final_loss": windows[-1]["loss"] if windows else None,
    }


def bench_e2e_rank(cfg: Config, env: DistEnv, device: torch.device, backends: list[str], warmup: int, steps: int,
                   run_root: str, flops: dict[str, float], peak_tflops: float = 0.0, measure_peak: bool = False,
                   progress: bool = True) -> list[dict[str, Any]]:
    from tqdm import tqdm

    from pipeline.bench.model import resolve_peak
    from pipeline.engines.base import resolve_precision

    peak, peak_source = resolve_peak(device, resolve_precision(cfg, device), peak_tflops, measure_peak)

    every = cfg.metrics.log_every
    per_run = round_up(warmup, every) + round_up(steps, every)
    rows = []
    with tqdm(total=per_run * len(backends), disable=not (env.is_main and progress), desc="bench e2e",
              unit="step", dynamic_ncols=True) as bar:
        for backend in backends:
            bcfg = copy.deepcopy(cfg)
            bcfg.loader.backend = backend
            bar.set_postfix(backend=backend, refresh=True)
            row: dict[str, Any] = {"backend": backend, "method": cfg.method.name, "model": cfg.model.name,
                                   "engine": cfg.engine.name, "world_size": env.world_size,
                                   "batch_size": cfg.loader.batch_size, "image_size": cfg.augment.image_size,
                                   "num_workers": cfg.loader.num_workers}
            try:
                t = time_trainer(bcfg, env, device, Path(run_root), f"e2e-{backend}", warmup, steps, bar)
            except ImportError as exc:  # e.g. the dali backend without nvidia-dali installed
                bar.update(per_run)
                rows.append({**row, "error": f"not available: {exc}"})
                continue
            achieved = flops["step_flops"] / t["step_time_s"]
            row.update(t)
            row.update({"achieved_tflops_per_device": achieved / 1e12,
                        "mfu": achieved / peak if peak else None, "peak_source": peak_source})
            rows.append(row)
    synthetic = next((r for r in rows if r["backend"] == "synthetic" and "error" not in r), None)
    if synthetic:
        for r in rows:
            if "error" not in r:
                r["throughput_vs_synthetic"] = r["images_per_sec_per_device"] / synthetic["images_per_sec_per_device"]
    return rows
