"""A one-node SLURM cluster in one directory: try `hydra/launcher=slurm` on a single machine.

    python scripts/slurm_local.py start /tmp/bnexp-slurm   # prints the SLURM_CONF line to export
    python scripts/slurm_local.py stop /tmp/bnexp-slurm

Everything lives in that directory: slurm.conf (and gres.conf), the munge key and socket,
slurmctld's state, slurmd's spool, pid and log files; nothing goes to /etc or /var. The
daemons run as the current user, which in practice must be root (slurmd starts each job as
the user who submitted it). They are ended by the pids in their pid files. tests/test_slurm.py
starts its cluster with this module, so what the README shows is what the tests run.

Needs `apt-get install slurm-wlm munge` (Debian/Ubuntu); nothing else.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")
DAEMONS = ("slurmd", "slurmctld", "munged")  # stop order: the node first, munge (auth) last
PARTITION = "debug"
CRED_EXPIRE_S = 10  # a requeued job waits this long before it may start again (SLURM's default: 120)
MEMORY_SHARE = 0.9  # of the machine's memory offered to jobs, leaving the rest to the system


class LocalSlurmError(RuntimeError):
    """The one-node cluster could not be started; the message says which step and shows its log."""


def missing_programs() -> list[str]:
    """The SLURM and munge programs this machine lacks (empty: a cluster can be started)."""
    return [p for p in PROGRAMS if find_program(p) is None]


def find_program(name: str) -> str | None:
    """`name` on PATH, or in /usr/sbin and /sbin (where Debian puts the daemons; not on users' PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


@dataclass
class LocalSlurm:
    """A one-node cluster whose config and state live in `root`."""

    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self) -> dict[str, str]:
        """Environment that points SLURM commands (sbatch, squeue, ...) and jobs at this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def pid(self, daemon: str) -> int | None:
        """The daemon's pid from its pid file, if the file is there."""
        path = self.root / f"{daemon}.pid"
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a SLURM command against this cluster and capture its output."""
        return subprocess.run([find_program(args[0]) or args[0], *args[1:]], env={**os.environ, **self.env()},
                              capture_output=True, text=True, check=check, timeout=60)

    # -- start ----------------------------------------------------------------------------------

    def start(self, fake_gpus: int = 0, timeout: float = 60.0) -> "LocalSlurm":
        """Write the config, start munged, slurmctld and slurmd, and wait until the node is idle.

        fake_gpus: GPU slots backed by /dev/null, so that tests on a machine without a GPU can
        check that a GPU request reaches the job (SLURM sets CUDA_VISIBLE_DEVICES); torch still
        sees no GPU. 0 (default): the machine's /dev/nvidia<N> devices, if any.
        """
        missing = missing_programs()
        if missing:
            raise LocalSlurmError(f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)")
        running = [d for d in DAEMONS if _alive(self.pid(d), d)]
        if running:
            raise LocalSlurmError(f"{', '.join(running)} already running for {self.root}: stop it first")
        for daemon in DAEMONS:  # stale pid files would name whatever process has that pid now
            (self.root / f"{daemon}.pid").unlink(missing_ok=True)
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged wants its socket's directory searchable by everyone
        self._start_munge()
        node, gpus = node_hardware(), self._gpu_files(fake_gpus)
        self.conf.write_text(slurm_conf(self.root, node, gpus))
        (self.root / "gres.conf").write_text(gres_conf(gpus))
        for daemon in ("slurmctld", "slurmd"):
            self._start_daemon([find_program(daemon), "-f", str(self.conf)], daemon)
        self._wait_until_idle(node["NodeName"], timeout)
        return self

    def _gpu_files(self, fake_gpus: int) -> list[str]:
        return ["/dev/null"] * fake_gpus if fake_gpus else gpu_devices()

    def _start_munge(self) -> None:
        key = self.root / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)  # munged refuses a key others can read
        self._start_daemon([find_program("munged"), "--force", f"--key-file={key}",
                            f"--socket={self.root / 'munge.socket'}", f"--pid-file={self.root / 'munged.pid'}",
                            f"--log-file={self.root / 'munged.log'}", f"--seed-file={self.root / 'munged.seed'}"],
                           "munged")

    def _start_daemon(self, command: list[str], daemon: str) -> None:
        """Start a daemon that forks into the background; fail with its log if it does not come up."""
        result = subprocess.run(command, env={**os.environ, **self.env()}, capture_output=True, text=True,
                                timeout=60)
        deadline = time.monotonic() + 30
        while not _alive(self.pid(daemon), daemon):
            if result.returncode != 0 or time.monotonic() > deadline:
                raise LocalSlurmError(f"{daemon} did not start (exit {result.returncode}): "
                                      f"{result.stderr.strip()} {self._log_tail(daemon)}")
            time.sleep(0.1)

    def _wait_until_idle(self, node: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.run("sinfo", "--noheader", "--nodes", node, "--format=%T", check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise LocalSlurmError(f"node {node} not idle after {timeout:.0f} s (sinfo: {state or 'no answer'}) "
                              f"{self._log_tail('slurmctld')} {self._log_tail('slurmd')}")

    def _log_tail(self, daemon: str, lines: int = 5) -> str:
        path = self.root / f"{daemon}.log"
        if not path.exists():
            return f"[no {path.name}]"
        return f"[{path.name}: " + " | ".join(path.read_text(errors="replace").splitlines()[-lines:]) + "]"

    # -- stop -----------------------------------------------------------------------------------

    def stop(self, timeout: float = 60.0) -> None:
        """Cancel every job, wait for them to end, then end slurmd, slurmctld and munged by pid.

        Jobs are cancelled first: a slurmstepd whose slurmd is gone would keep its job running.
        Each daemon gets SIGTERM, then SIGKILL if it is still there after `timeout` / 3 seconds.
        """
        if _alive(self.pid("slurmctld"), "slurmctld"):
            self.run("scancel", f"--user={getpass.getuser()}", check=False)
            deadline = time.monotonic() + timeout / 3
            while self._jobs_alive() and time.monotonic() < deadline:
                time.sleep(0.5)
        for daemon in DAEMONS:
            _terminate(self.pid(daemon), daemon, timeout / 3)

    def _jobs_alive(self) -> bool:
        out = self.run("squeue", "--noheader", "--format=%T", check=False).stdout.split()
        return any(state in ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED") for state in out)


def gpu_devices() -> list[str]:
    """This machine's NVIDIA GPU device files (/dev/nvidia0, ...), which gres.conf hands to jobs."""
    return sorted(str(p) for p in Path("/dev").glob("nvidia[0-9]*"))


def node_hardware() -> dict[str, str]:
    """This machine as slurmd sees it (`slurmd -C`: name, CPUs, sockets, cores, threads, memory)."""
    out = subprocess.run([find_program("slurmd"), "-C"], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    fields = dict(item.split("=", 1) for item in out.splitlines()[0].split())
    fields["RealMemory"] = str(int(int(fields["RealMemory"]) * MEMORY_SHARE))
    return fields


def free_port() -> int:
    """A TCP port nobody listens on now: other clusters on this machine keep theirs."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def slurm_conf(root: Path, node: dict[str, str], gpu_files: list[str]) -> str:
    """slurm.conf for one node that is its own controller; every path inside `root`."""
    user = getpass.getuser()
    name = node["NodeName"]
    hardware = " ".join(f"{k}={node[k]}" for k in
                        ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory"))
    gres = f" Gres=gpu:{len(gpu_files)}" if gpu_files else ""
    lines = [
        "# written by bnexp/jobs/local_slurm.py: a one-node cluster for trying and testing bnexp's SLURM launcher",
        "ClusterName=bnexp-local",
        f"SlurmctldHost={name}(127.0.0.1)",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        f"SlurmUser={user}",
        f"SlurmdUser={user}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root / 'munge.socket'},cred_expire={CRED_EXPIRE_S}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",   # no cgroups needed (containers, CI)
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",  # no slurmdbd: sacct does not work, as on many small clusters
        "SchedulerParameters=sched_interval=2",  # pending jobs (a requeued one) start within seconds, not a minute
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",         # jobs share the node by CPUs
        "MpiDefault=none",
        "ReturnToService=2",
        *(["GresTypes=gpu"] if gpu_files else []),
        f"NodeName={name} NodeAddr=127.0.0.1 {hardware}{gres} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={name} Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(lines) + "\n"


def gres_conf(gpu_files: list[str]) -> str:
    """gres.conf: one line per GPU device file (slurmd reads it from slurm.conf's directory)."""
    return "".join(f"Name=gpu File={f}\n" for f in gpu_files)


def _alive(pid: int | None, name: str) -> bool:
    """True if `pid` is a running process named `name` (a stale pid file may name another process)."""
    if pid is None:
        return False
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return comm == name[:15] and state != "Z"  # /proc truncates names to 15 characters


def _terminate(pid: int | None, name: str, timeout: float) -> None:
    """SIGTERM the daemon and wait up to `timeout` s; then SIGKILL it and wait up to 5 s more."""
    for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not _alive(pid, name):
            return
        os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while _alive(pid, name) and time.monotonic() < deadline:
            time.sleep(0.1)
