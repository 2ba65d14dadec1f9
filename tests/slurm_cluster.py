"""A throw-away two-node Slurm cluster for the Slurm test tier (``../shared/slurm/slurm_ci_cluster.sh multi``).

Two ``slurmd`` ("node1", "node2") and one ``slurmctld`` run on 127.0.0.1 in a private mount namespace whose
``/etc/hosts`` maps the node names to loopback. Everything lives under a fresh ``LAB`` folder; the daemons' PIDs are
recorded there and :meth:`SlurmCluster.stop` ends exactly those (after cancelling the jobs and waiting for their
step daemons). When the Slurm packages are missing and the tests run as root, :func:`ensure_slurm_installed` installs
them with apt-get (Debian 12: ``slurmctld slurmd slurm-client munge``, about 3.4 MB, 7 s on a warm mirror).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

SHARED_SLURM = Path(__file__).resolve().parents[1].parent / "shared" / "slurm"
CLUSTER_SCRIPT = SHARED_SLURM / "slurm_ci_cluster.sh"
REQUIRED_BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged")
INSTALL_TIMEOUT_S = 900


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed and cannot be installed here (not root, or no apt-get)."""


def missing_binaries() -> list[str]:
    return [b for b in REQUIRED_BINARIES if shutil.which(b) is None]


def ensure_slurm_installed() -> float:
    """Install the Slurm packages when missing (root + apt-get only); returns the seconds it took (0 if present)."""
    if not CLUSTER_SCRIPT.is_file():
        raise SlurmUnavailable(f"{CLUSTER_SCRIPT} not found (the shared Slurm scripts live next to the repository)")
    missing = missing_binaries()
    if not missing:
        return 0.0
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"Slurm binaries missing ({', '.join(missing)}); installing them needs root and "
                               f"apt-get: run `{CLUSTER_SCRIPT} install`")
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(CLUSTER_SCRIPT), "install"], capture_output=True, text=True,
                          timeout=INSTALL_TIMEOUT_S)
    if proc.returncode != 0 or missing_binaries():
        raise RuntimeError(f"`{CLUSTER_SCRIPT} install` failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return time.monotonic() - t0


def _free_port_base(start: int = 16817, count: int = 4, attempts: int = 200) -> int:
    """First ``start + 10·k`` whose ``count`` consecutive TCP ports are free on 127.0.0.1 (ctld, slurmd, 2 nodes)."""
    for k in range(attempts):
        base = start + 10 * k
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {count} free consecutive ports from {start}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is dead for our purpose
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _ancestors(pid: int) -> list[int]:
    out = []
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
        out.append(pid)
    return out


class SlurmCluster:
    """Handle on a running test cluster: client environment, job queries, shutdown."""

    def __init__(self, lab: Path, port_base: int, cpus_per_node: int) -> None:
        self.lab = lab
        self.port_base = port_base
        self.cpus_per_node = cpus_per_node
        self.daemon_pids: list[int] = []

    # ------------------------------------------------------------------------------------------------ lifecycle
    def _script_env(self) -> dict[str, str]:
        return {**os.environ, "LAB": str(self.lab), "PORT_BASE": str(self.port_base),
                "NCPUS": str(self.cpus_per_node)}

    def start(self) -> None:
        proc = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start", "multi"], env=self._script_env(),
                              capture_output=True, text=True, timeout=120)
        pids_file = self.lab / "run" / "pids"
        if pids_file.exists():
            self.daemon_pids = [int(line.split()[1]) for line in pids_file.read_text().splitlines() if line.strip()]
        if proc.returncode != 0:
            raise RuntimeError(f"slurm cluster did not start (rc={proc.returncode}):\n{proc.stderr}")

    def stop(self) -> list[int]:
        """Cancel jobs, stop the daemons this cluster started, then end any job process left behind (batch
        shells and srun of a job cancelled while the daemons went down). Returns PIDs still alive (should be [])."""
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], env=self._script_env(), capture_output=True,
                       text=True, timeout=180)
        strays = self.job_processes()
        for sig in (signal.SIGTERM, signal.SIGKILL):  # srun ignores a single SIGTERM
            for pid in strays:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(_pid_alive(p) for p in strays):
                time.sleep(0.2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_pid_alive(p) for p in self.daemon_pids):
            time.sleep(0.2)
        return [p for p in [*self.daemon_pids, *strays] if _pid_alive(p)]

    def job_processes(self) -> list[int]:
        """PIDs of processes that belong to this cluster's jobs: their environment points at its slurm.conf
        (jobs inherit the submitter's environment) or their command line lives under its folder."""
        conf = f"SLURM_CONF={self.lab / 'etc' / 'slurm.conf'}".encode()
        lab = str(self.lab).encode()
        protected = {os.getpid(), *_ancestors(os.getpid())}
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in protected:
                continue
            try:
                environ = (entry / "environ").read_bytes()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if conf in environ.split(b"\0") or lab in cmdline:
                found.append(int(entry.name))
        return [p for p in found if _pid_alive(p)]

    # ----------------------------------------------------------------------------------------------- client side
    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands (sbatch, scontrol, submitit): the cluster's config and sacct shim."""
        return {**os.environ, "SLURM_CONF": str(self.lab / "etc" / "slurm.conf"),
                "PATH": f"{self.lab / 'bin'}:{os.environ.get('PATH', '')}"}

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Restarts, NodeList, ExitCode, ...); {} if unknown."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        info: dict[str, str] = {}
        for tok in out.split():
            key, eq, value = tok.partition("=")
            if eq and key not in info:
                info[key] = value
        return info

    def wait_job(self, job_id: str, pred: Callable[[dict[str, str]], bool], timeout_s: float,
                 what: str = "condition") -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info and pred(info):
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id}: {what} not reached within {timeout_s:.0f} s; last state: {info}\n"
                           f"{self.log_tail()}")

    def wait_finished(self, job_id: str, timeout_s: float) -> dict[str, str]:
        """Wait for a terminal state (COMPLETED, FAILED, CANCELLED, TIMEOUT, ...) and return the job's info."""
        return self.wait_job(job_id, lambda i: i.get("JobState") not in ("PENDING", "RUNNING", "REQUEUED",
                                                                         "CONFIGURING", "COMPLETING", "SUSPENDED"),
                             timeout_s, "a terminal state")

    def log_tail(self, lines: int = 15) -> str:
        """Last lines of the daemons' logs, for failure messages."""
        out = []
        for log in sorted((self.lab / "log").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)


@contextmanager
def running_cluster(cpus_per_node: int = 4) -> Iterator[SlurmCluster]:
    """Start a fresh two-node cluster and always stop it, also when the body fails.

    ``cpus_per_node`` is what each node claims (Slurm trusts the config here), so several small jobs can run
    side by side on a 2-core machine.
    """
    ensure_slurm_installed()
    lab = Path(tempfile.mkdtemp(prefix="ssl_vil_slurm_", dir="/tmp"))  # short: the munge socket path is limited
    cluster = SlurmCluster(lab, _free_port_base(), cpus_per_node)
    ok = False
    try:
        cluster.start()
        yield cluster
        ok = True
    finally:
        leftover = cluster.stop()
        if leftover:
            raise RuntimeError(f"slurm daemons still alive after stop: {leftover} (logs: {lab / 'log'})")
        if ok:
            shutil.rmtree(lab, ignore_errors=True)
        else:
            print(f"slurm test cluster stopped; its config and logs are kept in {lab}")
