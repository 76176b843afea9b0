"""The synthetic backend: random batches generated on the device, to measure the model without the data path."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pipeline.config import Config
from pipeline.data.loader import Batch, LoaderPosition
from pipeline.data.recipes import Recipe
from pipeline.distributed import DistEnv


class SyntheticLoader(LoaderPosition):
    """Random batches generated on the device: measures the model without the data path."""

    def __init__(self, cfg: Config, env: DistEnv, device: torch.device, recipe: Recipe) -> None:
        self.recipe = recipe
        self.batch_size, self.device = cfg.loader.batch_size, device
        self.steps_per_epoch = 1_000_000
        self.epoch, self.batch = 0, 0
        self.gen = torch.Generator(device=device).manual_seed(cfg.run.seed + env.rank)
        self.texts = ["a photo"] * self.batch_size if self.recipe.with_text else None

    def __iter__(self) -> Iterator[Batch]:
        b = self.batch_size
        views = [torch.randn(b, 3, v.size, v.size, device=self.device, generator=self.gen) for v in self.recipe.views]
        labels = torch.randint(0, 10, (b,), device=self.device, generator=self.gen)
        while True:
            self.batch += 1
            yield Batch(views, labels, self.texts)
