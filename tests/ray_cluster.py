"""A real two-node Ray cluster on loopback, for tests.

Ray rewrites ``127.0.0.1`` and ``localhost`` to the machine's routable address (see STACK.md), so a cluster started
in the machine's own network namespace talks over the public interface. Here every Ray process, and the driver, run
inside a fresh network namespace that holds nothing but ``lo``: there is no other address to rewrite to and no route
off the machine. The head listens on 127.0.0.1, a second node on 127.0.0.2 (any 127/8 address works on ``lo``).

Each node is one ``ray start --block`` process in its own session; stopping sends SIGTERM to that process (Ray then
stops the raylet, GCS and workers it started) and SIGKILLs whatever is left in the sessions we created. Nothing is
looked up by process name, so Ray clusters of other users of the machine are never touched.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HEAD_IP = "127.0.0.1"
WORKER_IP = "127.0.0.2"
GCS_PORT = 6379

# Keep Ray quiet and local: no usage-stats upload (the only thing Ray would send off the machine by itself).
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    "PYTHONUNBUFFERED": "1",
}


def _ray_bin() -> str:
    """The ``ray`` CLI of the interpreter running the tests (the venv's, not one on PATH)."""
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else "ray"


def can_make_netns() -> tuple[bool, str]:
    """Whether this process may create network namespaces (root, or an unprivileged-userns-enabled kernel)."""
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return False, f"{tool} not found"
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "netns"
        probe.touch()
        made = subprocess.run(["unshare", f"--net={probe}", "true"], capture_output=True, text=True, check=False)
        if made.returncode != 0:
            return False, f"unshare --net failed: {made.stderr.strip()}"
        subprocess.run(["umount", str(probe)], capture_output=True, check=False)
    return True, ""


class NetNS:
    """A persistent, loopback-only network namespace bound to a file (no ``ip netns`` state in /run)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch()
        subprocess.run(["unshare", f"--net={path}", "true"], check=True)
        subprocess.run(self.wrap(["ip", "link", "set", "lo", "up"]), check=True)

    def wrap(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net={self.path}", *argv]

    def interfaces(self) -> list[str]:
        out = subprocess.run(self.wrap(["ip", "-o", "link", "show"]), capture_output=True, text=True, check=True)
        return [line.split(":")[1].strip().split("@")[0] for line in out.stdout.splitlines()]

    def close(self) -> None:
        # The namespace lives as long as the bind mount (or a process inside it) does.
        subprocess.run(["umount", str(self.path)], capture_output=True, check=False)


def _session_members(sid: int) -> list[int]:
    """PIDs of processes whose session id is ``sid`` (the ``ray start`` we launched with its own session)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state ppid pgrp session ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":  # a zombie is dead already; its parent or init reaps it
            pids.append(int(entry))
    return pids


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True  # gone


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (through /proc/<pid>/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        children: list[int] = []
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        found += children
        todo += children
    return [p for p in found if not _is_zombie(p)]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class RayNode:
    ip: str
    proc: subprocess.Popen
    log: Path

    def alive_pids(self) -> list[int]:
        """The ``ray start`` process and everything it started (same session, or descendants)."""
        pids = set(_session_members(self.proc.pid)) | set(descendants(self.proc.pid))
        if self.proc.poll() is None:
            pids.add(self.proc.pid)
        return sorted(pids)


@dataclass
class RayCluster:
    """Head on 127.0.0.1 and ``len(nodes) - 1`` worker nodes on 127.0.0.2.., all inside ``netns``."""

    netns: NetNS
    temp_dir: Path
    nodes: list[RayNode] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{GCS_PORT}"

    auth_token: str = field(default_factory=lambda: secrets.token_hex(32))

    @property
    def env(self) -> dict[str, str]:
        """Environment of every node and driver: token auth with a token of this cluster only. Left to itself Ray
        turns token auth on or off depending on whether ~/.ray/auth_token exists (a local ``ray.init`` writes one),
        and a head and a worker node that disagree cannot talk."""
        return {**os.environ, **RAY_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.auth_token}

    def start_node(self, ip: str, num_cpus: int, head: bool, timeout_s: float = 60) -> RayNode:
        log = self.temp_dir / f"ray-start-{ip}.log"
        argv = [_ray_bin(), "start", "--block", "--node-ip-address", ip, f"--num-cpus={num_cpus}", "--num-gpus=0"]
        argv += ["--disable-usage-stats", "--object-store-memory", str(200 * 1024**2)]
        if head:
            argv += ["--head", f"--port={GCS_PORT}", f"--temp-dir={self.temp_dir}"]
            argv += ["--include-dashboard=false", f"--dashboard-host={HEAD_IP}"]
        else:
            argv += [f"--address={self.address}"]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                self.netns.wrap(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, start_new_session=True,
            )
        node = RayNode(ip=ip, proc=proc, log=log)
        self.nodes.append(node)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if "Ray runtime started" in text:
                return node
            if proc.poll() is not None:
                raise RuntimeError(f"ray start on {ip} exited with {proc.returncode}:\n{text[-4000:]}")
            time.sleep(0.3)
        raise TimeoutError(f"ray start on {ip} did not come up in {timeout_s:.0f}s:\n{log.read_text()[-4000:]}")

    def python(self, code: str, *, timeout_s: float = 300, cwd: str | Path | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a Python driver inside the namespace (where the cluster is reachable)."""
        return subprocess.run(
            self.netns.wrap([sys.executable, "-c", code]), capture_output=True, text=True, timeout=timeout_s,
            cwd=cwd, env={**self.env, **(env or {})}, check=False,
        )

    def popen_python(self, code: str, log: Path, *, cwd: str | Path | None = None,
                     env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(log, "wb") as out:
            return subprocess.Popen(
                self.netns.wrap([sys.executable, "-c", code]), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=cwd, env={**self.env, **(env or {})}, start_new_session=True,
            )

    def all_pids(self) -> list[int]:
        return sorted({pid for node in self.nodes for pid in node.alive_pids()})

    def stop(self, grace_s: float = 5) -> None:
        """SIGTERM each ``ray start --block`` (workers first), then SIGKILL whatever of ours is left."""
        for node in reversed(self.nodes):
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for node in reversed(self.nodes):
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        # Worker processes notice their raylet is gone within a second or two; then kill the leftovers by PID.
        leftovers_deadline = time.monotonic() + 3
        while time.monotonic() < leftovers_deadline and self.all_pids():
            time.sleep(0.2)
        for pid in self.all_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for node in self.nodes:
            if node.proc.poll() is None:
                node.proc.kill()
                node.proc.wait()
        deadline = time.monotonic() + 10
        while self.all_pids() and time.monotonic() < deadline:
            time.sleep(0.2)


def start_cluster(root: Path, *, worker_nodes: int = 1, cpus_per_node: int = 1) -> RayCluster:
    """Namespace file under ``root`` (a fresh folder), head + worker nodes; Ray's temp dir is a fresh short folder
    in /tmp, removed by :func:`stop_cluster`."""
    # Ray puts socket paths under the temp dir; AF_UNIX paths are limited to 107 bytes, so keep it short.
    temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    netns = NetNS(root / "netns")
    cluster = RayCluster(netns=netns, temp_dir=temp_dir)
    try:
        cluster.start_node(HEAD_IP, cpus_per_node, head=True)
        for i in range(worker_nodes):
            cluster.start_node(f"127.0.0.{2 + i}", cpus_per_node, head=False)
    except BaseException:
        cluster.stop()
        netns.close()
        raise
    return cluster


def stop_cluster(cluster: RayCluster) -> None:
    cluster.stop()
    cluster.netns.close()
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)
