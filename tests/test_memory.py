"""Per-rank memory accounting of every engine (``pipeline bench memory``'s counting) on 2 real gloo ranks.

One spawn runs all five engines one after the other (a fresh process group each) on a tiny ViT with an EMA
teacher (BYOL), and each rank reports the bytes it holds before the last optimizer step. What sharding must
give, against DDP on the same rank: FSDP2 and ZeRO-3 hold about half of the parameters (teacher included),
gradients and optimizer state; ZeRO-1/2 all of the parameters but about half of the optimizer state (kept
beside an fp32 master partition) and, at that point, of the gradients; DDP all of everything. "About" allows
for FSDP2's padding to whole rows on dim 0 (timm's ``pos_embed`` and ``cls_token`` have one row, so each rank
holds a padded full copy) and for whole gradients that a ZeRO-1/2 partition boundary cuts.
"""

from __future__ import annotations

import pytest
from multirank import free_port, run_ranks

pytestmark = pytest.mark.multirank

ENGINES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
TINY = ["model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.patch_size=8", "model.img_size=32",
        "augment.image_size=32", "method.name=byol", "method.proj_hidden_dim=64", "method.proj_dim=32",
        "method.byol.pred_hidden_dim=64", "loader.batch_size=4", "optim.clip_grad_norm=0",
        # every ZeRO-3 parameter partitioned (none kept gathered as "persistent"): exactly half per rank
        "engine.ds_config={zero_optimization: {stage3_param_persistence_threshold: 0}}"]
HALF_TOL = 0.06
"""|held / DDP's - 1/2| allowed for a sharded kind (FSDP2 padding; ZeRO partition boundaries)."""


def _count_every_engine(ports: list[int]) -> list[dict]:
    import os

    from pipeline.bench.common import run_in_process
    from pipeline.bench.memory import bench_memory_rank, engine_overrides
    from pipeline.config import load_config

    rows = []
    for name, port in zip(ENGINES, ports, strict=True):
        cfg = load_config(None, TINY)
        for key, value in engine_overrides(name).items():
            setattr(cfg.engine, key, value)
        os.environ["MASTER_PORT"] = str(port)  # a fresh rendezvous per engine in this process
        rows += run_in_process(bench_memory_rank, cfg, 2)
    return rows


@pytest.fixture(scope="module")
def held() -> dict[tuple[str, int], dict]:
    rows = run_ranks(_count_every_engine, [free_port() for _ in ENGINES], init_pg=False)[0]
    return {(r["engine"], r["rank"]): r for r in rows}


def _fraction(held, engine: str, rank: int, kind: str) -> float:
    return held[(engine, rank)][f"{kind}_bytes"] / held[("ddp", rank)][f"{kind}_bytes"]


def test_ddp_holds_everything(held):
    for rank in (0, 1):
        r = held[("ddp", rank)]
        params = 4 * r["num_params"]  # fp32, student and teacher
        assert r["params_bytes"] == params
        assert r["grads_bytes"] == 4 * r["trainable_params"]  # DDP's buckets, which the gradients view
        # AdamW: two fp32 moments per trainable parameter, plus a scalar step count per tensor
        assert 2 * 4 * r["trainable_params"] <= r["optim_bytes"] < 2 * 4 * r["trainable_params"] * 1.01
        assert r["master_bytes"] == 0 and r["buckets_bytes"] == 0
        assert r["trainable_params"] < r["num_params"]  # the teacher is there, and frozen


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_fsdp_and_zero3_hold_half_of_everything(held, engine):
    for rank in (0, 1):
        for kind in ("params", "grads", "optim"):
            assert _fraction(held, engine, rank, kind) == pytest.approx(0.5, abs=HALF_TOL), (rank, kind)
    # nothing is lost to the halving: the two ranks together hold at least the whole model
    assert sum(held[(engine, r)]["params_bytes"] for r in (0, 1)) >= held[("ddp", 0)]["params_bytes"]


@pytest.mark.parametrize("engine", ["zero1", "zero2"])
def test_zero1_and_zero2_shard_optimizer_state_not_parameters(held, engine):
    for rank in (0, 1):
        r = held[(engine, rank)]
        assert r["params_bytes"] == held[("ddp", rank)]["params_bytes"]  # the whole flat model-dtype copy
        assert _fraction(held, engine, rank, "optim") == pytest.approx(0.5, abs=HALF_TOL)
        # the master partition: this rank's half of the trainable parameters, in fp32 (a copy even in fp32)
        assert r["master_bytes"] == pytest.approx(2 * r["trainable_params"], rel=HALF_TOL)
        # after the boundary reduce only the partition's gradients stay (whole tensors where a boundary cuts)
        assert 0.5 - HALF_TOL < _fraction(held, engine, rank, "grads") < 0.75
