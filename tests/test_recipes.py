"""Each recipe rendered into torchvision and into DALI (CPU backend) draws from the same ranges and produces
tensors of the same shape, dtype, layout and normalisation."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import AugmentConfig
from pipeline.data.recipes import RECIPES, ViewSpec, build_recipe, render_torchvision

pytest.importorskip("nvidia.dali")
from pipeline.data.dali_loader import render_arrays

N = 240  # samples per measurement: rates within ~0.1, means within a few %
CFG = AugmentConfig(image_size=32, local_crops=2, local_crop_size=16)
PLAIN = {"jitter_prob": 0.0, "grayscale_prob": 0.0, "blur_prob": 0.0, "solarize_prob": 0.0,
         "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}

NO_JITTER = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}


def render(backend: str, view: ViewSpec, image: np.ndarray, n: int = N) -> np.ndarray:
    """n renderings of one HWC uint8 image, un-normalised to [0, 1] when mean=0, std=1: n x C x H x W."""
    if backend == "dali":
        return render_arrays(view, [image] * n, seed=1234)
    torch.manual_seed(1234)
    tf, pil = render_torchvision(view), Image.fromarray(image)
    return torch.stack([tf(pil) for _ in range(n)]).numpy()


def coordinate_image(side: int = 128) -> np.ndarray:
    """R encodes x, G encodes y: a crop's window can be read back from its pixel values."""
    ramp = np.linspace(0, 255, side).round().astype(np.uint8)
    img = np.zeros((side, side, 3), np.uint8)
    img[..., 0], img[..., 1] = ramp[None, :], ramp[:, None]
    return img


def crop_stats(out: np.ndarray) -> dict[str, np.ndarray]:
    r, g = out[:, 0], out[:, 1]
    w = r.max(axis=(1, 2)) - r.min(axis=(1, 2))
    h = g.max(axis=(1, 2)) - g.min(axis=(1, 2))
    flipped = r[:, :, 0].mean(axis=1) > r[:, :, -1].mean(axis=1)
    return {"area": w * h, "log_ratio": np.log(np.maximum(w, 1e-3) / np.maximum(h, 1e-3)), "flip": flipped}


def views_of(name: str) -> list[ViewSpec]:
    return list(dict.fromkeys(build_recipe(CFG, name).views))  # distinct views only (DINO's locals are equal)


RANDOM_RECIPES = [r for r in RECIPES if r != "eval"]


@pytest.mark.parametrize("name", RANDOM_RECIPES)
def test_crop_and_flip_ranges_match(name):
    for view in views_of(name):
        plain = replace(view, **PLAIN)
        stats = {b: crop_stats(render(b, plain, coordinate_image())) for b in ("torch", "dali")}
        lo, hi = view.scale
        for b, s in stats.items():
            assert s["area"].min() >= lo * 0.8 - 0.02 and s["area"].max() <= hi + 0.02, (b, view)
            assert abs(s["flip"].mean() - view.flip_prob) < 0.1, (b, view)
        t, d = stats["torch"], stats["dali"]
        assert abs(t["area"].mean() - d["area"].mean()) < 0.06, (view, t["area"].mean(), d["area"].mean())
        assert abs(t["area"].std() - d["area"].std()) < 0.05
        assert abs(t["log_ratio"].mean() - d["log_ratio"].mean()) < 0.08
        assert abs(t["log_ratio"].std() - d["log_ratio"].std()) < 0.06


def colour_stats(out: np.ndarray, base: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample brightness factor and saturation (channel spread) relative to the constant input colour."""
    mean = out.mean(axis=(2, 3))  # n x 3
    base = base / 255.0
    return {"brightness": mean.mean(axis=1) / base.mean(), "spread": (mean.max(1) - mean.min(1)) / (base.max() - base.min()),
            "mean": mean}


@pytest.mark.parametrize("name", RANDOM_RECIPES)
def test_jitter_grayscale_solarize_rates_and_strengths_match(name):
    colour = np.array([150, 110, 70], np.uint8)
    image = np.broadcast_to(colour, (48, 48, 3)).copy()
    for view in views_of(name):
        checks = []
        if view.jitter_prob and view.brightness:
            bright = replace(view, **{**PLAIN, **NO_JITTER, "jitter_prob": view.jitter_prob, "brightness": view.brightness})
            checks.append(("brightness", bright))
        if view.jitter_prob and view.saturation:
            sat = replace(view, **{**PLAIN, **NO_JITTER, "jitter_prob": view.jitter_prob, "saturation": view.saturation})
            checks.append(("spread", sat))
        if view.grayscale_prob:
            checks.append(("gray", replace(view, **{**PLAIN, "grayscale_prob": view.grayscale_prob})))
        for what, v in checks:
            res = {}
            for b in ("torch", "dali"):
                s = colour_stats(render(b, v, image), colour.astype(float))
                res[b] = s["spread"] < 0.02 if what == "gray" else s[what]
            t, d = res["torch"], res["dali"]
            if what == "gray":
                assert abs(t.mean() - d.mean()) < 0.1 and abs(d.mean() - view.grayscale_prob) < 0.1, (view, t.mean(), d.mean())
                continue
            strength = view.brightness if what == "brightness" else view.saturation
            changed_t, changed_d = np.abs(t - 1) > 1e-3, np.abs(d - 1) > 1e-3
            assert abs(changed_t.mean() - changed_d.mean()) < 0.1, (what, changed_t.mean(), changed_d.mean())
            assert abs(changed_d.mean() - view.jitter_prob) < 0.1
            if what == "brightness":  # saturation of a clipped colour is not linear in the factor: compare spread
                for x in (t, d):
                    assert x.min() >= max(0, 1 - strength) - 0.03 and x.max() <= 1 + strength + 0.03
            assert abs(np.median(t[changed_t]) - np.median(d[changed_d])) < 0.15 * max(1.0, strength)
            assert abs(t[changed_t].std() - d[changed_d].std()) < 0.1 * max(1.0, strength)
        if view.solarize_prob:
            v = replace(view, **{**PLAIN, "solarize_prob": view.solarize_prob})
            grey = np.full((48, 48, 3), 200, np.uint8)
            rates = {b: (render(b, v, grey).mean(axis=(1, 2, 3)) < 0.5).mean() for b in ("torch", "dali")}
            assert abs(rates["torch"] - rates["dali"]) < 0.1 and abs(rates["dali"] - view.solarize_prob) < 0.1


@pytest.mark.parametrize("name", RANDOM_RECIPES)
def test_blur_rates_match(name):
    checker = ((np.indices((64, 64)).sum(axis=0) // 4) % 2 * 255).astype(np.uint8)
    image = np.repeat(checker[..., None], 3, axis=2)
    for view in views_of(name):
        if not view.blur_prob:
            continue
        v = replace(view, **{**PLAIN, "blur_prob": view.blur_prob}, center=True, scale=(1.0, 1.0))
        sharp = replace(v, blur_prob=0.0)
        rates = {}
        for b in ("torch", "dali"):
            ref = render(b, sharp, image, 1)[0].std()
            rates[b] = (render(b, v, image).std(axis=(1, 2, 3)) < 0.97 * ref).mean()
        assert abs(rates["torch"] - rates["dali"]) < 0.12, (view, rates)


@pytest.mark.parametrize("name", list(RECIPES))
def test_same_shape_dtype_layout_and_normalisation(name):
    rng = np.random.default_rng(0)
    photo = (rng.random((60, 80, 3)) * 255).astype(np.uint8)
    flat = np.full((60, 80, 3), 90, np.uint8)
    recipe = build_recipe(CFG, name)
    for view in views_of(name):
        t, d = render("torch", view, photo, 4), render("dali", view, photo, 4)
        assert t.shape == d.shape == (4, 3, view.size, view.size)
        assert t.dtype == d.dtype == np.float32
        # Normalisation: a flat grey image with the colour ops off comes out as (90/255 - mean) / std.
        plain = replace(view, jitter_prob=0.0, grayscale_prob=0.0, solarize_prob=0.0)
        expected = (90 / 255 - np.array(view.mean)) / np.array(view.std)
        for b in ("torch", "dali"):
            got = render(b, plain, flat, 2).mean(axis=(0, 2, 3))
            np.testing.assert_allclose(got, expected, atol=0.02, err_msg=b)
    assert recipe.with_text == (name == "clip")


def test_eval_view_renders_the_same_pixels():
    rng = np.random.default_rng(1)
    photo = np.kron(rng.random((6, 8, 3)), np.ones((10, 10, 1)))  # flat blocks: resamplers differ at edges only
    photo = (photo * 255).astype(np.uint8)
    view = build_recipe(CFG, "eval").views[0]
    t, d = render("torch", view, photo, 1), render("dali", view, photo, 1)
    assert np.median(np.abs(t - d)) < 0.02  # normalised units: same window, same scale, same normalisation


@pytest.mark.parametrize("name, expected", [("simclr", (0.8, 0.8, 0.8, 0.2)), ("byol", (0.4, 0.4, 0.2, 0.1)),
                                            ("dino", (0.4, 0.4, 0.2, 0.1))])
def test_colour_jitter_of_each_reference(name, expected):
    """At strength 1 each recipe jitters as its reference code: SimCLR ``get_color_distort(s=1)``; BYOL, and MoCo
    v3, Barlow Twins, VICReg and DINO which copy it, ``ColorJitter(0.4, 0.4, 0.2, 0.1)`` with p=0.8; the
    strength scales the recipe's own values."""
    for s in (1.0, 0.5):
        for view in build_recipe(replace(CFG, jitter_strength=s), name).views:
            assert (view.brightness, view.contrast, view.saturation, view.hue) == pytest.approx(
                tuple(x * s for x in expected)), (name, s, view)
            assert view.jitter_prob == 0.8 and view.grayscale_prob == 0.2
