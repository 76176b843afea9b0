"""``bench baseline``: the trainer's overhead as a ratio measured side by side with a bare loop.

Both sides run in the same processes, alternately (ours, bare, bare, ours, ... so drift in a shared machine's
speed falls on both equally), for the same warm-up and timed steps on the same synthetic device batches.
``overhead_ratio`` is the median over repeats of (ours step time / bare step time) taken from adjacent runs;
its min and max over repeats are the spread. 1.03 means the trainer costs 3% more per step. The ratio of the
medians and of the fastest log windows of each side are reported beside it.
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path
from typing import Any

import torch

from pipeline.bench.baseline import BareSpec, bare_loop
from pipeline.bench.common import peak_memory_gib, reset_peak_memory
from pipeline.bench.e2e import round_up, time_trainer
from pipeline.config import Config
from pipeline.distributed import DistEnv
from pipeline.engines.base import resolve_precision


def bare_spec(cfg: Config, device: torch.device) -> BareSpec:
    """The bare loop's plain-value description of ``cfg`` (only SimCLR has a bare twin)."""
    if cfg.method.name != "simclr":
        raise ValueError(f"bench baseline compares against a bare SimCLR loop; method.name={cfg.method.name!r}")
    o = cfg.optim
    return BareSpec(
        model_name=cfg.model.name, timm_kwargs=cfg.model.timm_kwargs(), proj_hidden_dim=cfg.method.proj_hidden_dim,
        proj_dim=cfg.method.proj_dim, temperature=cfg.method.simclr.temperature, batch_size=cfg.loader.batch_size,
        image_size=cfg.augment.image_size, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps,
        clip_grad_norm=o.clip_grad_norm, bf16=resolve_precision(cfg, device) is not None,
        compile=cfg.engine.compile, seed=cfg.run.seed,
    )


def time_bare(cfg: Config, env: DistEnv, device: torch.device, warmup: int, steps: int, bar=None) -> dict[str, Any]:
    every = cfg.metrics.log_every  # the same step counts as the trainer run
    start, end = round_up(warmup, every), round_up(warmup, every) + round_up(steps, every)
    spec = bare_spec(cfg, device)
    reset_peak_memory(device)

    def on_step() -> None:
        if bar is not None:
            bar.update(1)

    marks = bare_loop(spec, device, end, set(range(start, end + 1, every)), on_step)
    timed = end - start
    step_time = (marks[end] - marks[start]) / timed
    per_window = [(marks[s] - marks[s - every]) / every for s in range(start + every, end + 1, every)]
    images = spec.batch_size
    return {"step_time_s": step_time, "step_time_s_min": min(per_window), "step_time_s_max": max(per_window),
            "images_per_sec_per_device": images / step_time, "images_per_sec": images * env.world_size / step_time,
            "data_wait_fraction": 0.0, "peak_memory_gib": peak_memory_gib(device), "warmup_steps": start, "timed_steps": timed}


def bench_overhead_rank(cfg: Config, env: DistEnv, device: torch.device, warmup: int, steps: int, repeats: int,
                        run_root: str, flops: dict[str, float], peak_tflops: float = 0.0, measure_peak: bool = False,
                        progress: bool = True) -> dict[str, Any]:
    from tqdm import tqdm

    from pipeline.bench.model import resolve_peak
    
    peak, peak_source = resolve_peak(device, resolve_precision(cfg, device), peak_tflops, measure_peak)

    cfg = copy.deepcopy(cfg)
    cfg.loader.backend = "synthetic"
    cfg.optim.accumulation_steps = 1  # the bare loop has no accumulation
    every = cfg.metrics.log_every
    per_run = round_up(warmup, every) + round_up(steps, every)
    rows: list[dict[str, Any]] = []
    with tqdm(total=2 * repeats * per_run, disable=not (env.is_main and progress), desc="bench baseline",
              unit="step", dynamic_ncols=True) as bar:
        for r in range(repeats):
            order = ("ours", "bare") if r % 2 == 0 else ("bare", "ours")
            for side in order:
                bar.set_postfix(repeat=r, side=side, refresh=True)
                if side == "ours":
                    t = time_trainer(cfg, env, device, Path(run_root), f"ours-{r}", warmup, steps, bar)
                else:
                    t = time_bare(cfg, env, device, warmup, steps, bar)
                achieved = flops["step_flops"] / t["step_time_s"]
                rows.append({"side": side, "repeat": r, "method": cfg.method.name, "model": cfg.model.name,
                             "engine": cfg.engine.name if side == "ours" else "bare DDP" if env.world_size > 1
                             else "bare", "world_size": env.world_size, "batch_size": cfg.loader.batch_size,
                             "image_size": cfg.augment.image_size, **t,
                             "achieved_tflops_per_device": achieved / 1e12,
                             "mfu": achieved / peak if peak else None, "peak_source": peak_source})
    return {"rows": rows, "summary": summarize_overhead(rows)}


def summarize_overhead(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ours = {r["repeat"]: r["step_time_s"] for r in rows if r["side"] == "ours"}
    bare = {r["repeat"]: r["step_time_s"] for r in rows if r["side"] == "bare"}
    ratios = [ours[k] / bare[k] for k in sorted(ours) if k in bare]
    return {
        "overhead_ratio": statistics.median(ratios), "overhead_ratio_min": min(ratios),
        "overhead_ratio_max": max(ratios), "overhead_ratio_per_repeat": ratios,
        "overhead_ratio_of_medians": statistics.median(ours.values()) / statistics.median(bare.values()),
        # noise on a shared machine only ever adds time: the fastest log window of each side is a second,
        # noise-robust estimate
        "overhead_ratio_of_fastest_windows": min(r["step_time_s_min"] for r in rows if r["side"] == "ours")
        / min(r["step_time_s_min"] for r in rows if r["side"] == "bare"),
        "step_time_s_ours": statistics.median(ours.values()), "step_time_s_bare": statistics.median(bare.values()),
        "repeats": len(ratios), "target_ratio": 1.05,
        "meets_target": statistics.median(ratios) <= 1.05,
    }
