"""DDP, FSDP2 and DeepSpeed ZeRO-1/2/3 on 2 real gloo ranks (CPU), training real Fashion-MNIST shards.

One spawn per engine runs every scenario in the same two processes (spawning and importing torch, timm and
DeepSpeed costs far more than the tiny runs themselves):

- SimCLR, 6 steps: the per-step loss trajectory, compared across engines (fp32: within ``RTOL``/``ATOL``;
  on this machine they are bitwise equal);
- the export written by ``train()`` (the engine's ``method_state_dict``), loaded strictly into timm, gives
  the features of the engine's own (wrapped, sharded) model, and so does the offline export through
  ``read_model_state`` (zero_to_fp32 for DeepSpeed); every engine's file has the same keys, shapes, dtypes;
- a method with an EMA teacher (``EMASimCLR`` below): same trajectory as under DDP, teacher held as documented
  (replicated under DDP and ZeRO-1/2, sharded like the student under FSDP2 and ZeRO-3);
- save at step 3, crash at step 4 (every rank raises, as a killed job would stop), resume in the same run
  directory: same losses and the same weights (student, projector, teacher) as the uninterrupted run;
- FSDP2 only: the 2-rank checkpoint loads on 1 rank with identical state, and training resumes there;
- DeepSpeed bf16 (ZeRO-2, ZeRO-3, one more spawn): the EMA teacher stays fp32, also once reloaded, and the
  export holds the fp32 master weights zero_to_fp32 gives;
- every method: each frozen transformer block (EMA teachers) is a sharding unit of its own (no processes).

DeepSpeed's ``deepspeed_shm_comm`` extension compiles on the first run on a machine (~35 s alone, minutes on
a busy machine); it is cached under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), so
later runs only load it. The ZeRO tests trigger that build once, in the first DeepSpeed spawn.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_overrides
from multirank import free_port, run_ranks

from pipeline.data.loader import Batch
from pipeline.losses.contrastive import nt_xent
from pipeline.methods import METHODS
from pipeline.methods.simclr import SimCLR
from pipeline.models import ema_update, held_tensors

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
BYOL, DINO = QUICKSTART.with_name("byol.yaml"), QUICKSTART.with_name("dino.yaml")
RTOL, ATOL = 1e-5, 1e-6
"""fp32 agreement of loss trajectories and weights across engines (different reduction orders may differ in
the last bits; nothing here is allowed to differ by more)."""
FEATURE_ATOL = 1e-5

ENGINES = {
    "ddp": {"engine.name": "ddp"},
    "fsdp": {"engine.name": "fsdp"},
    "zero1": {"engine.name": "deepspeed", "engine.zero_stage": 1},
    "zero2": {"engine.name": "deepspeed", "engine.zero_stage": 2},
    # Small parameters stay gathered under ZeRO-3 ("persistent"); at 1000 elements the tiny ViT has both kinds,
    # so the EMA update is tested on partitions and on persistent parameters.
    "zero3": {"engine.name": "deepspeed", "engine.zero_stage": 3,
              "engine.ds_config": {"zero_optimization": {"stage3_param_persistence_threshold": 1000}}},
}


class EMASimCLR(SimCLR):
    """Test-only two-network method: SimCLR plus an EMA copy of the encoder whose features the student's are
    pulled toward. The teacher changes the loss (and so the trajectory) from step 2 on, so a teacher held or
    updated wrongly under any engine shows up as a different trajectory."""

    momentum = 0.9

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.teacher = copy.deepcopy(self.encoder).requires_grad_(False)

    def forward(self, batch: Batch):
        b = batch.size
        x = torch.cat(batch.views[:2])
        h = self.encoder(x)
        z = self.projector(h)
        with torch.no_grad():
            t = self.teacher(x)
        loss = nt_xent(z[:b], z[b:], self.temperature, self.local_loss)
        return loss + (1 - F.cosine_similarity(h, t, dim=-1)).mean(), {}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        ema_update(self.teacher, self.encoder, self.momentum)


METHODS["simclr_ema_test"] = EMASimCLR


def _probe_images() -> torch.Tensor:
    return torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(123))


def _config(shards, run_dir: Path, engine: str, **extra):
    from pipeline.config import load_config

    # No loader worker processes: fewer processes on a 2-core machine, and no fork of a rank process that
    # already runs gloo and DeepSpeed threads.
    overrides = {**ENGINES[engine], "metrics.log_every": 1, "checkpoint.keep_last": 3, "loader.num_workers": 0,
                 **extra}
    return load_config(QUICKSTART, tiny_overrides(shards, run_dir, **overrides))


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]  # a resumed run appends: the later record of a step wins
    return out


class _Crash(RuntimeError):
    pass


def _crash_at(step: int):
    def report(metrics):
        if metrics["step"] == step:
            raise _Crash(f"simulated kill at step {step}")

    return report


def _train(cfg, port: int, report=None):
    import os

    from pipeline.trainer import train

    os.environ["MASTER_PORT"] = str(port)  # a fresh rendezvous per run in this process
    return train(cfg, report)


def _held_kind(p) -> tuple:
    """How this rank holds a parameter: (kind, global shape, numel held here)."""
    if hasattr(p, "ds_tensor"):
        return ("zero3", tuple(p.ds_shape), p.ds_tensor.numel())
    if hasattr(p, "to_local"):
        return (f"dtensor{tuple(str(x) for x in p.placements)}", tuple(p.shape), p.to_local().numel())
    return ("tensor", tuple(p.shape), p.numel())


def _held(method) -> dict[str, list]:
    """How this rank holds each network's parameters (``_held_kind``)."""
    return {"encoder": [_held_kind(p) for p in method.encoder.parameters()],
            "teacher": [_held_kind(p) for p in method.teacher.parameters()]}


def _inspect(cfg, ckpt: Path, port: int) -> dict:
    """Set up the engine afresh, load ``ckpt`` and report what the engine's own model computes and holds."""
    import os

    from pipeline.distributed import destroy_distributed, init_distributed, pick_device, read_dist_env
    from pipeline.engines import build_engine
    from pipeline.methods import build_method
    from pipeline.trainer import seed_everything

    os.environ["MASTER_PORT"] = str(port)
    env = read_dist_env()
    device = pick_device(env, "cpu")
    init_distributed(env, device, "gloo")
    try:
        seed_everything(cfg.run.seed)
        method = build_method(cfg)
        engine = build_engine(cfg, env, device)
        engine.setup(method, cfg.train.steps)
        engine.load(ckpt)
        captured = []
        if engine.dtype is None:  # fp32: what the engine's own model computes
            hook = method.encoder.register_forward_hook(lambda m, i, o: captured.append(o.detach().clone()))
            x = _probe_images()
            # the probe runs in train mode, which moves BatchNorm running statistics: put back what was loaded
            loaded = {n: b.detach().clone() for n, b in method.named_buffers()}
            with torch.no_grad():
                engine.model(Batch([x, x]))
                for n, b in method.named_buffers():
                    b.copy_(loaded[n])
            hook.remove()
        state = engine.method_state_dict()
        teacher = hasattr(method, "teacher")
        return {"features": captured[0][: len(x)] if captured else None, "held": _held(method) if teacher else None,
                "teacher_dtypes": sorted({str(t.dtype) for p in method.teacher.parameters() for t in held_tensors(p)})
                if teacher else None, "state": state, "lr": engine.lr}
    finally:
        destroy_distributed()


def _scenario(engine: str, shards, root: Path, ports: list[int]) -> dict:
    """Everything one engine is tested on, run on each of the 2 ranks."""
    import faulthandler

    import torch.distributed as dist

    faulthandler.dump_traceback_later(480, exit=True)  # a hang shows its stacks instead of a bare timeout
    out: dict = {}
    simclr = root / "simclr"
    _train(_config(shards, simclr, engine), ports[0])
    out["simclr"] = {"run": str(simclr), "losses": _losses(simclr),
                     "own": _inspect(_config(shards, simclr, engine), simclr / "checkpoints" / "latest", ports[1])}

    ema_cfg = {"method.name": "simclr_ema_test"}
    ema = root / "ema"
    _train(_config(shards, ema, engine, **ema_cfg), ports[2])
    crashed = root / "ema_resumed"
    try:
        _train(_config(shards, crashed, engine, **ema_cfg), ports[3], report=_crash_at(4))
        raise AssertionError("the run was meant to crash at step 4")
    except _Crash:
        pass
    assert not dist.is_initialized()
    after_crash = sorted(p.name for p in (crashed / "checkpoints").glob("step_*"))
    summary = _train(_config(shards, crashed, engine, **ema_cfg), ports[4])
    out["ema"] = {"run": str(ema), "losses": _losses(ema), "after_crash": after_crash,
                  "resumed": {"run": str(crashed), "losses": _losses(crashed), "steps": summary["steps"]},
                  "own": _inspect(_config(shards, ema, engine, **ema_cfg), ema / "checkpoints" / "latest", ports[5])}
    faulthandler.cancel_dump_traceback_later()
    return _portable(out)


def _portable(obj):
    """Tensors as numpy arrays: torch.multiprocessing would pass tensors through shared memory handles that
    die with the rank process that made them."""
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu()
        return (obj.float() if obj.dtype == torch.bfloat16 else obj).numpy()  # numpy has no bf16
    if isinstance(obj, dict):
        return {k: _portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_portable(v) for v in obj)
    return obj


def _tensors(obj):
    import numpy as np

    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: _tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tensors(v) for v in obj)
    return obj


_RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def scenario(fmnist_shards, tmp_path_factory):
    def get(engine: str) -> dict:
        if engine not in _RESULTS:
            root = tmp_path_factory.mktemp(engine)
            ports = [free_port() for _ in range(6)]
            try:
                _RESULTS[engine] = _tensors(run_ranks(_scenario, engine, fmnist_shards, root, ports, init_pg=False)[0])
            except RuntimeError as exc:  # fail every test of this engine with the ranks' error, run it once
                _RESULTS[engine] = exc
        if isinstance(_RESULTS[engine], Exception):
            raise _RESULTS[engine]
        return _RESULTS[engine]

    return get


def _assert_state_close(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b), what
    for k, v in a.items():
        torch.testing.assert_close(v.float(), b[k].float(), rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{what}: {k}: {m}")


# -- every engine ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", list(ENGINES))
def test_loss_trajectory_matches_ddp(scenario, engine):
    ref, got = scenario("ddp"), scenario(engine)
    for method in ("simclr", "ema"):
        r, g = ref[method]["losses"], got[method]["losses"]
        assert sorted(g) == list(range(1, 7))
        torch.testing.assert_close(torch.tensor([g[s] for s in sorted(g)], dtype=torch.float64),
                                   torch.tensor([r[s] for s in sorted(r)], dtype=torch.float64), rtol=RTOL, atol=ATOL)
    # the teacher matters: the EMA method's trajectory is not SimCLR's
    assert got["ema"]["losses"][6] != pytest.approx(got["simclr"]["losses"][6])


@pytest.mark.parametrize("engine", list(ENGINES))
def test_resume_after_crash_reaches_the_same_weights(scenario, engine):
    from pipeline.engines import engine_class
    from pipeline.methods import build_method

    res = scenario(engine)["ema"]
    assert res["after_crash"] == ["step_00000003"]  # killed after the step-3 checkpoint, before step 6
    assert res["resumed"]["steps"] == 6
    losses, resumed = res["losses"], res["resumed"]["losses"]
    torch.testing.assert_close(torch.tensor([resumed[s] for s in range(1, 7)]),
                               torch.tensor([losses[s] for s in range(1, 7)]), rtol=RTOL, atol=ATOL)
    cfg = _config({"train": "", "test": ""}, Path(res["run"]), engine, **{"method.name": "simclr_ema_test"})
    cls = engine_class(cfg.engine.name)
    full = cls.read_model_state(Path(res["run"]) / "checkpoints" / "step_00000006", build_method(cfg))
    again = cls.read_model_state(Path(res["resumed"]["run"]) / "checkpoints" / "step_00000006", build_method(cfg))
    assert any(k.startswith("teacher.") for k in full)
    _assert_state_close(again, full, f"{engine}: resumed vs uninterrupted")
    # the teacher really is an EMA, not a copy of the student
    assert not torch.equal(full["teacher.blocks.0.attn.qkv.weight"], full["encoder.blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("engine", list(ENGINES))
def test_export_loads_strictly_into_timm_with_the_engine_features(scenario, engine, tmp_path):
    from safetensors.torch import load_file

    from pipeline.engines import engine_class
    from pipeline.export import WEIGHTS, export_encoder, load_exported
    from pipeline.methods import build_method

    res = scenario(engine)["simclr"]
    run = Path(res["run"])
    x = _probe_images()
    own = res["own"]["features"]
    with torch.no_grad():
        exported = load_exported(run / "export")(x)  # strict=True inside
    torch.testing.assert_close(exported, own, rtol=0, atol=FEATURE_ATOL)

    # offline, one process, no process group: the CLI's `pipeline export` path (zero_to_fp32 for DeepSpeed)
    cfg = _config({"train": "", "test": ""}, run, engine)
    state = engine_class(cfg.engine.name).read_model_state(run / "checkpoints" / "latest", build_method(cfg))
    export_encoder(state, cfg, tmp_path / "offline")
    with torch.no_grad():
        offline = load_exported(tmp_path / "offline")(x)
    torch.testing.assert_close(offline, own, rtol=0, atol=FEATURE_ATOL)

    # the same file format whichever engine trained it
    ref = load_file(str(Path(scenario("ddp")["simclr"]["run"]) / "export" / WEIGHTS))
    got = load_file(str(run / "export" / WEIGHTS))
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in ref.items()}
    assert json.loads((run / "export" / "config.json").read_text()) == \
        json.loads((Path(scenario("ddp")["simclr"]["run"]) / "export" / "config.json").read_text())


TEACHER_ENGINE_KIND = {"ddp": "tensor", "zero1": "tensor", "zero2": "tensor", "fsdp": "dtensor('S(0)',)",
                       "zero3": "zero3"}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_teacher_is_held_like_the_student(scenario, engine):
    """Replicated (whole tensors) under DDP and ZeRO-1/2; sharded exactly like the student under FSDP2
    (Shard(0) DTensors) and ZeRO-3 (partitions of ceil(numel / 2) per rank)."""
    held = scenario(engine)["ema"]["own"]["held"]  # rank 0's view
    assert held["teacher"] == held["encoder"]
    kinds = {k for k, _, _ in held["teacher"]}
    assert kinds == {TEACHER_ENGINE_KIND[engine]}
    for _, shape, local in held["teacher"]:
        numel = math.prod(shape)
        if engine == "fsdp":  # rank 0 holds the first ceil(dim0 / 2) rows
            assert local == -(-shape[0] // 2) * numel // shape[0]
        elif engine == "zero3":  # flat partitions of ceil(numel / 2)
            assert local == -(-numel // 2)
        else:
            assert local == numel


# -- method heads under every engine: global BatchNorm, DINO's frozen last layer and weight-decay schedule -----

TINY = {"model.embed_dim": 32, "model.depth": 2, "model.num_heads": 2, "method.proj_hidden_dim": 64,
        "method.proj_dim": 32, "method.byol.pred_hidden_dim": 64, "method.dino.out_dim": 128,
        "method.dino.hidden_dim": 64, "method.dino.bottleneck_dim": 32, "augment.local_crops": 0,
        "optim.warmup_steps": 0}


def _setup(preset: Path, overrides: dict, total: int):
    from pipeline.config import load_config
    from pipeline.distributed import read_dist_env
    from pipeline.engines import build_engine
    from pipeline.methods import build_method

    cfg = load_config(preset, [f"{k}={v}" for k, v in {**TINY, **overrides}.items()])
    torch.manual_seed(cfg.run.seed)
    method = build_method(cfg)
    engine = build_engine(cfg, read_dist_env(), torch.device("cpu"))
    engine.setup(method, total)
    return method, engine


def _views(world: int) -> list[torch.Tensor]:
    """This rank's rows of one fixed global batch of 16 (two 28 px views)."""
    import torch.distributed as dist

    rank = dist.get_rank() if world > 1 else 0
    g = torch.Generator().manual_seed(0)
    return [torch.randn(16, 3, 28, 28, generator=g)[rank * 16 // world:(rank + 1) * 16 // world] for _ in range(2)]


def _byol_steps(world: int) -> dict[str, list[float]]:
    """BYOL (BatchNorm in projector and predictor, ``method.sync_bn`` on) under each engine: this rank's losses
    of 2 optimizer steps. ``ddp_per_rank_bn`` turns ``method.sync_bn`` off."""
    variants = {**ENGINES, "ddp_per_rank_bn": {"engine.name": "ddp", "method.sync_bn": False},
                **DS_BF16} if world > 1 else {"ddp": ENGINES["ddp"]}
    out = {}
    for name, engine in variants.items():
        _, eng = _setup(BYOL, {"loader.batch_size": 16 // world, **engine}, 2)
        losses = []
        for _ in range(2):
            loss, _ = eng.micro_step(Batch(_views(world)), sync=True, scale=1.0)
            eng.step()
            losses.append(loss.item())
        out[name] = losses
    return out


# DeepSpeed bf16 casts parameters to bf16 and leaves buffers (BatchNorm running statistics) fp32, which torch's
# batch_norm refuses; the head BatchNorm then normalises in the buffers' dtype.
DS_BF16 = {"zero2_bf16": {"engine.name": "deepspeed", "engine.zero_stage": 2, "engine.precision": "bf16"},
           "zero2_bf16_per_rank_bn": {"engine.name": "deepspeed", "engine.zero_stage": 2, "engine.precision": "bf16",
                                      "method.sync_bn": False},
           "zero3_bf16": {"engine.name": "deepspeed", "engine.zero_stage": 3, "engine.precision": "bf16"}}


def _byol_bf16_one_process() -> dict[str, list[float]]:
    out = {}
    for name in ("zero2_bf16", "zero3_bf16"):
        _, eng = _setup(BYOL, {"loader.batch_size": 16, **DS_BF16[name]}, 2)
        losses = []
        for _ in range(2):
            loss, _ = eng.micro_step(Batch(_views(1)), sync=True, scale=1.0)
            eng.step()
            losses.append(loss.item())
        out[name] = losses
    return out


def _copy(state: dict | None) -> dict | None:
    return None if state is None else {k: v.clone() for k, v in state.items()}


def _dino_freeze_steps(world: int) -> dict[str, dict]:
    """DINO with ``freeze_last_layer_steps=2`` and weight decay 0.04 -> 0.4 under each engine, 4 steps: per
    step, the (lr, weight decay) of every parameter group before it, and whether the last layer and the rest of
    the network moved (full state through the engine's own ``method_state_dict``; rank 0 reports)."""
    out = {}
    for name, engine in ENGINES.items():
        clip_mode = "global" if engine["engine.name"] == "deepspeed" else "per_param"  # DeepSpeed clips globally
        method, eng = _setup(DINO, {"loader.batch_size": 16 // world, "method.dino.freeze_last_layer_steps": 2,
                                    "optim.weight_decay": 0.04, "optim.weight_decay_end": 0.4,
                                    "optim.clip_grad_mode": clip_mode, **engine}, 4)
        before = _copy(eng.method_state_dict())
        steps = []
        for step in range(4):
            groups = [(g["lr"], g["weight_decay"]) for g in eng.optimizer.param_groups]
            eng.micro_step(Batch(_views(world)), sync=True, scale=1.0)
            eng.step()
            method.after_step(step, 4)
            after = _copy(eng.method_state_dict())  # on CPU under DDP it holds the live tensors
            if after is not None:
                moved = {k for k in after if k.startswith(("encoder.", "head.")) and not torch.equal(after[k], before[k])}
                steps.append({"groups": groups, "last_layer": "head.last_layer.weight" in moved,
                              "rest": len(moved - {"head.last_layer.weight"})})
            before = after
        out[name] = steps
    return out


def _head_checks(world: int) -> dict:
    return {"byol": _byol_steps(world), "dino": _dino_freeze_steps(world)}


@pytest.fixture(scope="module")
def head_checks() -> dict:
    """Both head checks in one spawn of 2 ranks (spawning and DeepSpeed's start-up dominate their cost)."""
    if "heads" not in _RESULTS:
        _RESULTS["heads"] = run_ranks(_head_checks, 2)
    return _RESULTS["heads"]


def test_head_batchnorm_is_global_under_every_engine(head_checks):
    """BYOL's head BatchNorm under DDP, FSDP2 and ZeRO-1/2/3 on 2 ranks, each holding half of a batch: the mean
    rank loss of two optimizer steps equals one process on the whole batch (gradients and running statistics
    are checked exactly in test_methods; here the point is that the module runs as it should inside each engine's
    wrapping). Per-rank BatchNorm does not match, so the check can fail."""
    single = torch.tensor(_byol_steps(1)["ddp"], dtype=torch.float64)
    for name in [*ENGINES, "ddp_per_rank_bn"]:
        losses = torch.tensor([r["byol"][name] for r in head_checks], dtype=torch.float64).mean(0)
        close = torch.allclose(losses, single, rtol=RTOL, atol=ATOL)
        assert close == (name != "ddp_per_rank_bn"), (name, losses.tolist(), single.tolist())


def test_head_batchnorm_under_deepspeed_bf16(head_checks):
    """BYOL's head BatchNorm with DeepSpeed bf16 (bf16 weights, fp32 running statistics), in one process and on
    2 ranks with global and per-rank statistics: it trains, and its losses follow the fp32 run within bf16's
    precision (global statistics only: per-rank statistics give other losses, see above)."""
    single = torch.tensor(_byol_steps(1)["ddp"], dtype=torch.float64)
    one = run_ranks(_byol_bf16_one_process, world_size=1)[0]
    for name, losses in one.items():
        assert torch.allclose(torch.tensor(losses, dtype=torch.float64), single, rtol=3e-2), (name, losses, single)
    for name in DS_BF16:
        losses = torch.tensor([r["byol"][name] for r in head_checks], dtype=torch.float64).mean(0)
        assert torch.isfinite(losses).all(), (name, losses)
        if name != "zero2_bf16_per_rank_bn":
            assert torch.allclose(losses, single, rtol=3e-2), (name, losses.tolist(), single.tolist())


@pytest.mark.parametrize("engine", list(ENGINES))
def test_dino_last_layer_freeze_and_weight_decay_schedule(head_checks, engine):
    """The schedule lives in the engines' shared optimizer set-up, and DeepSpeed steps it itself: under every
    engine DINO's last layer holds still for exactly ``freeze_last_layer_steps`` while the network trains, and
    each step's weight decay follows the cosine 0.04 -> 0.4 on the decaying groups."""
    from pipeline.schedules import cosine

    steps = head_checks[0]["dino"][engine]
    wds = cosine(4, 0.04, 0.4)
    assert [s["last_layer"] for s in steps] == [False, False, True, True]
    assert all(s["rest"] > 0 for s in steps)
    for i, s in enumerate(steps):
        lrs, decays = zip(*s["groups"])
        assert sorted(decays) == pytest.approx([0.0, wds[i], wds[i]]), (i, decays)
        assert lrs[-1] == 0.0 if i < 2 else lrs[-1] > 0.0, (i, lrs)


# -- DINOv2 and I-JEPA: masked student, EMA teacher sharded like the student --------------------------------

NEW_METHODS = {
    "dinov2": (QUICKSTART.with_name("dinov2.yaml"), "teacher_encoder",
               {"method.dinov2.ibot_out_dim": 96, "method.dinov2.ibot_hidden_dim": 64,
                "method.dinov2.ibot_bottleneck_dim": 32}),
    "ijepa": (QUICKSTART.with_name("ijepa.yaml"), "target_encoder",
              {"method.ijepa.predictor_dim": 16, "method.ijepa.predictor_depth": 1}),
}
TEACHER_ENGINES = {
    "ddp": ENGINES["ddp"], "fsdp": ENGINES["fsdp"], "zero3": ENGINES["zero3"],
    # nothing stays gathered: the position embedding and class/mask tokens the masked encoders read directly
    # (not through a submodule's forward) must still be gathered when they are used
    "zero3_all_partitioned": {"engine.name": "deepspeed", "engine.zero_stage": 3,
                              "engine.ds_config": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
}


def _teacher_steps(world: int) -> dict:
    """DINOv2 and I-JEPA under each engine, 3 optimizer steps on this rank's rows of a fixed batch, with the same
    masks under every engine (this rank's RNG seeded alike): this rank's losses, how it holds the student and the
    teacher, and (rank 0) the full student and teacher weights at the end."""
    import torch.distributed as dist

    rank = dist.get_rank()
    out = {}
    for name, (preset, teacher_name, extra) in NEW_METHODS.items():
        for engine, overrides in TEACHER_ENGINES.items():
            method, eng = _setup(preset, {"loader.batch_size": 16 // world, **extra, **overrides}, 3)
            torch.manual_seed(100 + rank)
            losses = []
            for step in range(3):
                loss, _ = eng.micro_step(Batch(_views(world)), sync=True, scale=1.0)
                eng.step()
                method.after_step(step, 3)
                losses.append(loss.item())
            state = eng.method_state_dict()
            out[name, engine] = {
                "losses": losses,
                "held": {"encoder": [_held_kind(p) for p in method.encoder.parameters()],
                         "teacher": [_held_kind(p) for p in getattr(method, teacher_name).parameters()]},
                "state": None if state is None else
                {k: v.float().clone() for k, v in state.items() if k.startswith(("encoder.", f"{teacher_name}."))},
            }
    return out


@pytest.fixture(scope="module")
def teacher_checks() -> list[dict]:
    if "teachers" not in _RESULTS:
        _RESULTS["teachers"] = run_ranks(_teacher_steps, 2)
    return _RESULTS["teachers"]


@pytest.mark.parametrize("engine", ["fsdp", "zero3", "zero3_all_partitioned"])
@pytest.mark.parametrize("name", list(NEW_METHODS))
def test_dinov2_and_ijepa_train_sharded_like_ddp(teacher_checks, name, engine):
    """On 2 ranks, FSDP2 and ZeRO-3 (also with every parameter partitioned) give DDP's losses over 3 steps on every
    rank and DDP's student and EMA teacher weights at the end; the teacher is held exactly like the student
    (FSDP2: Shard(0) DTensors; ZeRO-3: partitions), so its EMA update is local; and it is an EMA, not a copy."""
    teacher = NEW_METHODS[name][1]
    ref = [r[name, "ddp"] for r in teacher_checks]
    got = [r[name, engine] for r in teacher_checks]
    for r, g in zip(ref, got):
        torch.testing.assert_close(torch.tensor(g["losses"]), torch.tensor(r["losses"]), rtol=RTOL, atol=ATOL)
    want, have = ref[0]["state"], got[0]["state"]
    assert have.keys() == want.keys() and any(k.startswith(f"{teacher}.") for k in have)
    for k in want:
        torch.testing.assert_close(have[k], want[k], rtol=RTOL, atol=ATOL, msg=k)
    held = got[0]["held"]
    assert held["teacher"] == held["encoder"]
    assert {k for k, _, _ in held["teacher"]} == {TEACHER_ENGINE_KIND[engine.split("_")[0]]}
    moved = [k for k in want if k.startswith(f"{teacher}.") and not torch.equal(want[k], want[k.replace(teacher, "encoder", 1)])]
    assert moved, "the teacher is still a copy of the student"


# -- FSDP2: a 2-rank checkpoint on 1 rank -------------------------------------------------------------------

def _fsdp_on_one_rank(shards, run: Path, copy_dir: Path, ports: list[int]) -> dict:
    import torch.distributed as dist

    def one_rank_group(port):  # train() and init_distributed() make no group for one process: FSDP2 needs one
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)

    cfg = _config(shards, run, "fsdp", **{"method.name": "simclr_ema_test"})
    one_rank_group(ports[0])
    got = _inspect(cfg, run / "checkpoints" / "step_00000003", ports[1])  # destroys the group
    shutil.copytree(run, copy_dir, symlinks=True)
    ckpts = copy_dir / "checkpoints"
    shutil.rmtree(ckpts / "step_00000006")
    (ckpts / "latest").unlink()
    (ckpts / "latest").symlink_to("step_00000003")
    one_rank_group(ports[2])
    try:
        got["summary"] = _train(_config(shards, copy_dir, "fsdp", **{"method.name": "simclr_ema_test"}), ports[3])
    finally:
        dist.destroy_process_group()
    got["losses"] = _losses(copy_dir)
    return _portable(got)


def test_fsdp_two_rank_checkpoint_resumes_on_one_rank(scenario, fmnist_shards, tmp_path):
    from pipeline.engines.fsdp import FSDPEngine
    from pipeline.methods import build_method

    run = Path(scenario("fsdp")["ema"]["run"])
    got = _tensors(run_ranks(_fsdp_on_one_rank, fmnist_shards, run, tmp_path / "one_rank", [free_port() for _ in range(4)],
                    world_size=1, init_pg=False)[0])
    cfg = _config(fmnist_shards, run, "fsdp", **{"method.name": "simclr_ema_test"})
    written = FSDPEngine.read_model_state(run / "checkpoints" / "step_00000003", build_method(cfg))
    _assert_state_close(got["state"], written, "2-rank checkpoint loaded on 1 rank")
    assert all(k == "dtensor('S(0)',)" and local == math.prod(shape) for k, shape, local in got["held"]["teacher"])
    assert got["summary"]["steps"] == 6 and got["summary"]["world_size"] == 1
    assert all(torch.isfinite(torch.tensor(got["losses"][s])) for s in (4, 5, 6))


# -- DeepSpeed bf16: fp32 teachers, fp32 exports -------------------------------------------------------------

def _deepspeed_bf16(shards, root: Path, ports: list[int]) -> dict:
    out = {}
    for i, engine in enumerate(("zero2", "zero3")):
        cfg = _config(shards, root / engine, engine, **{"method.name": "simclr_ema_test", "engine.precision": "bf16",
                                                         "train.steps": 3})
        _train(cfg, ports[2 * i])
        out[engine] = {"run": str(root / engine),
                       "own": _inspect(cfg, root / engine / "checkpoints" / "latest", ports[2 * i + 1])}
    return _portable(out)


@pytest.fixture(scope="module")
def deepspeed_bf16(fmnist_shards, tmp_path_factory):
    return _tensors(run_ranks(_deepspeed_bf16, fmnist_shards, tmp_path_factory.mktemp("ds_bf16"),
                              [free_port() for _ in range(4)], init_pg=False)[0])


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_deepspeed_bf16_keeps_ema_teacher_in_fp32(deepspeed_bf16, engine):
    """DeepSpeed casts every parameter to bf16; a bf16 EMA teacher barely moves (most updates are below half an
    ulp), so the engine keeps frozen parameters in fp32: a teacher that moved holds values bf16 cannot."""
    from pipeline.engines.deepspeed import DeepSpeedEngine
    from pipeline.methods import build_method

    res = deepspeed_bf16[engine]
    assert res["own"]["teacher_dtypes"] == ["torch.float32"]  # after a resume too
    cfg = _config({"train": "", "test": ""}, Path(res["run"]), engine, **{"method.name": "simclr_ema_test"})
    saved = DeepSpeedEngine.read_model_state(Path(res["run"]) / "checkpoints" / "latest", build_method(cfg))
    teacher = torch.cat([v.flatten() for k, v in saved.items() if k.startswith("teacher.")])
    assert teacher.dtype == torch.float32
    assert (teacher != teacher.bfloat16().float()).float().mean() > 0.5
    # loaded into a fresh engine, the full state (teacher included) is what the checkpoint holds
    _assert_state_close(res["own"]["state"], saved, f"{engine} bf16: reloaded vs zero_to_fp32")


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_deepspeed_bf16_export_holds_the_fp32_master_weights(deepspeed_bf16, engine):
    from safetensors.torch import load_file

    from pipeline.engines.deepspeed import DeepSpeedEngine
    from pipeline.export import WEIGHTS
    from pipeline.methods import build_method

    run = Path(deepspeed_bf16[engine]["run"])
    cfg = _config({"train": "", "test": ""}, run, engine, **{"method.name": "simclr_ema_test"})
    masters = DeepSpeedEngine.read_model_state(run / "checkpoints" / "latest", build_method(cfg))
    exported = load_file(str(run / "export" / WEIGHTS))
    assert exported
    for k, v in exported.items():
        torch.testing.assert_close(v, masters[f"encoder.{k}"].float(), rtol=0, atol=0, msg=k)


# -- EMA teachers are sharded block by block ---------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_frozen_transformer_block_is_a_sharding_unit(name):
    """A teacher left out of ``teacher_blocks`` still trains correctly, but FSDP2 then gathers it whole with the
    root unit and keeps it gathered until backward ends (the root does not reshard after forward)."""
    from timm.models.vision_transformer import Block

    from pipeline.config import load_config
    from pipeline.methods import build_method

    own = QUICKSTART.parent / f"{name}.yaml"  # a method's own preset where its views need one (pretext tasks)
    cfg = load_config(own if own.exists() else QUICKSTART,
                      [f"method.name={name}", "model.depth=2", "model.embed_dim=32", "model.num_heads=2"])
    method = build_method(cfg)
    frozen = [m for m in method.modules() if isinstance(m, Block) and not any(p.requires_grad for p in m.parameters())]
    units = {id(u) for u in method.shard_units()}
    assert all(id(b) in units for b in frozen)
    assert {id(b) for b in method.teacher_blocks()} == {id(b) for b in frozen}
    if name in ("byol", "mocov3", "dino", "simclr_ema_test"):  # the EMA methods: a whole teacher encoder
        assert len(frozen) == len(method.encoder.blocks) == 2


# -- configuration ------------------------------------------------------------------------------------------

def test_ds_config_follows_the_config_tree():
    from pipeline.config import load_config
    from pipeline.engines.deepspeed import ds_config

    cfg = load_config(QUICKSTART, ["engine.name=deepspeed", "engine.zero_stage=3", "optim.accumulation_steps=4",
                                   "optim.clip_grad_norm=0", "loader.batch_size=16",
                                   "engine.ds_config={zero_optimization: {stage3_param_persistence_threshold: 0}}"])
    c = ds_config(cfg, world_size=2, bf16=False)
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"], c["train_batch_size"]) == (16, 4, 128)
    assert c["gradient_clipping"] == 0.0  # explicit: DeepSpeed's own default clips at 1.0
    assert c["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    assert c["bf16"]["enabled"] is False
    c = ds_config(load_config(QUICKSTART, ["engine.name=deepspeed", "engine.offload=optimizer"]), 2, bf16=True)
    assert c["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and c["bf16"]["enabled"]
    assert c["communication_data_type"] == "fp32"


def test_engine_config_is_validated():
    from pipeline.config import ConfigError, load_config
    from pipeline.engines import engine_class

    for bad in (["engine.zero_stage=0"], ["engine.reduce_dtype=fp16"], ["engine.offload=disk"],
                ["engine.name=deepspeed", "engine.zero_stage=2", "engine.offload=params"]):
        with pytest.raises(ConfigError):
            load_config(QUICKSTART, bad)
    assert [engine_class(n).name for n in ("ddp", "fsdp", "deepspeed")] == ["ddp", "fsdp", "deepspeed"]
    with pytest.raises(KeyError, match="known: ddp, fsdp, deepspeed"):
        engine_class("horovod")


# -- GPU-only paths -----------------------------------------------------------------------------------------

def _bf16_steps(engine: str, extra: dict, shards, run_dir: Path) -> list[float]:
    cfg = _config(shards, run_dir, engine, **{"engine.precision": "bf16", "loader.device": "cuda", **extra})
    _train(cfg, free_port())
    return list(_losses(run_dir).values())


@pytest.mark.gpu
@pytest.mark.parametrize("engine,extra", [
    ("fsdp", {}), ("fsdp", {"engine.compile": True, "model.grad_checkpointing": True}),
    ("zero2", {}), ("zero3", {}), ("zero2", {"engine.offload": "optimizer"}),
])
def test_bf16_compile_offload_on_gpu(fmnist_shards, tmp_path, engine, extra):
    import os

    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1"})
    losses = _bf16_steps(engine, extra, fmnist_shards, tmp_path / "run")
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
