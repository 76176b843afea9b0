"""Launchers only place processes; every one of them ends in ``pipeline.trainer.train(config)``."""

from __future__ import annotations

from pipeline.config import Config


def launch(cfg: Config, *, dry_run: bool = False, wait: bool = False) -> int:
    """Start ``cfg``'s job with ``launcher.name``. ``wait`` matters for Slurm only (follow the submitted job); local
    and Ray runs always stay in the foreground until training ends."""
    name = cfg.launcher.name
    if name == "local":
        from launchers.local import launch_local

        return launch_local(cfg, dry_run=dry_run)
    if name == "slurm":
        from launchers.slurm import launch_slurm

        return launch_slurm(cfg, dry_run=dry_run, wait=wait)
    if name == "ray":
        from launchers.ray import launch_ray

        # no `wait`: a Ray Train run lives only as long as its driver, this process (see launch_ray)
        return launch_ray(cfg, dry_run=dry_run)
    raise KeyError(f"unknown launcher {name!r}; known: local, slurm, ray")
