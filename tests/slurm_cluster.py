"""A real one-node Slurm cluster on localhost for tests: slurmctld + slurmd, no munge.

Installs Debian's slurm-wlm when sbatch is missing (root only), writes a slurm.conf for one
2-CPU node into a scratch folder, starts both daemons, and stops them by their pid files.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

SLURM_CONF = """\
ClusterName=hashrec-test
SlurmctldHost=localhost
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
JobCompType=jobcomp/none
# Pre-emption tests requeue jobs: allow it; a requeued job becomes eligible again after the
# credential lifetime (120 s by default, 5 s here) and starts at the next scheduling pass
# (every 60 s by default, every 2 s here).
JobRequeue=1
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=2,bf_interval=1
NodeName=localhost CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def ensure_slurm_installed() -> str | None:
    """None when sbatch is available (installing it if we can), else why not."""
    if shutil.which("sbatch") and shutil.which("slurmctld") and shutil.which("slurmd"):
        return None
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm"]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900,
                                check=False)
        if result.returncode != 0:
            return f"{' '.join(command)} failed: {result.stderr[-500:]}"
    return None


class LocalSlurm:
    def __init__(self, root: Path, ctld_port: int, slurmd_port: int) -> None:
        self.root = root
        for sub in ("state", "spool"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.conf = root / "slurm.conf"
        self.conf.write_text(SLURM_CONF.format(root=root, ctld_port=ctld_port, slurmd_port=slurmd_port))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 30.0) -> None:
        subprocess.run(["slurmctld", "-f", str(self.conf)], env=self.env, check=True)
        subprocess.run(["slurmd", "-f", str(self.conf), "-N", "localhost"], env=self.env, check=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = subprocess.run(
                ["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True,
                timeout=30, check=False,
            ).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"Slurm node not idle after {timeout}s (state {state!r}); logs in {self.root}")

    def stop(self) -> None:
        for name in ("slurmd.pid", "slurmctld.pid"):
            pid_file = self.root / name
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(1.0)
