"""Checkpoint layout and the atomic ``latest`` switch.

``run_dir/checkpoints/step_00000100/`` holds the engine's state (DCP shards or DeepSpeed files), ``trainer.json``
(step, loader position) and ``rng_rank{r}.pt`` per rank (RNG streams, plus per-rank loader state such as DALI's
pipeline checkpoint). It is written as ``step_N.partial`` and renamed once
every rank has finished; only then is the ``latest`` symlink replaced (``os.replace`` of a new link: atomic), so
a process killed at any moment leaves ``latest`` pointing at a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.distributed import DistEnv, barrier, print0

LATEST = "latest"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def step_name(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointManager:
    def __init__(self, run_dir: str | Path, env: DistEnv, keep_last: int = 2) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.env, self.keep_last = env, keep_last

    def latest(self) -> Path | None:
        link = self.root / LATEST
        if not link.exists():
            return None
        target = link.resolve()
        if not (target / "trainer.json").is_file():
            raise RuntimeError(f"{link} points at {target}, which is not a complete checkpoint")
        return target

    def save(self, step: int, engine, trainer_state: dict[str, Any], rank_state: dict[str, Any] | None = None) -> Path:
        """Collective: every rank calls it. ``trainer_state`` is rank 0's (the same on every rank); ``rank_state``
        is this rank's own and comes back from :meth:`load` as ``state["rank"]``. Returns the final folder."""
        final = self.root / step_name(step)
        tmp = self.root / (step_name(step) + ".partial")
        if self.env.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a killed run
            tmp.mkdir(parents=True)
        barrier()
        engine.save(tmp)
        torch.save({**rng_state(), "rank": rank_state or {}}, tmp / f"rng_rank{self.env.rank}.pt")
        barrier()
        if self.env.is_main:
            (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "step": step,
                                                          "world_size": self.env.world_size}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            link_tmp = self.root / f".{LATEST}.tmp"
            if link_tmp.is_symlink() or link_tmp.exists():
                link_tmp.unlink()
            os.symlink(final.name, link_tmp)
            os.replace(link_tmp, self.root / LATEST)
            self._prune(keep=final)
        barrier()
        return final

    def _prune(self, keep: Path) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))
        for old in done[: max(0, len(done) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, engine) -> dict[str, Any]:
        """Collective. Restores engine state and this rank's RNG; returns the trainer state, with this rank's own
        state under ``"rank"`` (empty when resuming on another number of ranks)."""
        engine.load(path)
        state = json.loads((path / "trainer.json").read_text())
        state["rank"] = {}
        rng_file = path / f"rng_rank{self.env.rank}.pt"
        if rng_file.exists() and state.get("world_size") == self.env.world_size:
            saved = torch.load(rng_file, weights_only=False)
            set_rng_state(saved)
            state["rank"] = saved.get("rank", {})
        else:
            print0(f"note: {path} was written by {state.get('world_size')} ranks, resuming on "
                   f"{self.env.world_size}: RNG streams restart from the seed and the data order changes")
        return state
