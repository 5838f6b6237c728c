"""A real one-node Slurm for the cluster tests (tests/test_slurm.py): Debian's ``slurm-wlm`` and
``munge`` packages, installed with apt-get when missing, and the three daemons (munged, slurmctld,
slurmd) started in the foreground as children of the test process, from a config in a folder of
their own (``SLURM_CONF``; nothing under /etc is written). :meth:`OneNodeSlurm.stop` ends exactly
the processes it started, by pid.

It needs root (slurmd runs jobs as their user, munged must own its socket) and, when the packages
are missing, a reachable Debian archive; :func:`why_no_slurm` says why not otherwise, and the
fixture skips with that reason.

Settings that matter, and why:
- ``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``: no cgroups and no systemd here
  (containers, CI machines);
- ``SelectType=select/cons_tres``: CPUs as consumable, so two jobs share the node as on a cluster;
- ``JobRequeue=1``; ``AuthInfo=...,cred_expire=5``: a requeued job may start again only after the
  job credential expires (Slurm's default 120 s); 5 s is the smallest Slurm accepts;
- ``KillWait=30`` (the default): a job cancelled with a signal gets SIGTERM, then SIGKILL 30 s on.
"""

import os
import shutil
import socket
import subprocess
import time
from typing import Dict, List, Optional

from tests.helpers.launch import free_port

DEBIAN_PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
SBIN = "/usr/sbin:/usr/bin:/sbin:/bin"  # the daemons live in /usr/sbin, off CI's PATH (/usr/bin:/bin)


def _daemon(name: str) -> str:
    path = shutil.which(name, path=SBIN)
    if path is None:
        raise RuntimeError(f"{name} not found in {SBIN} after installing {' '.join(DEBIAN_PACKAGES)}")
    return path


def why_no_slurm() -> Optional[str]:
    """None when a one-node Slurm can be installed and started here, else the reason."""
    if os.name != "posix" or os.geteuid() != 0:
        return "a one-node Slurm needs root (slurmd starts jobs as their user; munged owns its socket)"
    if all(shutil.which(d, path=SBIN) for d in DAEMONS):
        return None
    if not shutil.which("apt-get"):
        return f"Slurm is not installed and there is no apt-get to install {' '.join(DEBIAN_PACKAGES)}"
    return None


def install() -> None:
    """apt-get install the Debian packages (an update first when the package lists lack them), unless
    their daemons are there already."""
    if all(shutil.which(d, path=SBIN) for d in DAEMONS):
        return
    # dpkg's scripts need the sbin folders (ldconfig, adduser), which CI's PATH leaves out.
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", PATH="/usr/local/sbin:/usr/local/bin:" + SBIN)
    cmd = ["apt-get", "install", "-y", "-q", *DEBIAN_PACKAGES]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        upd = subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"apt-get install {' '.join(DEBIAN_PACKAGES)} failed:\n{upd.stderr[-1000:]}"
                               f"{res.stderr[-2000:]}")


class OneNodeSlurm:
    """munged + slurmctld + slurmd for this machine as one node of partition ``debug``."""

    def __init__(self, base: str):
        self.base = os.path.abspath(base)
        self.conf = os.path.join(self.base, "slurm.conf")
        self.procs: List[subprocess.Popen] = []
        self.version = ""

    def env(self, **extra: str) -> Dict[str, str]:
        """The environment for Slurm's commands (and the jobs they submit: --export=ALL)."""
        return dict(os.environ, SLURM_CONF=self.conf, **extra)

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        res = subprocess.run(list(cmd), env=kw.pop("env", None) or self.env(), capture_output=True, text=True, **kw)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stdout}{res.stderr}")
        return res

    def _write_config(self) -> None:
        import pwd

        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 1
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        munge_dir = os.path.join(self.base, "munge")
        os.makedirs(munge_dir, exist_ok=True)
        os.chmod(self.base, 0o755)
        munge = pwd.getpwnam("munge")
        os.chown(munge_dir, munge.pw_uid, munge.pw_gid)
        self.munge_socket = os.path.join(munge_dir, "munge.socket")
        for sub in ("state", "spool"):
            os.makedirs(os.path.join(self.base, sub), exist_ok=True)
        lines = [
            "ClusterName=mmbert-test",
            f"SlurmctldHost={host}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            f"StateSaveLocation={self.base}/state",
            f"SlurmdSpoolDir={self.base}/spool",
            f"SlurmctldPidFile={self.base}/slurmctld.pid",
            f"SlurmdPidFile={self.base}/slurmd.pid",
            f"SlurmctldLogFile={self.base}/slurmctld.log",
            f"SlurmdLogFile={self.base}/slurmd.log",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "JobRequeue=1",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1",
            "MinJobAge=300",
            "KillWait=30",
            "InactiveLimit=0",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "SwitchType=switch/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            f"NodeName={host} CPUs={cpus} RealMemory={mem} State=UNKNOWN",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        ]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _spawn(self, cmd: List[str], log: str, **kw) -> None:
        out = open(os.path.join(self.base, log), "ab")
        self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env(),
                                           stdin=subprocess.DEVNULL, **kw))

    def start(self, timeout: float = 60) -> "OneNodeSlurm":
        self._write_config()
        m = os.path.join(self.base, "munge")
        self._spawn([_daemon("munged"), "-F", f"--socket={self.munge_socket}", f"--pid-file={m}/munged.pid",
                     f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"], "munged.out",
                    user="munge", group="munge")
        self._wait(lambda: os.path.exists(self.munge_socket), timeout, "munged")
        self._spawn([_daemon("slurmctld"), "-D", "-c", "-f", self.conf], "slurmctld.out")
        self._wait(lambda: self.run("scontrol", "ping", check=False).stdout.count("UP") > 0, timeout, "slurmctld")
        self._spawn([_daemon("slurmd"), "-D", "-f", self.conf], "slurmd.out")
        self._wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%t", check=False).stdout, timeout, "slurmd")
        self.version = self.run("sinfo", "--version").stdout.strip()
        return self

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                return
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                break
            time.sleep(0.2)
        logs = ""
        for name in ("munged.out", "slurmctld.out", "slurmd.out", "slurmctld.log", "slurmd.log"):
            path = os.path.join(self.base, name)
            if os.path.exists(path):
                logs += f"--- {name}\n" + open(path, errors="replace").read()[-1500:]
        self.stop()
        raise RuntimeError(f"{what} did not come up within {timeout:.0f} s\n{logs}")

    def stop(self) -> None:
        """Cancel the jobs left in this cluster (a failed test's; their slurmstepd outlives slurmd),
        then end the daemons this object started (slurmd first), by pid; nothing else."""
        if self.procs and all(p.poll() is None for p in self.procs):
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", "--full", *jobs, check=False)
                deadline = time.time() + 60  # KillWait (30 s) after the SIGTERM, then SIGKILL
                while time.time() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                    time.sleep(0.5)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()

    # -- jobs -------------------------------------------------------------------------------------

    def sbatch(self, *args: str, cwd: str, env: Optional[Dict[str, str]] = None) -> str:
        res = self.run("sbatch", "--parsable", *args, cwd=cwd, env=env)
        return res.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job`` as a dict (empty once the job is forgotten)."""
        res = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        out = {}
        for field in res.stdout.split():
            if "=" in field:
                k, v = field.split("=", 1)
                out.setdefault(k, v)
        return out

    def wait_state(self, job_id: str, states, timeout: float) -> Dict[str, str]:
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.time() + timeout
        info = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not in {sorted(states)} after {timeout:.0f} s: {info}")
