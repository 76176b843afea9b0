"""The loader protocol every backend implements (torch, DALI, synthetic), and the choice of backend.

Every backend yields :class:`Batch` objects already on the training device and reports its position
(``state_dict``) so a resumed run continues from the next unseen batch. How an epoch is split between ranks and
workers is :mod:`pipeline.data.plan`. Backends take the augmentation recipe from their caller (the trainer builds
it from the method's own recipe): this module knows nothing of the method registry.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from pipeline.config import Config
from pipeline.data.recipes import Recipe
from pipeline.distributed import DistEnv


@dataclass
class Batch:
    """What a method consumes: ``views`` are B x C x H x W tensors on the device, one per recipe view."""

    views: list[torch.Tensor]
    labels: torch.Tensor | None = None
    texts: list[str] | None = None
    keys: list[str] | None = None
    tokens: torch.Tensor | None = None
    """Text token ids (B x L) when a method tokenizes captions in the loader."""
    num_bad: int = 0
    """Samples of this batch that were bad (undecodable, lost to a damaged shard ...) and were replaced by other
    samples of the batch or its neighbourhood; the batch keeps its size."""
    bad_example: str | None = None
    """What was wrong with one of them (for the error when ``data.max_bad_fraction`` is exceeded)."""

    @property
    def size(self) -> int:
        return self.views[0].shape[0]

    def to(self, device: torch.device, non_blocking: bool = True) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch([move(v) for v in self.views], move(self.labels), self.texts, self.keys, move(self.tokens),
                     self.num_bad, self.bad_example)


class Loader(Protocol):
    """What the trainer needs of a loader (torch, DALI and synthetic backends all provide it).

    ``state_dict`` is the job's position (the same on every rank). ``rank_state_dict`` is this rank's own state
    (DALI's pipeline checkpoint): the trainer saves it beside each rank's RNG state and hands it back through
    ``load_rank_state_dict`` on a resume with the same number of ranks, after ``load_state_dict``.
    """

    steps_per_epoch: int
    bad_samples: int
    last_bad: str | None

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, int]: ...

    def load_state_dict(self, state: dict[str, int]) -> None: ...

    def rank_state_dict(self) -> dict: ...

    def load_rank_state_dict(self, state: dict) -> None: ...


class LoaderPosition:
    """The position every backend keeps: ``epoch`` and ``batch`` (batches of that epoch already yielded), and no
    per-rank state unless a backend has some. ``bad_samples`` counts this rank's replaced bad samples since the
    run started (backends that replace bad samples keep it in their rank state); ``last_bad`` describes the
    latest one."""

    epoch: int = 0
    batch: int = 0
    bad_samples: int = 0
    last_bad: str | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def rank_state_dict(self) -> dict:
        return {}

    def load_rank_state_dict(self, state: dict) -> None:
        pass


def resolve_backend(cfg: Config) -> str:
    """``loader.backend``, with ``auto`` resolved: DALI wherever it is installed and can read the source and the
    configured fields (local shards, no weighted mixture, labels from ``.cls``, captions from ``.txt``), else
    torch. An explicit ``dali`` on a source it cannot read is refused with the reason."""
    from pipeline.data.sources import is_remote_value, is_weighted_value

    backend = cfg.loader.backend
    reason = None
    if is_remote_value(cfg.data.train_shards):
        reason = "the DALI backend reads local shards only (for now); remote sources stream through loader.backend=torch"
    elif is_weighted_value(cfg.data.train_shards):
        reason = "the DALI backend does not read weighted mixtures (for now); use loader.backend=torch"
    elif cfg.data.label_key != "cls" or cfg.data.text_key != "txt":
        reason = "the DALI backend reads labels from .cls and captions from .txt only; use loader.backend=torch"
    if backend == "dali" and reason:
        from pipeline.config import ConfigError

        raise ConfigError(f"loader.backend=dali: {reason}")
    if backend != "auto":
        return backend
    if importlib.util.find_spec("nvidia.dali") is None or reason:
        return "torch"
    return "dali"


def build_loader(cfg: Config, env: DistEnv, device: torch.device, recipe: Recipe) -> Loader:
    """The training loader of ``cfg.loader.backend`` (see :func:`resolve_backend`) rendering ``recipe``."""
    backend = resolve_backend(cfg)
    if backend == "synthetic":
        from pipeline.data.synthetic import SyntheticLoader

        return SyntheticLoader(cfg, env, device, recipe)
    if backend == "dali":
        from pipeline.data.dali_loader import DaliLoader

        return DaliLoader(cfg, env, device, recipe)
    from pipeline.data.torch_loader import TorchLoader

    return TorchLoader(cfg, env, device, recipe)
