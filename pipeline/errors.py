"""Failures a user can act on, told from bugs, and how they reach the terminal: one line, no traceback.

Expected failures are a bad config key or value, missing or bad data, a run directory or checkpoint that is not
what the command needs, a path the user may not write, an unreachable launcher, an optional package that is not installed, a diverging run. The
CLI (``pipeline.cli.main``) prints them as one line on stderr and exits non-zero; every other exception is a bug
and keeps its traceback. ``PIPELINE_DEBUG=1`` (or ``pipeline --traceback``) shows the traceback of expected ones
too, in every rank.

Training runs in other processes under the local launcher, Slurm and Ray: a rank that fails with an expected error
records its message (:func:`record_rank_error`) and exits quietly, and the launcher reports the first rank's
message as one :class:`RankError` instead of one traceback per rank.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

DEBUG_ENV = "PIPELINE_DEBUG"

EXPECTED = frozenset({
    "pipeline.config.ConfigError",
    "pipeline.data.shards.ShardError",
    "pipeline.export.ExportError",
    "pipeline.trainer.NonFiniteLossError",
    "pipeline.errors.LaunchError",
    "pipeline.errors.RankError",
    "builtins.FileNotFoundError",
    "builtins.FileExistsError",
    "builtins.PermissionError",
})
"""Expected error types (and their subclasses), by name: checking one imports none of the modules defining them."""

OPTIONAL_PACKAGES = {
    "nvidia": "nvidia-dali-cuda130",
    "deepspeed": "deepspeed",
    "submitit": "submitit",
    "ray": "'ray[train]'",
    "open_clip": "open-clip-torch",
    "matplotlib": "matplotlib",
}
"""Top-level module of each optional dependency -> what to ``pip install`` (pyproject's extras hold the same)."""


class LaunchError(RuntimeError):
    """A launcher could not place the job: Slurm or the Ray cluster unreachable, a submission refused."""


class RankError(RuntimeError):
    """An expected error in a rank that ran in another process, as its launcher reports it."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self):  # Ray pickles it from a worker to the driver
        return type(self), (str(self), self.exit_code)


def debug_requested() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _type_names(exc: BaseException) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__}


def _missing_optional_module(exc: BaseException) -> str | None:
    """The optional top-level module whose absence caused ``exc`` (itself or its ``raise ... from`` chain)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ModuleNotFoundError) and (seen.name or "").split(".")[0] in OPTIONAL_PACKAGES:
            return (seen.name or "").split(".")[0]
        seen = seen.__cause__
    return None


def user_message(exc: BaseException) -> str | None:
    """The one line to print for an expected error, or None for a bug (which keeps its traceback)."""
    if isinstance(exc, ImportError):
        module = _missing_optional_module(exc)
        if module is None:
            return None
        if isinstance(exc, ModuleNotFoundError):
            return f"{exc}: it is an optional dependency, install it with: pip install {OPTIONAL_PACKAGES[module]}"
        return str(exc)  # raised by our code from the ModuleNotFoundError, naming what needs it and the pip command
    if _type_names(exc) & EXPECTED:
        return " ".join(str(exc).split()) or type(exc).__name__
    return None


def exit_code(exc: BaseException) -> int:
    """2 for a config the command cannot use (as argparse does for bad arguments), 1 otherwise."""
    if isinstance(exc, RankError):
        return exc.exit_code
    return 2 if "pipeline.config.ConfigError" in _type_names(exc) else 1


def record_rank_error(folder: str | Path, rank: int, exc: BaseException) -> bool:
    """In a rank: if ``exc`` is expected, write its message to ``folder`` for the launcher to report. Returns
    whether it was (the rank should then exit quietly, unless debugging is asked for)."""
    message = user_message(exc)
    if message is None:
        return False
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"rank": rank, "time_ns": time.time_ns(), "message": message, "exit_code": exit_code(exc)}
    tmp = folder / f".rank{rank}.error.json.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, folder / f"rank{rank}.error.json")
    return True


def first_rank_error(folder: str | Path) -> RankError | None:
    """The earliest expected error any rank recorded in ``folder`` (later ones are often its fallout), or None."""
    records = []
    for path in Path(folder).glob("rank*.error.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if not records:
        return None
    first = min(records, key=lambda r: (r["time_ns"], r["rank"]))
    return RankError(f"rank {first['rank']}: {first['message']}", first["exit_code"])
