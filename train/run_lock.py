"""One job at a time in a run directory: a lock file that rank 0 holds for the job's life.

Two jobs writing one run directory mix their metrics, checkpoints and W&B runs, and the
second fails later with a misleading error. Rank 0 takes an exclusive ``flock`` on
``<run dir>/job.lock`` at the start and keeps the file open until the job ends. The kernel
drops the lock when the process dies, however it dies (SIGKILL, a node's OOM killer), so a
dead job's restart takes it over without any stale-lock cleanup. The file names the holder
(host, pid, start time) for the refusal line. On NFS, Linux maps flock to NFS byte-range
locks, which also end with the process.
"""

from __future__ import annotations

import fcntl
import os
import socket
from datetime import datetime
from pathlib import Path
from typing import IO

LOCK_FILE = "job.lock"

# The open lock file of this process's job (rank 0), closed by release_run_lock.
_held: IO[str] | None = None


class RunDirInUse(Exception):
    """Another live job holds the run directory; the message names it."""


def take_run_lock(run_dir: Path) -> None:
    """Take the run directory for this job, or raise RunDirInUse naming the job that has it
    (rank 0's work: call it through on_rank_zero so every rank learns a refusal)."""
    global _held
    release_run_lock()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_file = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "a job that has not yet written its name"
        lock_file.close()
        raise RunDirInUse(
            f"run directory {run_dir} is in use by the job {holder}; wait for it to end or "
            f"choose another hydra.run.dir"
        ) from None
    lock_file.seek(0)
    lock_file.truncate()
    started = datetime.now().isoformat(timespec="seconds")
    lock_file.write(f"on host {socket.gethostname()}, pid {os.getpid()}, started {started}\n")
    lock_file.flush()
    _held = lock_file


def release_run_lock() -> None:
    """Let the run directory go (closing the file drops the lock); a no-op when none is held."""
    global _held
    if _held is not None:
        _held.close()
        _held = None
