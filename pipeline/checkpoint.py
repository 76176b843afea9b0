"""Checkpoint layout, the atomic ``latest`` switch, and loading a run directory without running code from it.

``run_dir/checkpoints/step_00000100/`` holds the engine's state (DCP shards or DeepSpeed files), ``trainer.json``
(step, loader position) and ``rng_rank{r}.pt`` per rank (RNG streams, plus per-rank loader state such as DALI's
pipeline checkpoint). It is written as ``step_N.partial`` and renamed once
every rank has finished; only then is the ``latest`` symlink replaced (``os.replace`` of a new link: atomic), so
a process killed at any moment leaves ``latest`` pointing at a complete checkpoint.

Run directories travel (shared file systems, copies between colleagues, downloaded checkpoints), so nothing read
from one may unpickle arbitrary objects: every file resume reads is JSON, or goes through ``torch.load`` with
``weights_only=True`` and only the few globals named in this module and next to the engines allow-listed
(:func:`load_trusted`, :func:`weights_only_loads`), or through DCP's metadata with a restricted unpickler
(``pipeline.engines.dcp_state``). A file that needs anything else is refused with :class:`UntrustedFileError`,
which names it. What the trainer writes per rank is checked to load that way before it is saved.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.distributed import DistEnv, barrier, print0

try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2
except ImportError:
    from numpy.core.multiarray import _reconstruct

LATEST = "latest"
RNG_FILE = "rng_rank{rank}.pt"

TRUST_ADVICE = (
    "Loading it could run code from the file. Resume only run directories that you or your own jobs wrote; to "
    "build on someone else's run, fine-tune from its export/model.safetensors instead. If this file is your own "
    "and a different torch or DeepSpeed version wrote it, resume it with the versions that wrote it."
)


class UntrustedFileError(pickle.UnpicklingError):
    """A file of a run directory that holds pickled objects outside the allow-list: refused, never unpickled."""

    def __init__(self, path: str | os.PathLike, detail: str = "") -> None:
        super().__init__(str(path), detail)  # both in args: the error crosses ranks pickled (DCP gathers failures)
        self.path, self.detail = str(path), detail

    def __str__(self) -> str:
        why = f" ({self.detail})" if self.detail else ""
        return f"{self.path}: refused to load, it holds objects outside what this project writes{why}. {TRUST_ADVICE}"


def refusal_reason(exc: BaseException) -> str:
    """What a weights-only load refused: the line of torch's error that names it (the rest is generic advice)."""
    found = re.search(r"WeightsUnpickler error: *\n*(.+)", str(exc))
    return (found.group(1) if found else str(exc).strip().splitlines()[0]).strip()[:300]


# What ``rng_rank*.pt`` files written before the weights-only format need: numpy's legacy RNG state (a uint32
# ndarray) pickled as numpy objects. Rebuilding an array of a plain dtype runs no code of the file's choosing.
NUMPY_STATE_GLOBALS: list = [
    np.ndarray, np.dtype, type(np.dtype(np.uint32)),
    (_reconstruct, "numpy._core.multiarray._reconstruct"), (_reconstruct, "numpy.core.multiarray._reconstruct"),
]


def load_trusted(f: str | os.PathLike, allow: Sequence = (), **kwargs: Any) -> Any:
    """``torch.load(f, weights_only=True)`` with ``allow`` allow-listed (``torch.serialization.safe_globals``):
    tensors, plain containers and those globals only. A refused file raises :class:`UntrustedFileError` naming it."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(f, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        raise UntrustedFileError(f, refusal_reason(exc)) from None


@contextlib.contextmanager
def weights_only_loads(allow: Sequence = ()) -> Iterator[None]:
    """Every ``torch.load`` in this block loads with ``weights_only=True`` and ``allow`` allow-listed, even a
    library's own call that passes ``weights_only=False`` (DeepSpeed's checkpoint reader, DCP's non-tensor entries):
    torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``. Refusals raise ``pickle.UnpicklingError`` (callers name the file)."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals(list(allow)):
            yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def first_refused(files: Sequence[Path], allow: Sequence = ()) -> UntrustedFileError | None:
    """The refusal of the first of ``files`` that a weights-only load refuses, or None. Zip-format files are
    memory-mapped, so only their pickled structure is read, not the tensor data: a cheap check before a library
    loads the same files (under :func:`weights_only_loads`, which still guards a file swapped after the check)."""
    for f in files:
        try:
            try:
                load_trusted(f, allow, map_location="cpu", mmap=True)
            except (RuntimeError, OSError):  # a legacy (non-zip) file, or a file system without mmap: read it whole
                load_trusted(f, allow, map_location="cpu")
        except UntrustedFileError as exc:
            return exc
    return None


def raise_if_refused_anywhere(refused: UntrustedFileError | None) -> None:
    """Collective where a process group is up: raise the first rank's refusal on every rank. A rank that failed
    alone would leave the others waiting in the next collective (the engine's load) until the job's timeout."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        found: list = [None] * dist.get_world_size()
        dist.all_gather_object(found, None if refused is None else refused.args)
        refused = next((UntrustedFileError(*args) for args in found if args is not None), None)
    if refused is not None:
        raise refused


def rng_state() -> dict[str, Any]:
    """Every RNG stream of this process as tensors and plain Python values (``weights_only`` loads them as is):
    Python's state is a tuple of ints; numpy's the dict form of its legacy state, with the key as a list."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"] = {**np_state["state"], "key": np_state["state"]["key"].tolist()}
    state = {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # the dict form, or the tuple of files written before it
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _serialize_checked(obj: Any, what: str) -> bytes:
    """``torch.save`` bytes of ``obj``, refused here if ``weights_only`` could not read them back: a loader that
    puts e.g. a numpy scalar into its rank state fails at the save, not at the resume."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    try:
        torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    except pickle.UnpicklingError as exc:
        raise TypeError(f"{what} holds objects a weights-only load refuses ({refusal_reason(exc)}): keep it to "
                        "tensors, str/bytes/int/float/bool/None and lists, tuples and dicts of them") from None
    return buf.getvalue()


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
        """Collective: every rank calls it. ``trainer_state`` is rank 0's (the same on every rank, JSON);
        ``rank_state`` is this rank's own (tensors and plain values) and comes back from :meth:`load` as
        ``state["rank"]``. Returns the final folder."""
        final = self.root / step_name(step)
        tmp = self.root / (step_name(step) + ".partial")
        if self.env.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a killed run
            tmp.mkdir(parents=True)
        barrier()
        engine.save(tmp)
        rank_file = tmp / RNG_FILE.format(rank=self.env.rank)
        rank_file.write_bytes(_serialize_checked({**rng_state(), "rank": rank_state or {}},
                                                 f"the state of rank {self.env.rank} ({rank_file.name})"))
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
        state under ``"rank"`` (empty when resuming on another number of ranks). Reads only JSON and weights-only
        files (see the module docstring); a refused file raises :class:`UntrustedFileError` naming it."""
        state = json.loads((path / "trainer.json").read_text())
        rng_file = path / RNG_FILE.format(rank=self.env.rank)
        saved, refused = None, None
        if rng_file.exists() and state.get("world_size") == self.env.world_size:
            try:
                saved = load_trusted(rng_file, NUMPY_STATE_GLOBALS)
            except UntrustedFileError as exc:
                refused = exc
        raise_if_refused_anywhere(refused)  # every rank stops here, before the engine's collective load
        engine.load(path)
        state["rank"] = {}
        if saved is not None:
            set_rng_state(saved)
            state["rank"] = saved.get("rank", {})
        else:
            print0(f"note: {path} was written by {state.get('world_size')} ranks, resuming on "
                   f"{self.env.world_size}: RNG streams restart from the seed and the data order changes")
        return state
