"""The evaluation protocol: weighted kNN per k as dinov2 ``eval/knn.py`` computes it, and the printed summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.distributed import DistEnv
from pipeline.evaluation import knn_accuracy
from tests.multirank import run_ranks


def _dinov2_knn(train_x, train_y, test_x, test_y, ks, t):
    """dinov2 eval/knn.py, one query at a time: softmax(top-max(k) similarities / T) weights, one-hot labels,
    the first k summed per class."""
    tx = torch.nn.functional.normalize(torch.from_numpy(train_x), dim=1)
    out = dict.fromkeys(ks, 0)
    for x, y in zip(test_x, test_y):
        q = torch.nn.functional.normalize(torch.from_numpy(x), dim=0)
        sims, idx = (tx @ q).topk(max(ks))
        weights = (sims / t).softmax(0)
        for k in ks:
            votes = np.zeros(10)
            for w, j in zip(weights[:k], idx[:k]):
                votes[train_y[j]] += w.item()
            out[k] += int(votes.argmax() == y)
    return {k: v / len(test_y) for k, v in out.items()}


def test_knn_per_k_matches_dinov2():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 16))
    train_y, test_y = rng.integers(0, 10, 400), rng.integers(0, 10, 100)
    train_x = (centres[train_y] + 1.5 * rng.normal(size=(400, 16))).astype(np.float32)
    test_x = (centres[test_y] + 1.5 * rng.normal(size=(100, 16))).astype(np.float32)
    ks = (1, 10, 20, 100, 200)
    got = knn_accuracy(train_x, train_y, test_x, test_y, ks=ks, temperature=0.07, chunk=32)
    assert got == pytest.approx(_dinov2_knn(train_x, train_y, test_x, test_y, ks, 0.07))
    assert set(got) == set(ks) and len(set(got.values())) > 1  # k matters on this data


def test_summary_prints_every_k(tmp_path, capsys):
    from pipeline.cli import print_summary

    row = {"pretrained": 0.9, "random_init": 0.7, "raw_pixels": 0.8}
    summary = {"linear_probe": row, **{f"knn_k{k}": row for k in (10, 20, 100, 200)}, "knn_temperature": 0.07,
               "num_train": 100, "num_test": 50, "steps": 3}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    print_summary(path)
    out = capsys.readouterr().out
    for k in (10, 20, 100, 200):
        assert f"kNN k={k}" in out
    assert "linear_probe" in out and "90.0%" in out and "T=0.07" in out


def _evaluate_on_rank(shards: dict, world: int) -> dict | None:
    from pipeline.config import load_config
    from pipeline.distributed import read_dist_env
    from pipeline.evaluation import evaluate
    from pipeline.models import build_encoder
    from tests.conftest import tiny_overrides

    cfg = load_config("configs/quickstart.yaml", tiny_overrides(shards, Path("/tmp/unused")))
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model)
    return evaluate(cfg, encoder, read_dist_env() if world > 1 else DistEnv(), torch.device("cpu"))


@pytest.mark.multirank
def test_evaluate_one_process_and_two_ranks_agree(fmnist_shards):
    """evaluate() reads the shards once for all three encoders; on 2 ranks each rank reads half and fits the probes
    of its share of the encoders: the same figures as one process, on rank 0 only."""
    single = _evaluate_on_rank(fmnist_shards, 1)
    assert list(single) == ["linear_probe", "knn_k10", "knn_k20", "knn_k100", "knn_k200", "knn_temperature",
                            "num_train", "num_test"]
    assert (single["num_train"], single["num_test"]) == (2048, 512)
    for metric in ("linear_probe", "knn_k20"):
        assert list(single[metric]) == ["pretrained", "random_init", "raw_pixels"]
        assert all(0.1 < v <= 1.0 for v in single[metric].values())
    ranks = run_ranks(_evaluate_on_rank, fmnist_shards, 2)
    assert ranks[1] is None
    for metric, row in single.items():
        if isinstance(row, dict):
            for name, value in row.items():
                assert ranks[0][metric][name] == pytest.approx(value, abs=0.01), (metric, name)


def test_evaluate_scores_the_random_init_encoder_it_is_given(fmnist_shards):
    """A method's own encoder before training (MoCo v3's and MAE's fixed sin-cos position embedding, I-JEPA without
    a class token) is the fair random-init baseline; evaluate() scores the one it is given in place of timm's."""
    import copy

    from pipeline.config import load_config
    from pipeline.evaluation import evaluate
    from pipeline.models import build_encoder
    from tests.conftest import tiny_overrides

    cfg = load_config("configs/quickstart.yaml", tiny_overrides(fmnist_shards, Path("/tmp/unused")))
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model)
    given = evaluate(cfg, encoder, DistEnv(), torch.device("cpu"), random_init=copy.deepcopy(encoder))
    default = evaluate(cfg, encoder, DistEnv(), torch.device("cpu"))
    for metric in ("linear_probe", "knn_k20"):
        assert given[metric]["random_init"] == given[metric]["pretrained"]
    assert default["knn_k20"]["random_init"] != default["knn_k20"]["pretrained"]
