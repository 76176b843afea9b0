"""Launchers only place processes; every one of them ends in ``pipeline.trainer.train(config)``."""

from __future__ import annotations

from pipeline.config import Config


def launch(cfg: Config, *, dry_run: bool = False, wait: bool = False) -> int:
    name = cfg.launcher.name
    if name == "local":
        from launchers.local import launch_local

        return launch_local(cfg, dry_run=dry_run)
    if name == "slurm":
        from launchers.slurm import launch_slurm

        return launch_slurm(cfg, dry_run=dry_run, wait=wait)
    if name == "ray":
        from launchers.ray import launch_ray

        return launch_ray(cfg, dry_run=dry_run, wait=True)
    raise KeyError(f"unknown launcher {name!r}; known: local, slurm, ray")
