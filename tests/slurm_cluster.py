"""A throwaway two-node Slurm cluster on this machine, for tests.

One ``slurmctld`` and two ``slurmd`` (``-N n1``, ``-N n2``, each on its own port, both at 127.0.0.1) run as root
with their state, spool and logs under a temporary directory. No munge and no accounting: ``auth/none`` and
``cred/none`` (Slurm 22.05, Debian 12).

Name resolution: submitit hands the first node name of the allocation (``n1``) to torch as ``MASTER_ADDR``, so
``n1``/``n2`` must resolve wherever job processes run. Job processes are forked by ``slurmd``, so each daemon is
started in its own private mount namespace in which a private hosts file (a copy of the machine's plus
``127.0.0.1 n1 n2``) is bind-mounted over ``/etc/hosts``; the machine's ``/etc/hosts`` is never edited. The
submitting process (the test) only talks to ``slurmctld`` on 127.0.0.1 and never needs to resolve the node names.

Every daemon and every job process is stopped by PID in :meth:`SlurmCluster.stop`, which the fixture always runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NODES = ("n1", "n2")
PARTITION = "debug"
_APT_PACKAGES = ["slurmctld", "slurmd", "slurm-client"]


class ClusterUnavailable(RuntimeError):
    """This machine cannot host the test cluster (not root, Slurm not installable, no mount namespaces)."""


def ensure_slurm_installed() -> None:
    """Install Debian's Slurm packages when missing, or raise :class:`ClusterUnavailable` saying why."""
    if os.geteuid() != 0:
        raise ClusterUnavailable("the Slurm test cluster needs root (daemons, mount namespace, apt)")
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "srun", "unshare")):
        return
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable("Slurm is not installed and apt-get is not available to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *_APT_PACKAGES]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:  # stale package lists: refresh once and retry
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, check=False)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0 or not shutil.which("slurmctld"):
        raise ClusterUnavailable(f"could not install Slurm with apt-get: {proc.stderr.strip()[-500:]}")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class SlurmCluster:
    """Config, daemons and client environment of one test cluster rooted at ``root``."""

    def __init__(self, root: Path, cpus_per_node: int = 2, real_memory_mb: int = 4000) -> None:
        self.root = Path(root)
        self.cpus_per_node = cpus_per_node
        self.real_memory_mb = real_memory_mb
        self.conf = self.root / "slurm.conf"
        self.hosts = self.root / "hosts"
        self.log_dir = self.root / "log"
        self._daemons: list[subprocess.Popen] = []

    # -- configuration -------------------------------------------------------------------------------------------

    def write_config(self) -> None:
        for sub in ("state", "log", *(f"spool/{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        host = socket.gethostname()
        lines = [
            "ClusterName=pipetest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/none",
            "CredType=cred/none",
            # a requeued job may start again once its old credential expired: 10 s instead of 120 s
            "AuthInfo=cred_expire=10",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerParameters=sched_interval=2",
            "SlurmdParameters=config_overrides",
            "MailProg=/bin/true",
            "ReturnToService=2",
            # SIGTERM -> SIGKILL grace on cancel/requeue: room for one step + a checkpoint on a busy machine,
            # shorter than the default 30 s
            "KillWait=15",
            "InactiveLimit=0",
            "MinJobAge=600",
            "JobRequeue=1",
            # submitit derives torch's MASTER_PORT from the job id: clusters of concurrent test runs on one machine
            # would all start at job 1 and collide on that port (EADDRINUSE), so each starts at its own number
            f"FirstJobId={ctld_port}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool' / '%n'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.log_dir / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for name, port in zip(NODES, node_ports):
            lines.append(
                f"NodeName={name} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus_per_node} "
                f"RealMemory={self.real_memory_mb} State=UNKNOWN"
            )
        lines.append(f"PartitionName={PARTITION} Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        machine_hosts = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else ""
        self.hosts.write_text(machine_hosts.rstrip("\n") + f"\n127.0.0.1 {' '.join(NODES)}\n")

    # -- clients -------------------------------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm clients (sbatch, squeue, scontrol) talking to this cluster."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, env=self.env, check=check, timeout=timeout)

    def node_states(self) -> dict[str, str]:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
        return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)

    def job_state(self, job_id: str) -> str:
        """State of a job as squeue shows it ("" once it left the queue)."""
        out = self.run("squeue", "-h", "-j", str(job_id), "-o", "%T", check=False).stdout.strip()
        return out.splitlines()[0] if out else ""

    def job_restart_count(self, job_id: str) -> int:
        out = self.run("scontrol", "show", "job", str(job_id), check=False).stdout
        for token in out.split():
            if token.startswith("Restarts="):
                return int(token.split("=", 1)[1])
        return 0

    def logs(self, tail: int = 40) -> str:
        parts = []
        for log in sorted(self.log_dir.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"==> {log.name} <==\n" + "\n".join(lines))
        return "\n".join(parts)

    # -- daemons -------------------------------------------------------------------------------------------------

    def _spawn(self, *argv: str) -> None:
        # unshare/sh exec into the daemon, so the Popen pid is the daemon's pid
        script = 'mount --bind "$0" /etc/hosts && exec "$@"'
        cmd = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, str(self.hosts), *argv]
        env = dict(self.env, SLURM_TEST_CLUSTER=str(self.root))
        with open(self.log_dir / f"{Path(argv[0]).name}-{len(self._daemons)}.stdio", "wb") as log:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self._daemons.append(proc)

    def start(self, timeout: float = 60) -> None:
        self.write_config()
        self._spawn(shutil.which("slurmctld") or "slurmctld", "-D", "-i", "-f", str(self.conf))
        for name in NODES:
            self._spawn(shutil.which("slurmd") or "slurmd", "-D", "-N", name, "-f", str(self.conf))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p for p in self._daemons if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a Slurm daemon exited with {dead[0].returncode}:\n{self.logs()}")
            states = self.node_states()
            if len(states) == len(NODES) and all(s.rstrip("*~#") == "idle" for s in states.values()):
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle after {timeout:.0f} s: {self.node_states()}\n{self.logs()}")

    def _job_pids(self) -> list[int]:
        """Processes of jobs submitted to this cluster: their environment names this cluster's config."""
        marker = f"SLURM_CONF={self.conf}".encode()
        own = os.getpid()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == own:
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0"):
                pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        """Cancel all jobs, stop the daemons and any leftover job process, each by PID. Safe to call twice."""
        if self._daemons and all(p.poll() is None for p in self._daemons[:1]):
            self.run("scancel", "--partition", PARTITION, check=False, timeout=20)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        for proc in reversed(self._daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._daemons:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        # slurmstepd and job tasks outlive slurmd; they carry this cluster's SLURM_CONF in their environment
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in [p for p in self._job_pids() if p != os.getpid()]:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if sig == signal.SIGTERM:
                time.sleep(1)
        self._daemons = []
