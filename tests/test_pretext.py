"""The pretext tasks against their definitions: the jigsaw permutation set (Noroozi & Favaro's greedy maximal
Hamming distance algorithm), the jigsaw tiles (cells, gaps, jitter, shuffling), the relative-location grid (gap,
jitter, the 8 neighbour labels) and its countermeasures; register tokens through every method and the export.

Training, export and resume of both methods are covered with every other method in test_methods.py.
"""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError
from pipeline.methods import build_method
from pipeline.methods.jigsaw import all_permutations, hamming_permutations
from pipeline.methods.relative_location import NEIGHBOURS, drop_colours, resample_down_up
from tests.test_methods import REGISTERED, random_batch, tiny_config

# ---------------------------------------------------------------------------------------------------------------
# The permutation set


def test_all_permutations_are_itertools_order():
    for n in (1, 2, 4, 7):
        assert all_permutations(n).tolist() == [list(p) for p in itertools.permutations(range(n))]
    nine = all_permutations(9)
    assert nine.shape == (math.factorial(9), 9) and nine[0].tolist() == list(range(9))
    assert nine[-1].tolist() == list(range(8, -1, -1)) and nine[12345].tolist() == list(
        next(itertools.islice(itertools.permutations(range(9)), 12345, None)))


def _algorithm_1(n: int, tiles: int, first: int, selection: str) -> np.ndarray:
    """Noroozi & Favaro's Algorithm 1 as written (VISSL's generate_jigsaw_permutations.py): keep the chosen rows
    P and the rest P_hat, delete each chosen row from P_hat, D = Hamming(P, P_hat), take argmax of its column
    sums (max_avg) or column minima (max_min)."""
    p_hat = np.array(list(itertools.permutations(range(tiles))))
    j, chosen = first, []
    for _ in range(n):
        chosen.append(p_hat[j])
        p_hat = np.delete(p_hat, j, axis=0)
        d = (np.stack(chosen)[:, None, :] != p_hat[None, :, :]).sum(axis=2)
        j = int((d.sum(axis=0) if selection == "max_avg" else d.min(axis=0)).argmax())
    return np.stack(chosen)


@pytest.mark.parametrize("selection", ["max_avg", "max_min"])
def test_permutation_set_is_the_one_algorithm_1_defines(selection):
    """Same rows, in the same order, as the algorithm written out literally, from the same seeded first order:
    every next order is the best of the remaining ones by the criterion, ties to the first in lexicographic order."""
    for tiles, n in ((4, 20), (9, 6)):
        first = random.Random(0).randrange(math.factorial(tiles))
        got = hamming_permutations(n, tiles, selection, 0).numpy()
        np.testing.assert_array_equal(got, _algorithm_1(n, tiles, first, selection))


def _distances(p: torch.Tensor) -> torch.Tensor:
    d = (p[:, None, :] != p[None, :, :]).sum(-1)
    return d[~torch.eye(len(p), dtype=torch.bool)]


def test_permutation_sets_are_distinct_permutations_with_the_expected_distances():
    for selection in ("max_avg", "max_min"):
        p = hamming_permutations(100, 9, selection, 0)
        assert p.shape == (100, 9) and p.dtype == torch.int64
        assert all(sorted(row) == list(range(9)) for row in p.tolist())
        assert len({tuple(r) for r in p.tolist()}) == 100
        assert _distances(p).min() >= 2
    # max_min guarantees what max_avg does not: while a Latin square can be extended (any k x 9 Latin rectangle
    # can, k < 9), every new order can differ from all chosen ones in all 9 places, so 9 orders are pairwise at
    # distance 9; the 10th must repeat some tile in some slot (pigeonhole), and the greedy step still gets 8.
    assert _distances(hamming_permutations(9, 9, "max_min", 0)).min() == 9
    assert _distances(hamming_permutations(10, 9, "max_min", 0)).min() == 8
    assert _distances(hamming_permutations(4, 4, "max_min", 3)).min() == 4
    # The minimum distance to the chosen set never grows along the max_min sequence.
    p = hamming_permutations(60, 9, "max_min", 0)
    nearest = [min((p[i] != p[j]).sum().item() for j in range(i)) for i in range(1, 60)]
    assert nearest == sorted(nearest, reverse=True) and nearest[-1] >= 6
    # Pinned statistics (seed 0): the 100-order max_avg set averages 8.08 of 9 with a minimum of 2, max_min
    # trades a little average for a minimum of 6.
    avg, lo = _distances(hamming_permutations(100, 9, "max_avg", 0)).float().mean().item(), 2
    assert avg == pytest.approx(8.08, abs=0.005) and _distances(hamming_permutations(100, 9, "max_avg", 0)).min() == lo
    assert _distances(hamming_permutations(100, 9, "max_min", 0)).min() == 6


def test_permutation_set_is_seed_stable():
    a = hamming_permutations(20, 9, "max_avg", 0)
    hamming_permutations.cache_clear()
    b = hamming_permutations(20, 9, "max_avg", 0)
    assert torch.equal(a, b)
    # pinned: the first order of seed 0 (Python's random.Random, stable across versions) and the first derangement
    # of it in lexicographic order after it
    assert a[:2].tolist() == [[5, 0, 1, 6, 2, 8, 3, 7, 4], [0, 1, 2, 3, 4, 5, 6, 8, 7]]
    assert not torch.equal(hamming_permutations(20, 9, "max_avg", 1)[0], a[0])


# ---------------------------------------------------------------------------------------------------------------
# Jigsaw tiles


def coordinate_views(b: int, size: int) -> torch.Tensor:
    """Pixel (c, y, x) holds c * size^2 + y * size + x: a crop's corner per channel can be read from its values."""
    v = torch.arange(3 * size * size, dtype=torch.float64).view(1, 3, size, size)
    return v.expand(b, -1, -1, -1).clone()


def corners_of(crops: torch.Tensor, size: int) -> torch.Tensor:
    """(y, x) of each channel's top-left pixel of crops (... x C x T x T) cut from coordinate_views."""
    c = crops.shape[-3]
    first = crops[..., 0, 0] - torch.arange(c, dtype=crops.dtype) * size * size
    return torch.stack([first // size, first % size], dim=-1).long()


def _jigsaw(overrides=()):
    return build_method(tiny_config("jigsaw", ["augment.image_size=72", "method.jigsaw.tile_size=14",
                                               "method.jigsaw.channel_jitter=2", "method.jigsaw.num_permutations=30",
                                               *overrides]))


def test_jigsaw_tiles_lie_in_their_cells_with_random_gaps_and_channel_jitter():
    torch.manual_seed(0)
    m = _jigsaw()
    size, b = 72, 400
    cell, tile, cj = 24, 14, 2
    x = coordinate_views(b, size)
    tiles, corner = m.cut_tiles(x)
    assert tiles.shape == (b, 9, 3, tile, tile)
    assert torch.equal(corners_of(tiles, size), corner)  # the tiles are the crops at the corners reported
    rows = torch.arange(tile, dtype=x.dtype).view(tile, 1) * size
    cols = torch.arange(tile, dtype=x.dtype).view(1, tile)
    assert torch.equal(tiles - tiles[..., :1, :1], (rows + cols).expand_as(tiles))  # whole, unscaled squares
    k = torch.arange(9)
    cell_corner = torch.stack([k // 3, k % 3], dim=-1).view(1, 9, 1, 2) * cell
    offset = corner - cell_corner
    assert offset.min() >= 0 and (offset + tile).max() <= cell, "every pixel of a tile comes from its cell"
    tile_offset, shift = offset.min(dim=2).values, offset - offset.min(dim=2, keepdim=True).values
    assert shift.max() <= cj and shift.max() == cj and (shift > 0).any()
    assert tile_offset.min() == 0 and tile_offset.max() >= cell - tile - cj  # the whole slack is used
    # Gaps between horizontally adjacent tiles: random, between 0 and 2 x slack (+ channel shifts), the mean the
    # slack: the edges of neighbours never touch with the same offset every time.
    left, right = corner[:, 0, 0, 1], corner[:, 1, 0, 1]
    gap = right - (left + tile)
    assert gap.min() >= 0 and gap.float().std() > 1 and abs(gap.float().mean() - (cell - tile)) < 1


def test_jigsaw_puzzles_put_tile_perm_i_in_slot_i_and_normalise_tiles():
    torch.manual_seed(0)
    m = _jigsaw(["method.jigsaw.normalize_tiles=false", "method.jigsaw.channel_jitter=0"])
    size, b = 72, 64
    torch.manual_seed(1)
    tiles, _ = m.cut_tiles(coordinate_views(b, size))
    torch.manual_seed(1)  # the same tile draws, then the labels
    puzzles, labels = m.make_puzzles(coordinate_views(b, size))
    assert labels.min() >= 0 and labels.max() < 30 and len(labels.unique()) > 10
    for i in range(b):
        order = m.permutations[labels[i]]
        for slot in range(9):
            assert torch.equal(puzzles[i, slot], tiles[i, order[slot]])
    m = _jigsaw()
    puzzles, _ = m.make_puzzles(torch.randn(8, 3, size, size) * 3 + 1)
    torch.testing.assert_close(puzzles.mean(dim=(2, 3, 4)), torch.zeros(8, 9), atol=1e-5, rtol=0)
    torch.testing.assert_close(puzzles.std(dim=(2, 3, 4)), torch.ones(8, 9), atol=1e-5, rtol=0)
    puzzles, _ = m.make_puzzles(torch.zeros(2, 3, size, size))  # flat tiles stay finite
    assert torch.equal(puzzles, torch.zeros_like(puzzles))


def test_jigsaw_classifies_the_concatenation_in_slot_order():
    """The logits depend on which tile sits in which slot (features are concatenated, not pooled)."""
    torch.manual_seed(0)
    m = _jigsaw().eval()
    tiles = torch.randn(1, 9, 3, 14, 14)
    with torch.no_grad():
        f = m.tile_head(m.encoder(tiles.flatten(0, 1))).view(1, -1)
        g = m.tile_head(m.encoder(tiles[:, [1, 0, *range(2, 9)]].flatten(0, 1))).view(1, -1)
        assert not torch.allclose(m.classifier(f), m.classifier(g))


def test_jigsaw_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="augment.image_size to at least 48"):
        build_method(tiny_config("jigsaw", ["augment.image_size=40", "method.jigsaw.tile_size=14",
                                            "method.jigsaw.channel_jitter=2"]))
    cfg = tiny_config("jigsaw", ["model.dynamic_img_size=false"])
    assert build_method(cfg).encoder.dynamic_img_size and cfg.model.timm_kwargs()["dynamic_img_size"]
    with pytest.raises(ConfigError, match="multiple of the model's patch size"):
        build_method(tiny_config("jigsaw", ["method.jigsaw.tile_size=15"]))
    with pytest.raises(ConfigError, match=r"num_permutations must be in \[2, 24\]"):
        tiny_config("jigsaw", ["method.jigsaw.grid=2", "method.jigsaw.num_permutations=25"])
    with pytest.raises(ConfigError, match="max_avg, max_min"):
        tiny_config("jigsaw", ["method.jigsaw.selection=random"])


# ---------------------------------------------------------------------------------------------------------------
# Relative location


def _relloc(overrides=()):
    return build_method(tiny_config("relative_location", ["augment.image_size=64", *overrides]))


def test_relative_location_grid_has_the_gap_and_jitter_of_its_definition():
    """3x3 patches of P px at pitch P + gap, each moved by an integer in [-J, J] per axis from its grid position,
    the grid placed anywhere the jittered patches stay inside the view."""
    torch.manual_seed(0)
    m = _relloc()
    p, g, j, size, b = 14, 7, 1, 64, 2000
    corners = m.sample_grid(b, size, torch.device("cpu"))
    assert corners.shape == (b, 9, 2)
    assert corners.min() >= 0 and (corners + p).max() <= size
    k = torch.arange(9)
    nominal = torch.stack([k // 3, k % 3], dim=-1) * (p + g)
    moved = corners - nominal  # = grid start + jitter
    spread = moved.max(dim=1).values - moved.min(dim=1).values
    assert spread.max() == 2 * j, "jitter is at most J either way, and both extremes occur"
    # the start is uniform over every place the grid fits (jitter margins included)
    start = moved.float().mean(dim=1)
    assert start.min() < j + 1 and start.max() > size - (2 * (p + g) + p) - j - 1
    # gaps between horizontal neighbours: gap +- 2J, never overlapping
    gaps = corners[:, 1, 1] - (corners[:, 0, 1] + p)
    assert gaps.min() == g - 2 * j and gaps.max() == g + 2 * j


def test_relative_location_labels_name_where_the_neighbour_lies():
    """Label l means the second patch is at NEIGHBOURS[l] (row, column) from the first, in the authors' order
    1 2 3 / 4 _ 5 / 6 7 8 (0-based here): read back from the pixels of the patches themselves."""
    assert NEIGHBOURS.tolist() == [[-1, -1], [-1, 0], [-1, 1], [0, -1], [0, 1], [1, -1], [1, 0], [1, 1]]
    plain = ["method.relative_location.color_dropping=false", "method.relative_location.downsample_prob=0",
             "method.relative_location.normalize_patches=false"]
    size, p, pitch = 64, 14, 21
    for all_neighbours, k in ((False, 2), (True, 9)):
        torch.manual_seed(0)
        m = _relloc([*plain, f"method.relative_location.all_neighbours={all_neighbours}"])
        patches, labels, corners = m.make_pairs(coordinate_views(300, size))
        assert patches.shape == (300, k, 3, p, p) and labels.shape == (300, k - 1)
        got = corners_of(patches, size)[:, :, 0]  # B x K x 2, channels share a corner
        assert torch.equal(got[:, 0], corners[:, 4]), "the first patch is the centre"
        step = ((got[:, 1:] - got[:, :1]).float() / pitch).round().long()  # jitter < pitch / 4
        assert torch.equal(step, NEIGHBOURS[labels])
        if all_neighbours:
            assert torch.equal(labels, torch.arange(8).expand(300, 8))
        else:
            assert torch.equal(labels.flatten().bincount(minlength=8) > 20, torch.ones(8, dtype=torch.bool))


def test_patch_downsampling_is_bilinear_down_then_up():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 14, 14)
    side = torch.tensor([14, 1, 3, 7, 10, 13])
    out = resample_down_up(x, side)
    for i, s in enumerate(side.tolist()):
        small = F.interpolate(x[i:i + 1], size=(s, s), mode="bilinear", align_corners=False)
        want = F.interpolate(small, size=(14, 14), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[i:i + 1], want, atol=1e-5, rtol=1e-5)


def test_colour_dropping_and_patch_normalisation():
    torch.manual_seed(0)
    x = torch.randn(500, 3, 14, 14) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1) + 5
    out = drop_colours(x)
    spread = out.std(dim=(2, 3))  # N x 3
    kept = spread.argmax(dim=1)
    kept_ch = out[torch.arange(500), kept]
    torch.testing.assert_close(kept_ch, x[torch.arange(500), kept] - x[torch.arange(500), kept].mean(dim=(1, 2),
                               keepdim=True))
    assert kept.bincount(minlength=3).min() > 130  # each channel kept about a third of the time
    ratio = spread.sort(dim=1).values[:, :2] / spread.max(dim=1, keepdim=True).values
    assert ratio.min() > 0.005 and ratio.max() < 0.015  # the dropped channels: noise at 1/100 of the kept one's
    m = _relloc()
    out = m.preprocess(x[:8].clone())
    rms = out.pow(2).mean(dim=(1, 2, 3)).sqrt()
    torch.testing.assert_close(rms, torch.ones(8), atol=1e-5, rtol=0)


def test_relative_location_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="needs augment.image_size >= 58"):
        build_method(tiny_config("relative_location", ["augment.image_size=57"]))
    cfg = tiny_config("relative_location", ["model.dynamic_img_size=false"])
    assert build_method(cfg).encoder.dynamic_img_size and cfg.model.timm_kwargs()["dynamic_img_size"]
    with pytest.raises(ConfigError, match="multiple of the model's patch size"):
        build_method(tiny_config("relative_location", ["augment.image_size=64", "method.relative_location.patch_size=15"]))


# ---------------------------------------------------------------------------------------------------------------
# Register tokens


def test_reg_tokens_reach_timm_and_are_validated():
    cfg = tiny_config("simclr", ["model.reg_tokens=4"])
    assert cfg.model.timm_kwargs()["reg_tokens"] == 4
    assert "reg_tokens" not in tiny_config("simclr").model.timm_kwargs()
    with pytest.raises(ConfigError, match="reg_tokens must be >= 0"):
        tiny_config("simclr", ["model.reg_tokens=-1"])


@pytest.mark.parametrize("name", REGISTERED)
def test_every_method_trains_with_register_tokens_and_exports_them(name, tmp_path):
    """With ``model.reg_tokens=2`` every method runs forward and backward (registers receive gradient), and its
    encoder exports to weights that timm, built from the exported kwargs, loads strictly and runs identically."""
    from pipeline.export import export_encoder, load_exported, model_config_of

    cfg = tiny_config(name, ["model.reg_tokens=2"])
    torch.manual_seed(0)
    method = build_method(cfg)
    assert method.encoder.num_prefix_tokens == int(cfg.model.class_token) + 2  # I-JEPA has no class token
    assert method.encoder.reg_token.shape[1] == 2
    loss, _ = method(random_batch(cfg, method))
    loss.backward()
    assert method.encoder.reg_token.grad is not None and method.encoder.reg_token.grad.abs().sum() > 0
    export_encoder(method.state_dict(), cfg, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_args"]["reg_tokens"] == 2  # timm's layout
    assert json.loads((tmp_path / "pipeline.json").read_text())["timm_kwargs"]["reg_tokens"] == 2
    model = load_exported(tmp_path)  # strict
    x = torch.randn(2, 3, cfg.model.img_size, cfg.model.img_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), method.encoder.eval()(x))
    assert model_config_of(tmp_path).reg_tokens == 2  # what `pipeline eval` builds its random-init baseline from


def test_mae_never_masks_register_tokens():
    from pipeline.methods.mae import random_masking

    cfg = tiny_config("mae", ["model.reg_tokens=4"])
    torch.manual_seed(0)
    method = build_method(cfg).eval()
    keep, _, _ = random_masking(2, 16, 0.75, torch.device("cpu"))
    imgs = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out = method.encode_visible(imgs, keep)
        assert out.shape == (2, 4 + 5, 32)  # 4 visible patches after cls + 4 registers
        full = method.encode_visible(imgs, torch.arange(16).expand(2, 16))
    torch.testing.assert_close(full, method.encoder.forward_features(imgs), rtol=1e-5, atol=1e-5)


def test_a_run_with_register_tokens_exports_what_timm_loads(fmnist_shards, tmp_path):
    """A real run (MAE: the method that handles token sequences itself) with ``model.reg_tokens=4`` on
    Fashion-MNIST shards exports an encoder that ``timm.create_model(..., reg_tokens=4)`` loads strictly."""
    import timm
    from safetensors.torch import load_file

    from pipeline.trainer import train
    from tests.conftest import tiny_overrides

    run = tmp_path / "reg"
    overrides = [o for o in tiny_overrides(fmnist_shards, run, **{"train.steps": 4, "train.threads": 1})
                 if not o.startswith("method.proj")]
    cfg = tiny_config("mae", [*overrides, "model.reg_tokens=4"])
    assert train(cfg)["steps"] == 4
    assert json.loads((run / "export" / "config.json").read_text())["model_args"]["reg_tokens"] == 4
    model = timm.create_model(f"local-dir:{run / 'export'}", pretrained=True)  # timm's hub loader, strict
    weights = load_file(str(run / "export" / "model.safetensors"))
    torch.testing.assert_close(model.state_dict()["reg_token"], weights["reg_token"])
    assert model.num_prefix_tokens == 5


def test_cli_help_lists_every_registered_method(capsys):
    from pipeline.cli import METHOD_NAMES, main
    from pipeline.methods import METHODS

    assert list(METHOD_NAMES) == [n for n in METHODS if not n.endswith("_test")]
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "jigsaw, relative_location" in " ".join(capsys.readouterr().out.split())
