"""How many threads each rank runs, and how its idle OpenMP threads wait.

Intra-op threads: the physical cores this rank may use, split among the ranks on its host
that may use the same ones. The cores a process may use are its affinity mask (``taskset``,
a Slurm task's binding), capped by its cgroup's CPU quota: a container given 4 CPUs of a
64-CPU host still sees all 64 in its mask, and OpenMP, counting the mask, would run 64
threads on 4 CPUs' worth of time. The ranks that share them are those of this host with the
same mask: all of torchrun's ranks see the host's, while ``srun --cpu-bind`` gives each task
cores of its own. ``trainer.threads``, else OMP_NUM_THREADS, overrides the count. Inter-op
threads (torch.jit futures and the like; hashrec's ops do not use them) are kept to one.

Idle OpenMP threads spin only briefly before they sleep: ``python -m train`` sets
GOMP_SPINCOUNT=10000 and OMP_WAIT_POLICY=PASSIVE before torch loads its OpenMP runtime, unless
either is already set (``limit_openmp_spinning``). By default libgomp (the runtime of torch's
Linux wheels) spins up to 300,000 rounds at the end of every parallel op, and before the
next, waiting for the rest of its team. Where other work holds a core, the partner it waits
for cannot run until the spin ends: each op then lasts the spin (milliseconds), not its work,
and the default job ran 17-130x slower beside other jobs on the 2-core dev machine. 10,000
rounds (well under a millisecond) is long enough that on an idle machine a thread rarely
sleeps between the ops of a step (the default job ran as fast as with libgomp's default, where
1,000 rounds cost 10-20%), and short enough that a busy core costs a fraction of a millisecond
an op, not milliseconds (export GOMP_SPINCOUNT=300000 to spin as before). Runtimes without
GOMP_SPINCOUNT (LLVM's, Intel's) sleep at once under OMP_WAIT_POLICY=PASSIVE. Figures: docs/performance.md, "A shared machine".

This module imports torch only inside ``apply_threads``: ``train/__main__.py`` imports it
before torch, while the environment can still change what libgomp reads once, at load.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Hashable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path


# How idle OpenMP threads wait unless the environment says (see the module's docstring).
OPENMP_WAIT = {"GOMP_SPINCOUNT": "10000", "OMP_WAIT_POLICY": "PASSIVE"}


def limit_openmp_spinning(environ: MutableMapping[str, str] = os.environ) -> None:
    """OPENMP_WAIT, unless the environment already says how OpenMP threads wait (either
    variable set). Only takes effect before torch (and its OpenMP runtime) is first imported."""
    if not any(key in environ for key in OPENMP_WAIT):
        environ.update(OPENMP_WAIT)


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPUs' worth of time this process's cgroup may use per period (2.5 for a quota of
    250 ms per 100 ms), from cgroup v2's ``cpu.max`` or v1's ``cpu/cpu.cfs_quota_us``, as a
    container sees its own cgroup at the root; None without a quota or where neither says."""
    limits = []
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            limits.append(int(quota) / int(period))
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            limits.append(quota / period)
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


@dataclass(frozen=True)
class ThreadChoice:
    """Intra-op threads per rank and why (``reason`` in words); ``auto`` when no setting
    chose the count."""

    intra_op: int
    reason: str
    auto: bool

    def describe(self, environ: Mapping[str, str] = os.environ) -> str:
        """One line for the job's start: the choice, and how idle OpenMP threads wait as
        ``environ`` (the process's environment when torch loaded) says."""
        chosen = {key: environ[key] for key in OPENMP_WAIT if key in environ}
        settings = ", ".join(f"{key}={value}" for key, value in chosen.items())
        if chosen == OPENMP_WAIT:
            waiting = f"idle OpenMP threads spin briefly, then sleep ({settings})"
        elif chosen:
            waiting = settings
        else:
            waiting = "idle OpenMP threads spin (OMP_WAIT_POLICY unset)"
        return f"threads: {self.intra_op} intra-op per rank ({self.reason}), 1 inter-op, {waiting}"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def choose_threads(
    configured: int | None,
    omp_num_threads: str | None,
    cpus: list[int],
    sharing: int,
    cpu_limit: float | None = None,
    core_of: Mapping[int, Hashable] | None = None,
) -> ThreadChoice:
    """Intra-op threads for a rank that may use ``cpus`` (its affinity mask), shared by
    ``sharing`` ranks of its host, under a cgroup limit of ``cpu_limit`` CPUs (None: none);
    ``core_of`` maps a CPU to its physical core (hyperthread siblings share one), as
    train/cpu_affinity.py's physical_cores reads it. ``configured`` (trainer.threads), else
    ``omp_num_threads`` (the environment's OMP_NUM_THREADS), wins. ValueError on an
    OMP_NUM_THREADS that is not a positive count."""
    if configured is not None:
        return ThreadChoice(configured, f"trainer.threads={configured}", auto=False)
    if omp_num_threads is not None:
        # OpenMP also takes a list for nested levels ("4,2"); the first is the outer level.
        first = omp_num_threads.split(",")[0].strip()
        if not first.isdigit() or int(first) < 1:
            raise ValueError(
                f"OMP_NUM_THREADS must be a positive number of threads, got {omp_num_threads!r}"
            )
        return ThreadChoice(int(first), f"OMP_NUM_THREADS={omp_num_threads}", auto=False)
    cores = len({core_of.get(cpu, cpu) if core_of else cpu for cpu in cpus})
    have = _plural(len(cpus), "CPU") if cores == len(cpus) else (
        f"{_plural(cores, 'core')} of {_plural(len(cpus), 'CPU')}"
    )
    usable = cores
    if cpu_limit is not None and math.floor(cpu_limit) < cores:
        usable = max(1, math.floor(cpu_limit))
        have = f"a CPU quota of {cpu_limit:g} of {_plural(len(cpus), 'CPU')}"
    return ThreadChoice(
        max(1, usable // sharing), f"{have} / {_plural(sharing, 'local rank')}", auto=True
    )


def ranks_sharing_cpus(everyone: list[tuple[str, tuple[int, ...]]], rank: int) -> int:
    """How many ranks (``rank`` included) report the same host and CPU set as ``rank``, from
    every rank's (host name, CPUs it may use)."""
    return sum(1 for entry in everyone if entry == everyone[rank])


def chosen_omp_num_threads(environ: Mapping[str, str], local_world_size: int) -> str | None:
    """OMP_NUM_THREADS as someone chose it, or None. torchrun writes OMP_NUM_THREADS=1 for 2
    or more ranks per host when it is unset; that 1 is torchrun's, not a choice, and reads as
    None there (``trainer.threads=1`` asks for one thread under torchrun)."""
    value = environ.get("OMP_NUM_THREADS")
    if value == "1" and local_world_size > 1 and "TORCHELASTIC_RUN_ID" in environ:
        return None
    return value


def usable_cpus() -> list[int]:
    """The CPUs this process may run on: its affinity mask (every CPU where the OS has none)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cpu_report() -> list[tuple[str, tuple[int, ...]]]:
    """Every rank's (host name, the CPUs it may use), in rank order. A collective: every rank
    must call it."""
    import torch.distributed as dist

    mine = (socket.gethostname(), tuple(usable_cpus()))
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def apply_threads(choice: ThreadChoice) -> None:
    """Run ``choice.intra_op`` intra-op threads and one inter-op thread from now on."""
    import torch  # here, not at the top: see the module's docstring

    torch.set_num_threads(choice.intra_op)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # set once per process, before any inter-op work: already done
        pass
