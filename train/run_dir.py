"""One run directory that every rank agrees on, without talking to each other first.

Each rank composes the Hydra config on its own, so a plain ``${now:}`` run directory could
differ by a second between ranks. The directory is keyed instead by something all ranks of
one launch share: the Slurm job id, torchrun's rendezvous id, or the start time of the
torchrun agent (the parent of every local rank); a lone process uses the current time.
Several torchrun agents (nodes) without a rendezvous id (``--nnodes 2 --node_rank ...
--master_addr ...``, torchrun's static rendezvous) share nothing of the kind: that is an
error, not a directory per node.

``start_checkpoints`` makes the directory's checkpoints folder the current run's;
``save_job_config`` writes the composed config into its ``.hydra`` folder.
"""

from __future__ import annotations

import os
import sys
import uuid
from datetime import datetime
from pathlib import Path


def _process_start_time(pid: int) -> datetime | None:
    """Start time of a process from /proc (Linux); None where /proc is unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            # Field 22 (starttime, clock ticks after boot) follows the ')' closing the name.
            fields = stat_file.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])
        with open("/proc/stat") as stat_file:
            boot_time = next(
                int(line.split()[1]) for line in stat_file if line.startswith("btime")
            )
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return datetime.fromtimestamp(boot_time + start_ticks / os.sysconf("SC_CLK_TCK"))


def run_id() -> str:
    """``slurm-<job>``, ``torchrun-<rdzv id>``, or a ``YYYY-MM-DD/HH-MM-SS`` timestamp."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id:
        array_task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{job_id}" + (f"-{array_task}" if array_task else "")
    rendezvous_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if rendezvous_id not in ("", "none"):
        return f"torchrun-{rendezvous_id}"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if "TORCHELASTIC_RUN_ID" in os.environ and world_size > local_world_size:
        # Exit here, in Hydra's resolver, with one line: an exception would come out of
        # OmegaConf and Hydra as a long traceback, before hashrec's own error handling runs.
        print(
            f"hashrec: error: torchrun runs {world_size} ranks over several nodes without a "
            f"rendezvous id, so they cannot agree on a run directory: pass --rdzv_id=<job id> "
            f"(with --rdzv_backend=c10d, as slurm/train.sbatch does) or hydra.run.dir=<dir>",
            file=sys.stderr,
        )
        raise SystemExit(2)
    started = None
    if "RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
        started = _process_start_time(os.getppid())
    return (started or datetime.now()).strftime("%Y-%m-%d/%H-%M-%S")


def start_checkpoints(run_dir: Path, resume: str) -> str:
    """Make the run directory's checkpoints folder this run's; returns the run's id (rank 0).

    A fresh start (``trainer.resume=none``, or a checkpoint from elsewhere) in a directory that
    holds another run's checkpoints moves them to ``checkpoints.previous-<time>/`` and says so:
    pruning keeps the highest steps and resume=auto takes the latest, so leaving them would
    delete this run's checkpoints and later resume the other run. A resume keeps the folder
    and its run id.
    """
    # Here, not at the top: Hydra's resolver imports this module before torch is needed.
    from train.checkpoint import RUN_ID, checkpoint_root, folder_run_id

    root = checkpoint_root(run_dir)
    fresh = resume == "none" or (
        resume != "auto" and Path(resume).resolve().parent != root.resolve()
    )
    if fresh and root.exists() and any(root.iterdir()):
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        aside = run_dir / f"{root.name}.previous-{stamp}"
        number = 1
        while aside.exists():
            number += 1
            aside = run_dir / f"{root.name}.previous-{stamp}-{number}"
        os.replace(root, aside)
        print(f"hashrec: a fresh start in a used run directory: the earlier run's checkpoints "
              f"are set aside in {aside}", flush=True)
    root.mkdir(parents=True, exist_ok=True)
    run_id = folder_run_id(root)
    if run_id is None:
        run_id = uuid.uuid4().hex
        temporary = root / (RUN_ID + ".tmp")
        temporary.write_text(run_id + "\n")
        os.replace(temporary, root / RUN_ID)
    return run_id


JOB_CONFIG_DIR = ".hydra"


def save_job_config(run_dir: Path, files: dict[str, str]) -> None:
    """Write the job's config files (``config.yaml``, ``overrides.yaml``, ``hydra.yaml``:
    where Hydra itself would) into ``run_dir/.hydra``. Called once the job holds the run
    directory, so a second job refused there leaves the first one's files as they were."""
    folder = run_dir / JOB_CONFIG_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
