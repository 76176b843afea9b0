"""Resuming a run directory never runs code from it (issue #17), on 2 real gloo ranks.

A run is trained to a checkpoint; copies of its run directory then each get one file that resume reads replaced by
a pickle whose ``__reduce__`` would create a marker file (``rng_rank1.pt``, DCP's ``.metadata`` and a data file
whose non-tensor entry DCP unpickles, ``engine.pt``; every DeepSpeed file of a ZeRO-3 checkpoint). Resuming each
copy must fail on every rank with an error naming the planted file, and no marker may ever appear; so must the
offline export (``read_model_state``). The planted files are checked to be live: a plain ``torch.load`` of them
does create a marker.

Also: RNG files written before the weights-only format still resume, and give the same losses; what a rank saves
is refused at the save if a weights-only load could not read it back; no file of a finished run directory is
group- or world-writable even under umask 000.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shlex
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from multirank import free_port, run_ranks

from pipeline.checkpoint import NUMPY_STATE_GLOBALS, UntrustedFileError, load_trusted, set_rng_state

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
STEP = "step_00000003"
ENGINES = {
    "ddp": {"engine.name": "ddp"},
    "zero3": {"engine.name": "deepspeed", "engine.zero_stage": 3},
}


class Plant:
    """Unpickled by plain pickle, this runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _config(shards, run_dir: Path, engine: str, **extra):
    from pipeline.config import load_config

    overrides = {**ENGINES[engine], "loader.num_workers": 0, "metrics.log_every": 1, **extra}
    return load_config(QUICKSTART, tiny_overrides(shards, run_dir, **overrides))


def _train(cfg, port: int):
    from pipeline.trainer import train

    os.environ["MASTER_PORT"] = str(port)  # a fresh rendezvous per run in this process
    return train(cfg)


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _train_to_checkpoint(engine: str, shards, run_dir: Path, port: int) -> None:
    _train(_config(shards, run_dir, engine, **{"train.stop_at_step": 3}), port)


def _resume_each(engine: str, shards, runs: list[Path], ports: list[int]) -> dict[str, str]:
    """On each rank: resume every run directory in ``runs``; what each raised (or ``finished``)."""
    out = {}
    for run, port in zip(runs, ports):
        try:
            summary = _train(_config(shards, run, engine), port)
            out[run.name] = f"finished at step {summary['steps']}"
        except UntrustedFileError as exc:
            out[run.name] = f"UntrustedFileError: {exc}"
        except Exception as exc:  # noqa: BLE001 (any other error fails the test with its message)
            out[run.name] = f"{type(exc).__name__}: {exc}"
    return out


def _plant_torch_file(path: Path, marker: Path, allow: list) -> None:
    """Keep the file's own content (a believable file) and add the plant to it."""
    content = load_trusted(path, allow, map_location="cpu")
    torch.save({"content": content, "extra": Plant(marker)}, path)


def _plant_dcp_entry(dcp_dir: Path, marker: Path) -> Path:
    """Rewrite the DCP folder with one non-tensor entry (an optimizer hyper-parameter, which DCP unpickles with
    ``weights_only=False``) replaced by the plant. Returns the data file that holds it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = dcp_dir.parent / "flat.pt"
    dcp_to_torch_save(dcp_dir, flat)  # the test's own clean file
    state = torch.load(flat, weights_only=False)
    flat.unlink()
    state["optim"]["param_groups"][0]["lr"] = Plant(marker)
    shutil.rmtree(dcp_dir)
    dcp.save(state, checkpoint_id=str(dcp_dir), no_dist=True)
    return dcp_dir / "__0_0.distcp"


def _plant_each(engine: str, base: Path, root: Path) -> dict[str, tuple[Path, Path]]:
    """Copies of ``base``, each with one planted file: name -> (run dir, planted file)."""
    from pipeline.engines.deepspeed import checkpoint_globals

    ckpt = Path("checkpoints") / STEP
    targets = [ckpt / "rng_rank1.pt"]
    if engine == "ddp":
        targets += [ckpt / "engine.pt", ckpt / "dcp" / ".metadata", ckpt / "dcp" / "__0_0.distcp"]
    else:
        targets += sorted(p.relative_to(base) for p in (base / ckpt / "ds").glob("*.pt"))
    planted = {}
    (root / "markers").mkdir()
    for i, rel in enumerate(targets):
        run = root / f"planted{i}"
        shutil.copytree(base, run, symlinks=True)
        marker = root / "markers" / f"planted{i}"
        path = run / rel
        if rel.name == ".metadata":
            path.write_bytes(pickle.dumps(Plant(marker)))
        elif rel.suffix == ".distcp":
            path = _plant_dcp_entry(path.parent, marker)
        else:
            _plant_torch_file(path, marker, [*NUMPY_STATE_GLOBALS, *checkpoint_globals()])
        planted[run.name] = (run, path)
    return planted


def _old_format_copy(base: Path, run: Path) -> None:
    """``base`` with its RNG files rewritten as the code before the weights-only format wrote them (numpy's legacy
    state as a tuple holding an ndarray, which plain pickle stores as numpy objects)."""
    shutil.copytree(base, run, symlinks=True)
    for f in (run / "checkpoints" / STEP).glob("rng_rank*.pt"):
        state = load_trusted(f)
        np_state = state["numpy"]
        state["numpy"] = (np_state["bit_generator"], np.asarray(np_state["state"]["key"], dtype=np.uint32),
                          np_state["state"]["pos"], np_state["has_gauss"], np_state["gauss"])
        torch.save(state, f)
        assert torch.serialization.get_unsafe_globals_in_checkpoint(f), "the old format pickles numpy objects"


_RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def planted(fmnist_shards, tmp_path_factory):
    def get(engine: str) -> dict:
        if engine not in _RESULTS:
            root = tmp_path_factory.mktemp(f"planted_{engine}")
            base = root / "base"
            umask = os.umask(0)  # the ranks inherit it: the run must not rely on a sane umask
            try:
                run_ranks(_train_to_checkpoint, engine, fmnist_shards, base, free_port(), init_pg=False)
                planted = _plant_each(engine, base, root)
                runs = [run for run, _ in planted.values()]
                if engine == "ddp":  # old RNG files still resume, to the same losses as the current format
                    _old_format_copy(base, root / "old_format")
                    shutil.copytree(base, root / "current_format", symlinks=True)
                    runs += [root / "old_format", root / "current_format"]
                outcomes = run_ranks(_resume_each, engine, fmnist_shards, runs, [free_port() for _ in runs],
                                     init_pg=False, timeout=900)
            finally:
                os.umask(umask)
            _RESULTS[engine] = {"root": root, "base": base, "planted": planted, "outcomes": outcomes}
        return _RESULTS[engine]

    return get


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("engine", list(ENGINES))
def test_planted_pickle_is_refused_on_every_rank_and_never_runs(planted, engine, tmp_path):
    res = planted(engine)
    markers = res["root"] / "markers"
    assert not any(markers.iterdir()), f"planted code ran: {list(markers.iterdir())}"
    for name, (run, path) in res["planted"].items():
        for rank, outcome in enumerate(res["outcomes"]):
            assert outcome[name].startswith("UntrustedFileError"), (name, path, rank, outcome[name])
            assert str(path.resolve()) in outcome[name], f"rank {rank}: the error does not name {path}: {outcome[name]}"
            assert "Resume only run directories that you or your own jobs wrote" in outcome[name]
    # The plants are live: plain unpickling runs them.
    _, path = next(iter(res["planted"].values()))
    torch.load(path, weights_only=False)
    assert (markers / "planted0").exists()


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("engine", list(ENGINES))
def test_export_of_a_planted_checkpoint_is_refused(planted, engine, fmnist_shards):
    from pipeline.engines import engine_class
    from pipeline.methods import build_method

    res = planted(engine)
    for run, path in res["planted"].values():
        if path.name.startswith("rng_") or path.suffix == ".distcp" or path.name == "engine.pt":
            continue  # the export reads the model's state only (the .distcp plant is an optimizer entry)
        cfg = _config(fmnist_shards, run, engine)
        with pytest.raises(UntrustedFileError) as err:
            engine_class(cfg.engine.name).read_model_state(run / "checkpoints" / STEP, build_method(cfg))
        assert str(path.resolve()) in str(err.value)
    leaked = [m for m in (res["root"] / "markers").iterdir() if m.name != "planted0"]  # planted0: the liveness check
    assert not leaked, f"planted code ran: {leaked}"


@pytest.mark.slow
@pytest.mark.multirank
def test_rng_files_of_the_old_format_still_resume_exactly(planted):
    res = planted("ddp")
    for outcome in res["outcomes"]:
        assert outcome["old_format"] == outcome["current_format"] == "finished at step 6", outcome
    old, current = _losses(res["root"] / "old_format"), _losses(res["root"] / "current_format")
    assert [old[s] for s in range(4, 7)] == [current[s] for s in range(4, 7)]  # bit for bit


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("engine", list(ENGINES))
def test_nothing_in_a_run_directory_is_group_or_world_writable(planted, engine):
    res = planted(engine)
    runs = [res["base"]] + ([res["root"] / "current_format"] if engine == "ddp" else [])
    for run in runs:
        assert (run / "export").is_dir() or run == res["base"]
        for p in [run, *run.rglob("*")]:
            mode = p.lstat().st_mode
            if stat.S_ISLNK(mode):
                continue  # a symlink's own mode is always 777 and never consulted
            assert not mode & (stat.S_IWGRP | stat.S_IWOTH), f"{p} is writable by others: {stat.filemode(mode)}"


def test_legacy_numpy_state_is_read_through_the_allow_list_only(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    legacy = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
              "rank": {"loader": {"epoch": 0, "batch": 3, "dali": b"\x00\n\x1bproto"}}}
    expected = (random.random(), np.random.rand(), torch.rand(1))
    f = tmp_path / "rng_rank0.pt"
    torch.save(legacy, f)
    with pytest.raises(UntrustedFileError, match="rng_rank0.pt"):
        load_trusted(f)  # numpy objects are not allowed by default ...
    saved = load_trusted(f, NUMPY_STATE_GLOBALS)  # ... only through the allow-list
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(saved)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])
    assert saved["rank"]["loader"]["dali"] == b"\x00\n\x1bproto"


def test_a_rank_state_that_weights_only_cannot_read_is_refused_at_save(tmp_path):
    from pipeline.checkpoint import CheckpointManager, rng_state
    from pipeline.distributed import DistEnv

    class NoEngine:
        def save(self, path):
            pass

    manager = CheckpointManager(tmp_path, DistEnv())
    with pytest.raises(TypeError, match="rng_rank0.pt.*refuses"):
        manager.save(1, NoEngine(), {}, {"loader": {"pos": np.int64(3)}})
    assert manager.latest() is None
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["numpy"]["bit_generator"] == "MT19937"  # no allow-list needed


def test_slurm_result_pickle_is_read_without_running_what_it_names(tmp_path):
    pytest.importorskip("submitit")
    from types import SimpleNamespace

    from launchers.slurm import _read_outcome

    result = tmp_path / "1_0_result.pkl"
    job = SimpleNamespace(paths=SimpleNamespace(result_pickle=result))
    result.write_bytes(pickle.dumps(("success", {"steps": 6, "loss": np.float64(1.5), "run": Plant(tmp_path / "m")})))
    status, summary = _read_outcome(job)
    assert status == "success" and summary["steps"] == 6
    result.write_bytes(pickle.dumps(("error", "Traceback (most recent call last): ...")))
    assert _read_outcome(job) == ("error", "Traceback (most recent call last): ...")
    assert not (tmp_path / "m").exists()
