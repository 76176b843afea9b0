"""``train(config)``: the one entry point every launcher ends in.

The step is kept free of host syncs: losses and the first non-finite step are accumulated on the device and
read only on log and checkpoint steps (``train.nan_policy=skip`` is the one documented exception).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.checkpoint import CheckpointManager
from pipeline.config import Config, save_config
from pipeline.data.loader import build_loader, resolve_backend
from pipeline.data.recipes import build_recipe
from pipeline.distributed import (
    DistEnv,
    all_reduce_mean,
    barrier,
    destroy_distributed,
    init_distributed,
    pick_device,
    print0,
    read_dist_env,
)
from pipeline.engines import build_engine
from pipeline.export import export_encoder, load_exported
from pipeline.methods import build_method
from pipeline.rundir import owner_writes_only, write_atomic


class NonFiniteLossError(FloatingPointError):
    pass


class MetricsLogger:
    """JSONL (``metrics.jsonl``) and TensorBoard (``tb/``) on rank 0; units in the metric names."""

    def __init__(self, run_dir: Path, env: DistEnv, tensorboard: bool) -> None:
        self.env = env
        self.file = open(run_dir / "metrics.jsonl", "a") if env.is_main else None  # noqa: SIM115 (run-long; closed in close())
        self.tb = None
        if env.is_main and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                print0("tensorboard is not installed: metrics go to metrics.jsonl only")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _set_threads(cfg: Config, env: DistEnv, device: torch.device) -> None:
    if device.type == "cpu":
        n = cfg.train.threads or max(1, (os.cpu_count() or 1) // max(1, env.local_world_size))
        torch.set_num_threads(n)


def _resume_point(cfg: Config, ckpt: CheckpointManager) -> Path | None:
    latest = ckpt.latest()
    mode = cfg.checkpoint.resume
    if mode == "true" and latest is None:
        raise FileNotFoundError(f"checkpoint.resume=true but {ckpt.root} has no complete checkpoint")
    if mode == "false" and latest is not None:
        raise FileExistsError(
            f"{cfg.run.dir} already has checkpoints (latest: {latest.name}); resume with checkpoint.resume=auto, "
            f"or pick a new run.name"
        )
    return latest if mode != "false" else None


def train(cfg: Config, report: Callable[[dict[str, Any]], None] | None = None,
          stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Pretrain according to ``cfg`` in this process (one rank of the job). Returns the run summary.

    ``report`` receives the metrics of every log step (Ray). ``stop`` is asked after every optimizer step whether
    this rank wants the run to end early (a launcher's signal watcher). If any rank says yes, all ranks stop after
    that same step, save a checkpoint there and return ``{"interrupted": "stop", "steps": N, ...}`` without export
    or eval; ``train.stop_at_step`` ends a run the same way (``"interrupted": "stop_at_step"``).
    """
    env = read_dist_env()
    device = pick_device(env, cfg.loader.device)
    _set_threads(cfg, env, device)
    created_group = not torch.distributed.is_initialized()
    init_distributed(env, device, cfg.engine.backend)
    try:
        with owner_writes_only():  # nothing in the run directory group- or world-writable, whatever the umask
            return Trainer(cfg, env, device, report, stop).run()
    finally:
        if created_group:
            destroy_distributed()


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, device: torch.device,
                 report: Callable[[dict[str, Any]], None] | None = None,
                 stop: Callable[[], bool] | None = None) -> None:
        self.cfg, self.env, self.device, self.report, self.stop = cfg, env, device, report, stop
        self.stop_group = None
        if stop is not None and torch.distributed.is_initialized() and "gloo" not in torch.distributed.get_backend():
            # ranks vote on stopping every step: on a CPU group, since a flag on nccl would be a CUDA host sync
            self.stop_group = torch.distributed.new_group(backend="gloo")
        self.run_dir = cfg.run.dir
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        barrier()
        self.ckpt = CheckpointManager(self.run_dir, env, cfg.checkpoint.keep_last)

    def run(self) -> dict[str, Any]:
        cfg, env, device = self.cfg, self.env, self.device
        total = cfg.train.steps
        accum = cfg.optim.accumulation_steps
        resume_from = _resume_point(cfg, self.ckpt)

        seed_everything(cfg.run.seed)  # identical initial weights on every rank
        method = build_method(cfg)
        engine = build_engine(cfg, env, device)
        engine.setup(method, total)
        seed_everything(cfg.run.seed + 1000 * env.rank + 1)  # per-rank streams (masking, etc.)
        loader = build_loader(cfg, env, device, recipe=build_recipe(cfg.augment, method_recipe=method.recipe))
        if getattr(loader, "shards", None) is not None and hasattr(loader.shards, "describe"):
            print0(f"data: {loader.shards.describe()}")

        step = 0
        if resume_from is not None:
            state = self.ckpt.load(resume_from, engine)
            step = int(state["step"])
            loader.load_state_dict(state["loader"])
            loader.load_rank_state_dict(state["rank"].get("loader", {}))
            print0(f"resumed from {resume_from} at step {step} (epoch {loader.epoch}, batch {loader.batch})")
        print0(f"run {self.run_dir}: {cfg.method.name} on {cfg.model.name}, engine {cfg.engine.name}, "
               f"{env.world_size} x {device.type} ({env.source}), {resolve_backend(cfg)} loader, batch {cfg.loader.batch_size} x {env.world_size} "
               f"x accumulation {accum}, {loader.steps_per_epoch} steps/epoch, {total} steps")

        logger = MetricsLogger(self.run_dir, env, cfg.metrics.tensorboard)
        summary: dict[str, Any] = {}
        try:
            step = self._loop(engine, method, loader, logger, step, total, accum, summary)
        finally:
            logger.close()

        summary.update({"run_dir": str(self.run_dir), "steps": step, "world_size": env.world_size,
                        "checkpoint": str(self.ckpt.latest()) if env.is_main else None})
        if summary.get("interrupted"):
            how = "stop requested" if summary["interrupted"] == "stop" else "train.stop_at_step; =0 goes on"
            print0(f"stopped at step {step} of {total} ({how}): checkpoint {summary['checkpoint']}, no export or eval")
            barrier()  # every rank has left the loop and shut its loader workers down: a launcher may end the job now
            return summary
        state = engine.method_state_dict()
        export_dir = self.run_dir / "export"
        if env.is_main:
            export_encoder(state, cfg, export_dir, extra={"steps": step})
            summary["export"] = str(export_dir)
        del state
        barrier()
        if cfg.eval.at_end and cfg.data.eval_train_shards and cfg.data.eval_test_shards:
            from pipeline.evaluation import evaluate

            print0("evaluating frozen features (kNN, linear probe) ...")
            encoder = load_exported(export_dir).to(device)  # every rank scores the exported file itself
            results = evaluate(cfg, encoder, env, device)
            if results:
                summary.update(results)
            if hasattr(method, "zero_shot_classifier"):  # image-text methods: prompt the text tower too
                from pipeline.evaluation import zero_shot_accuracy

                was_training = method.training
                zero_shot = zero_shot_accuracy(cfg, method.eval(), cfg.data.eval_test_shards, env, device)
                method.train(was_training)
                if env.is_main:
                    summary["zero_shot"] = zero_shot
        if env.is_main:
            write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        barrier()
        return summary

    def _loop(self, engine, method, loader, logger, step, total, accum, summary) -> int:
        cfg, env, device = self.cfg, self.env, self.device
        log_every, ckpt_every = cfg.metrics.log_every, cfg.checkpoint.every_steps
        skip_nonfinite = cfg.train.nan_policy == "skip"
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, disable=not (env.is_main and cfg.metrics.progress), desc="train",
                   unit="step", dynamic_ncols=True, mininterval=1.0)
        it = iter(loader)
        loss_sum = torch.zeros((), device=device)
        first_bad = torch.full((), -1, dtype=torch.long, device=device)
        n_loss, skipped, wait, window_images = 0, 0, 0.0, 0
        window_start = time.perf_counter()
        rates: list[float] = []
        last_saved = step if step else -1
        end = min(total, cfg.train.stop_at_step or total)
        keys_file = None
        if cfg.metrics.sample_keys:
            (self.run_dir / "sample_keys").mkdir(parents=True, exist_ok=True)
            keys_file = open(self.run_dir / "sample_keys" / f"rank{env.rank}.txt", "a", buffering=1)  # noqa: SIM115 (run-long)
        while step < end:
            for micro in range(accum):
                t = time.perf_counter()
                batch = next(it)
                wait += time.perf_counter() - t
                loss, _ = engine.micro_step(batch, sync=micro == accum - 1, scale=1.0 / accum)
                loss_sum += loss
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
                window_images += batch.size
                if keys_file is not None and batch.keys is not None:
                    keys_file.write(f"{loader.epoch} {step} {micro} {' '.join(batch.keys)}\n")
            n_loss += accum
            if skip_nonfinite:
                norm = engine.step(skip_nonfinite=True)
                if norm is None:
                    skipped += 1
                    loss_sum.zero_()
                    first_bad.fill_(-1)
                    n_loss = 0
            else:
                engine.step()
            method.after_step(step, total)
            step += 1
            bar.update(1)

            is_last = step == total
            if step % log_every == 0 or is_last:
                self._check_finite(first_bad, step)
                elapsed = time.perf_counter() - window_start
                # one collective for the loss and the loaders' bad-sample counts (host ints, summed over ranks)
                stats = torch.stack([(loss_sum / max(1, n_loss)).double(),
                                     torch.tensor(float(loader.bad_samples), dtype=torch.float64, device=device)])
                loss_val, bad_mean = all_reduce_mean(stats).tolist()
                bad_samples = round(bad_mean * env.world_size)
                self._check_bad_samples(bad_samples, step, loader)
                rate = window_images / elapsed
                metrics = {
                    "loss": loss_val, "lr": engine.lr,
                    "images_per_sec_per_process": rate,
                    "images_per_sec": rate * env.world_size,
                    "data_wait_fraction": wait / elapsed,
                    "epoch": loader.epoch + loader.batch / max(1, loader.steps_per_epoch),
                    "bad_samples": bad_samples,
                }
                if skip_nonfinite:
                    metrics["skipped_steps"] = skipped
                if device.type == "cuda":
                    metrics["memory/max_reserved(GiB)"] = torch.cuda.max_memory_reserved() / 2**30
                logger.log(step, metrics)
                if self.report is not None:
                    self.report({"step": step, **metrics})
                bar.set_postfix(loss=f"{loss_val:.4f}", ips=f"{rate * env.world_size:.0f}", refresh=False)
                if step > log_every or is_last:
                    rates.append(rate)  # the first window holds warm-up (worker start, allocator, compile)
                summary["final_loss"] = loss_val
                loss_sum.zero_()
                n_loss, wait, window_images = 0, 0.0, 0
                window_start = time.perf_counter()
            if step % ckpt_every == 0 or is_last:
                self._check_finite(first_bad, step)
                self._save(step, engine, loader)
                last_saved = step
            if self.stop is not None and not is_last and self._stop_agreed():
                summary["interrupted"] = "stop"
                break
        bar.close()
        if keys_file is not None:
            keys_file.close()
        if step < total:
            summary.setdefault("interrupted", "stop_at_step")
        if last_saved != step:  # stopped between periodic checkpoints
            self._check_finite(first_bad, step)
            self._save(step, engine, loader)
        if rates:
            summary["images_per_sec_per_process"] = float(np.mean(rates))
            summary["images_per_sec"] = float(np.mean(rates)) * env.world_size
        return step

    def _stop_agreed(self) -> bool:
        """Whether any rank's ``stop`` says yes. Every rank calls it after the same step, so all get the same answer
        (one all-reduce of a CPU int: no device sync)."""
        flag = torch.tensor(int(bool(self.stop())))
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.stop_group)
        return bool(flag)

    def _save(self, step: int, engine, loader) -> None:
        self.ckpt.save(step, engine, {"loader": loader.state_dict()}, {"loader": loader.rank_state_dict()})

    def _check_bad_samples(self, bad_samples: int, step: int, loader) -> None:
        """Stop past ``data.max_bad_fraction`` of the samples trained on (all ranks see the same sums)."""
        cfg = self.cfg
        seen = step * cfg.optim.accumulation_steps * cfg.loader.batch_size * self.env.world_size
        if bad_samples and bad_samples > cfg.data.max_bad_fraction * seen:
            from pipeline.data.shards import ShardError

            raise ShardError(
                f"{bad_samples} of the {seen} samples trained on by step {step} were bad ({bad_samples / seen:.2%}), "
                f"more than data.max_bad_fraction={cfg.data.max_bad_fraction:g}; last bad sample on rank "
                f"{self.env.rank}: {loader.last_bad or '(none on this rank)'}. Fix or drop those shards, or raise "
                f"data.max_bad_fraction")

    def _check_finite(self, first_bad: torch.Tensor, step: int) -> None:
        bad = first_bad.clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        bad_step = int(bad.item())
        if bad_step >= 0:
            latest = self.ckpt.latest()
            raise NonFiniteLossError(
                f"non-finite loss at step {bad_step} (detected at step {step}); no checkpoint was written after it. "
                f"Last good checkpoint: {latest or 'none'}. Try a lower optim.lr, a longer optim.warmup_steps, "
                f"optim.clip_grad_norm, engine.precision=fp32, or train.nan_policy=skip to drop such steps."
            )
