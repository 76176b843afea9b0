"""Augmentation recipes, declared once and rendered into each loader backend.

A recipe is data: a tuple of :class:`ViewSpec` (one per output view). Renderers turn a ViewSpec into
torchvision.transforms.v2 ops (``render_torchvision``) or DALI ops (``pipeline.data.dali_loader``), so both
backends draw from the same ranges and train the same thing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from pipeline.config import AugmentConfig


@dataclass(frozen=True)
class ViewSpec:
    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    """Area fraction range of the random resized crop; ``(1, 1)`` with ``center=True`` is a centre crop."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    center: bool = False
    """Deterministic resize + centre crop (evaluation)."""
    flip_prob: float = 0.0
    jitter_prob: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    grayscale_prob: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def blur_kernel(self) -> int:
        """Odd kernel of about 10% of the view side (SimCLR), at least 3."""
        k = max(3, int(0.1 * self.size))
        return k if k % 2 else k + 1


@dataclass(frozen=True)
class Recipe:
    name: str
    views: tuple[ViewSpec, ...]
    with_text: bool = False
    """Pass the caption through (CLIP)."""


SIMCLR_JITTER = (0.8, 0.8, 0.8, 0.2)
"""Colour jitter (brightness, contrast, saturation, hue) at strength 1: SimCLR's ``get_color_distort(s=1.0)``
(google-research/simclr ``data_util.py``)."""
BYOL_JITTER = (0.4, 0.4, 0.2, 0.1)
"""BYOL's colour jitter, which MoCo v3 (``main_moco.py``), Barlow Twins and VICReg (``augmentations.py``) and DINO
(``main_dino.py: DataAugmentationDINO``) copy: ``ColorJitter(0.4, 0.4, 0.2, 0.1)`` at strength 1."""


def _simclr_view(cfg: AugmentConfig, jitter: tuple[float, float, float, float] = SIMCLR_JITTER,
                 **overrides) -> ViewSpec:
    s = cfg.jitter_strength  # scales the recipe's own jitter
    view = ViewSpec(
        size=cfg.image_size, scale=tuple(cfg.crop_scale), flip_prob=0.5, jitter_prob=cfg.jitter_prob,
        brightness=jitter[0] * s, contrast=jitter[1] * s, saturation=jitter[2] * s, hue=min(0.5, jitter[3] * s),
        grayscale_prob=cfg.grayscale_prob, blur_prob=cfg.blur_prob, solarize_prob=cfg.solarize_prob,
        mean=tuple(cfg.mean), std=tuple(cfg.std),
    )
    return replace(view, **overrides)


def simclr_recipe(cfg: AugmentConfig) -> Recipe:
    return Recipe("simclr", (_simclr_view(cfg), _simclr_view(cfg)))


def byol_recipe(cfg: AugmentConfig) -> Recipe:
    """BYOL's asymmetric pair: view 1 always blurred, view 2 rarely blurred but sometimes solarized."""
    return Recipe("byol", (
        _simclr_view(cfg, BYOL_JITTER, blur_prob=1.0, solarize_prob=0.0),
        _simclr_view(cfg, BYOL_JITTER, blur_prob=0.1, solarize_prob=0.2),
    ))


def dino_recipe(cfg: AugmentConfig) -> Recipe:
    """DINO multi-crop (main_dino.py ``DataAugmentationDINO``): 2 global views (asymmetric like BYOL) +
    ``local_crops`` small views."""
    global_scale = tuple(cfg.crop_scale) if cfg.crop_scale != (0.08, 1.0) else (0.4, 1.0)
    g1 = _simclr_view(cfg, BYOL_JITTER, scale=global_scale, blur_prob=1.0, solarize_prob=0.0)
    g2 = _simclr_view(cfg, BYOL_JITTER, scale=global_scale, blur_prob=0.1, solarize_prob=0.2)
    local = _simclr_view(cfg, BYOL_JITTER, size=cfg.local_crop_size, scale=tuple(cfg.local_crop_scale),
                         blur_prob=0.5, solarize_prob=0.0)
    return Recipe("dino", (g1, g2) + (local,) * dino_local_crops(cfg))


def dino_local_crops(cfg: AugmentConfig) -> int:
    """``augment.local_crops``, or DINO's default of 8 (main_dino.py ``--local_crops_number``) when unset."""
    return 8 if cfg.local_crops is None else cfg.local_crops


def clip_recipe(cfg: AugmentConfig) -> Recipe:
    view = ViewSpec(size=cfg.image_size, scale=(0.9, 1.0), mean=tuple(cfg.mean), std=tuple(cfg.std))
    return Recipe("clip", (view,), with_text=True)


def mae_recipe(cfg: AugmentConfig) -> Recipe:
    view = ViewSpec(size=cfg.image_size, scale=(0.2, 1.0), flip_prob=0.5, mean=tuple(cfg.mean), std=tuple(cfg.std))
    return Recipe("mae", (view,))


def ijepa_recipe(cfg: AugmentConfig) -> Recipe:
    """I-JEPA: one random resized crop, nothing else (ijepa ``make_transforms`` as its configs run it: no flip, no
    colour distortion, no blur); the masking does the work."""
    view = ViewSpec(size=cfg.image_size, scale=tuple(cfg.crop_scale), mean=tuple(cfg.mean), std=tuple(cfg.std))
    return Recipe("ijepa", (view,))


def single_recipe(cfg: AugmentConfig) -> Recipe:
    """One lightly augmented view (crop + flip): rotation prediction and supervised baselines."""
    view = ViewSpec(size=cfg.image_size, scale=tuple(cfg.crop_scale), flip_prob=0.5, mean=tuple(cfg.mean),
                    std=tuple(cfg.std))
    return Recipe("single", (view,))


def jigsaw_recipe(cfg: AugmentConfig) -> Recipe:
    """The view a jigsaw puzzle is cut from (the method tiles it on the device): crop + flip, and grayscale for
    part of the images against chromatic aberration (the authors' code greys half of the puzzles, VISSL 2/3)."""
    view = ViewSpec(size=cfg.image_size, scale=tuple(cfg.crop_scale), flip_prob=0.5, grayscale_prob=cfg.grayscale_prob,
                    mean=tuple(cfg.mean), std=tuple(cfg.std))
    return Recipe("jigsaw", (view,))


def eval_recipe(cfg: AugmentConfig) -> Recipe:
    view = ViewSpec(size=cfg.image_size, scale=(1.0, 1.0), center=True, mean=tuple(cfg.mean), std=tuple(cfg.std))
    return Recipe("eval", (view,))


RECIPES: dict[str, Callable[[AugmentConfig], Recipe]] = {
    "simclr": simclr_recipe,
    "byol": byol_recipe,
    "dino": dino_recipe,
    "clip": clip_recipe,
    "mae": mae_recipe,
    "single": single_recipe,
    "ijepa": ijepa_recipe,
    "jigsaw": jigsaw_recipe,
    "eval": eval_recipe,
}


def build_recipe(cfg: AugmentConfig, name: str | None = None, method_recipe: str | None = None) -> Recipe:
    """The recipe ``name`` (default ``cfg.recipe``); ``auto`` resolves to ``method_recipe``, the method's own."""
    name = name or cfg.recipe
    if name == "auto":
        if method_recipe is None:
            raise KeyError("augment.recipe=auto needs the method's recipe (Method.recipe); pass method_recipe")
        name = method_recipe
    if name not in RECIPES:
        raise KeyError(f"unknown augmentation recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name](cfg)


def render_torchvision(view: ViewSpec):
    """A ViewSpec as torchvision.transforms.v2 ops: PIL image in, normalised float32 CHW tensor out."""
    from torchvision.transforms import v2

    ops: list = [v2.ToImage()]  # uint8 tensor first: the v2 kernels are faster on tensors than on PIL
    if view.center:
        ops += [v2.Resize(view.size, antialias=True), v2.CenterCrop(view.size)]
    else:
        ops.append(v2.RandomResizedCrop(view.size, scale=view.scale, ratio=view.ratio, antialias=True))
    if view.flip_prob:
        ops.append(v2.RandomHorizontalFlip(view.flip_prob))
    if view.jitter_prob:
        jitter = v2.ColorJitter(view.brightness, view.contrast, view.saturation, view.hue)
        ops.append(v2.RandomApply([jitter], p=view.jitter_prob))
    if view.grayscale_prob:
        ops.append(v2.RandomGrayscale(view.grayscale_prob))
    if view.blur_prob:
        ops.append(v2.RandomApply([v2.GaussianBlur(view.blur_kernel, view.blur_sigma)], p=view.blur_prob))
    if view.solarize_prob:
        ops.append(v2.RandomSolarize(threshold=128, p=view.solarize_prob))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(view.mean), list(view.std))]
    return v2.Compose(ops)
