"""Ray Train launcher against a real two-node Ray cluster on loopback (see tests/ray_cluster.py).

Each test starts its own cluster in its own network namespace, with a fresh Ray temp dir, and stops it by the PIDs it
started. A tiny SimCLR ViT on synthetic data keeps each run to well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import Config, load_config, save_config

pytest.importorskip("ray.train")

from launchers.ray import launch_ray
from tests.ray_cluster import RayCluster, can_make_netns, cmdline, start_cluster, stop_cluster

REPO = Path(__file__).resolve().parent.parent

TINY_SIMCLR = [
    "launcher.name=ray",
    "method.name=simclr",
    "method.proj_hidden_dim=64",
    "method.proj_dim=32",
    "model.name=vit_tiny_patch16_224",
    "model.img_size=32",
    "model.patch_size=8",
    "model.embed_dim=64",
    "model.depth=2",
    "model.num_heads=2",
    "augment.image_size=32",
    "loader.backend=synthetic",
    "loader.batch_size=8",
    "loader.num_workers=0",
    "engine.name=ddp",
    "engine.backend=gloo",
    "engine.precision=fp32",
    "optim.warmup_steps=2",
    "eval.at_end=false",
    "metrics.progress=false",
    "metrics.tensorboard=false",
    "train.threads=1",
]


def _netns_or_skip() -> None:
    ok, why = can_make_netns()
    if not ok:
        pytest.skip(f"cannot make a loopback-only network namespace here ({why})")


@pytest.fixture
def cluster(tmp_path):
    _netns_or_skip()
    c = start_cluster(tmp_path, worker_nodes=1, cpus_per_node=1)
    try:
        yield c
    finally:
        stop_cluster(c)
        assert not c.all_pids(), "Ray processes outlived the test"


def _config(tmp_path: Path, *overrides: str) -> Config:
    return load_config(None, [*TINY_SIMCLR, f"run.output_dir={tmp_path}", "run.name=ray", *overrides])


def _cluster_config(cluster: RayCluster, tmp_path: Path, *overrides: str) -> Config:
    return _config(tmp_path, f"launcher.ray.address={cluster.address}", *overrides)


def _start_driver(cluster: RayCluster, cfg: Config, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """The driver runs inside the namespace too: ``python -m launchers.ray CONFIG`` against the test cluster."""
    config_path = tmp_path / "driver.yaml"
    save_config(cfg, config_path)
    log = tmp_path / "driver.log"
    code = f"import sys; from launchers.ray import main; sys.exit(main([{str(config_path)!r}]))"
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    return cluster.popen_python(code, log, cwd=REPO, env=env), log


def _wait(proc: subprocess.Popen, log: Path, timeout_s: float) -> str:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"driver did not finish in {timeout_s:.0f}s:\n{log.read_text()[-6000:]}")
    return log.read_text(errors="replace")


def _ray_events(cfg: Config) -> list[dict]:
    path = Path(cfg.run.dir).resolve() / "ray" / "metrics.jsonl"
    assert path.is_file(), f"no Ray metrics log at {path}"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _reported_steps(events: list[dict]) -> list[int]:
    return [int(e["metrics"]["step"]) for e in events if e["event"] == "report"]


def _assert_loopback_only(cluster: RayCluster, driver_log: str) -> None:
    # The namespace has no interface but lo, so nothing Ray sends can leave the machine...
    assert cluster.netns.interfaces() == ["lo"]
    # ...and Ray itself advertises only loopback addresses for its nodes and worker placement.
    match = re.search(r"Ray cluster nodes: (.+)", driver_log)
    assert match, driver_log[-3000:]
    nodes = [n.strip() for n in match.group(1).split(",")]
    assert sorted(nodes) == ["127.0.0.1", "127.0.0.2"], nodes
    for ip in re.findall(r"ip=([0-9.]+)", driver_log):
        assert ipaddress.ip_address(ip).is_loopback, ip
    # Every TCP connection open in the namespace right now is between loopback addresses.
    out = subprocess.run(cluster.netns.wrap(["ss", "-tnH"]), capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        for endpoint in line.split()[3:5]:
            host = endpoint.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
            assert ipaddress.ip_address(host).is_loopback, line


@pytest.mark.ray
def test_two_workers_on_two_nodes_complete(cluster, tmp_path):
    cfg = _cluster_config(cluster, tmp_path, "train.steps=6", "metrics.log_every=2", "checkpoint.every_steps=3",
                  "launcher.ray.num_workers=2", "launcher.ray.max_failures=0")
    proc, log = _start_driver(cluster, cfg, tmp_path)
    text = _wait(proc, log, timeout_s=240)
    assert proc.returncode == 0, text[-6000:]

    run_dir = Path(cfg.run.dir)
    assert (run_dir / "checkpoints" / "latest").exists(), sorted(p.name for p in run_dir.rglob("*"))
    trainer_metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in trainer_metrics] == [2, 4, 6]
    events = _ray_events(cfg)
    assert _reported_steps(events) == [2, 4, 6]
    assert all(e["world_size"] == 2 for e in events if e["event"] == "report")
    assert not [e for e in events if e["event"] == "worker_failure"]
    # One worker on each node: Ray Train's own placement log shows both node ranks.
    assert "node_rank=0" in text and "node_rank=1" in text, text[-6000:]
    _assert_loopback_only(cluster, text)


def _train_worker_on(node) -> int:
    """The one Ray Train worker process on ``node`` (a Ray actor; found among that node's processes only)."""
    victims = [pid for pid in node.alive_pids() if "RayTrainWorker" in cmdline(pid)]
    assert len(victims) == 1, [(p, cmdline(p)[:60]) for p in node.alive_pids()]
    return victims[0]


@pytest.mark.ray
def test_killed_worker_restarts_from_latest_checkpoint(cluster, tmp_path):
    """SIGKILL the worker on the second node after the first checkpoint: Ray restarts the group, which resumes from
    that checkpoint and trains on. The run has a million steps, so neither kill can come after its end however fast
    the machine is; a second kill ends it, past ``max_failures=1``, as a failed run."""
    cfg = _cluster_config(cluster, tmp_path, "train.steps=1000000", "metrics.log_every=2", "checkpoint.every_steps=4",
                  "launcher.ray.num_workers=2", "launcher.ray.max_failures=1")
    proc, log = _start_driver(cluster, cfg, tmp_path)
    latest = Path(cfg.run.dir) / "checkpoints" / "latest"
    events_log = Path(cfg.run.dir).resolve() / "ray" / "metrics.jsonl"

    def wait_for(what: str, done) -> None:
        deadline = time.monotonic() + 300  # a ceiling for a broken run only
        while not done():
            assert proc.poll() is None, f"driver exited before {what}:\n{log.read_text()[-6000:]}"
            assert time.monotonic() < deadline, f"no {what} after 300s:\n{log.read_text()[-6000:]}"
            time.sleep(0.2)

    wait_for("the first checkpoint", latest.exists)
    # The newest step any complete checkpoint can hold when we kill: everything reported so far.
    reported_before_kill = _reported_steps(_ray_events(cfg)) if events_log.exists() else []
    os.kill(_train_worker_on(cluster.nodes[1]), signal.SIGKILL)

    def reported_after_failure() -> bool:
        events = _ray_events(cfg)
        failed = [i for i, e in enumerate(events) if e["event"] == "worker_failure"]
        return bool(failed and _reported_steps(events[failed[0] + 1:]))

    wait_for("a report from the restarted workers", reported_after_failure)
    os.kill(_train_worker_on(cluster.nodes[1]), signal.SIGKILL)  # past max_failures: the run fails and ends

    text = _wait(proc, log, timeout_s=300)
    assert proc.returncode == 1 and "Ray Train run failed" in text, text[-6000:]
    events = _ray_events(cfg)
    failures = [i for i, e in enumerate(events) if e["event"] == "worker_failure"]
    assert len(failures) == 2, events
    before = _reported_steps(events[: failures[0]])
    after = _reported_steps(events[failures[0] + 1 : failures[1]])
    # Resumed, not restarted: a checkpoint existed at the kill, so the first step reported after the failure lies
    # past it (a fresh start would report step log_every first), and it is the first log step after a checkpoint
    # boundary. Reports in flight when the worker died may never reach the controller, so `before` can stop short.
    assert after and after[0] > cfg.checkpoint.every_steps, (before, after)
    assert (after[0] - cfg.metrics.log_every) % cfg.checkpoint.every_steps == 0, (before, after)
    assert after == sorted(set(after)), after
    assert not reported_before_kill or before[: len(reported_before_kill)] == reported_before_kill
    _assert_loopback_only(cluster, text)


@pytest.mark.ray
def test_run_started_locally_resumes_on_ray(cluster, tmp_path):
    """One run directory, two launchers: 2 local processes stop at step 3 (``train.stop_at_step``: the schedule still
    spans all 8 steps), then 2 Ray Train workers on the two nodes resume that run from step 3 and finish it."""
    steps, stop_at = 8, 3
    common = (f"train.steps={steps}", "metrics.log_every=2", "checkpoint.every_steps=4")
    local = _config(tmp_path, *common, "launcher.name=local", "launcher.nprocs=2", f"train.stop_at_step={stop_at}")
    save_config(local, tmp_path / "local.yaml")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "launch", str(tmp_path / "local.yaml")], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run_dir = Path(local.run.dir)
    assert (run_dir / "checkpoints" / "latest").resolve().name == f"step_{stop_at:08d}"  # not a periodic one
    assert not (run_dir / "summary.json").exists()

    cfg = _cluster_config(cluster, tmp_path, *common, "launcher.ray.num_workers=2", "launcher.ray.max_failures=0")
    assert cfg.run.dir == local.run.dir and cfg.train.stop_at_step == 0
    driver, log = _start_driver(cluster, cfg, tmp_path)
    text = _wait(driver, log, timeout_s=300)
    assert driver.returncode == 0, text[-6000:]
    assert re.search(rf"resumed from \S+/step_{stop_at:08d} at step {stop_at}\b", text), text[-6000:]
    assert _reported_steps(_ray_events(cfg)) == [4, 6, 8]  # what Ray saw: only its own part
    # the trainer's one metrics log holds both parts: step 2 from the local processes, 4-8 from the Ray workers
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6, 8]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and summary["world_size"] == 2
    assert (run_dir / "checkpoints" / "latest").resolve().name == f"step_{steps:08d}"


@pytest.mark.ray
def test_expected_error_in_the_workers_is_one_line(cluster, tmp_path):
    """``checkpoint.resume=true`` on a run that has no checkpoint fails in every worker: ``pipeline launch`` ends with
    the lowest failing rank's message as one line, and what Ray itself logs of the failure is that message, not a
    traceback through our code."""
    cfg = _cluster_config(cluster, tmp_path, "train.steps=4", "checkpoint.resume=true", "launcher.ray.num_workers=2",
                          "launcher.ray.max_failures=0")
    config_path = tmp_path / "driver.yaml"
    save_config(cfg, config_path)
    log = tmp_path / "driver.log"
    code = f"import sys; from pipeline.cli import main; sys.exit(main(['launch', {str(config_path)!r}]))"
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    env["PIPELINE_DEBUG"] = ""
    text = _wait(cluster.popen_python(code, log, cwd=REPO, env=env), log, timeout_s=300)
    errors = [line for line in text.splitlines() if line.startswith("pipeline launch: error:")]
    assert len(errors) == 1 and re.search(r"error: rank [01]: checkpoint.resume=true but \S+ has no complete "
                                          r"checkpoint", errors[0]), text[-6000:]
    assert errors[0] == text.strip().splitlines()[-1], text[-6000:]
    # Ray logs what a worker raised (worker, controller, driver): only the message, not our code's traceback
    assert "trainer.py" not in text and "_resume_point" not in text, text[-6000:]


@pytest.mark.ray
@pytest.mark.slow
def test_local_cluster_stays_on_loopback(tmp_path):
    """``launcher.ray.address`` empty: the launcher starts its own single-node cluster, bound to 127.0.0.1."""
    _netns_or_skip()
    from tests.ray_cluster import RAY_ENV, NetNS

    netns = NetNS(tmp_path / "netns")
    temp_dir = Path(f"/tmp/rl{os.getpid()}")
    cfg = _config(tmp_path, "train.steps=2", "metrics.log_every=1", "checkpoint.every_steps=2",
                  "launcher.ray.num_workers=1", f"launcher.ray.temp_dir={temp_dir}", "launcher.ray.local_num_cpus=1")
    config_path = tmp_path / "driver.yaml"
    save_config(cfg, config_path)
    # An explicit token keeps Ray from writing (or reading) ~/.ray/auth_token.
    env = {**os.environ, **RAY_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    code = f"import sys; from launchers.ray import main; sys.exit(main([{str(config_path)!r}]))"
    proc = subprocess.Popen(netns.wrap([sys.executable, "-c", code]), cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # ray.shutdown() in the driver stops the local cluster; kill anything left in the driver's session.
        from tests.ray_cluster import _session_members

        for pid in _session_members(proc.pid):
            os.kill(pid, signal.SIGKILL)
        netns.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert proc.returncode == 0, out[-6000:]
    assert re.search(r"Ray cluster nodes: 127\.0\.0\.1\s*$", out, re.MULTILINE), out[-6000:]
    assert _reported_steps(_ray_events(cfg)) == [1, 2]


def test_dry_run_touches_nothing(tmp_path, capsys):
    cfg = _config(tmp_path, "launcher.ray.address=127.0.0.1:6379", "launcher.ray.max_failures=2")
    assert launch_ray(cfg, dry_run=True) == 0
    out = capsys.readouterr().out
    assert "127.0.0.1:6379" in out and "2 workers" in out and "max_failures=2" in out
    assert not Path(cfg.run.dir).exists()
