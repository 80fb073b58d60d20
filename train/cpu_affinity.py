"""Give each CPU rank its own cores when several ranks share a host.

Left to the OS, two ranks on a 2-core host move between the cores together with their gloo
and batch-prefetch threads; each all-to-all then waits on whichever rank was descheduled last.
Pinning rank i to the i-th share of the cores the process may use (its gloo, prefetch and
OpenMP threads with it) made the 2-rank reference-shape step 59-62 ms instead of 74-86 ms on
a 2-core machine (interleaved runs; TorchRec's own loop gains 10-18% from the same pinning).

Pinning happens only where it cannot take cores away: every local rank must see the same
CPU set (a launcher that already binds each task to its own cores, like ``srun
--cpu-bind=cores``, gives them different sets, and then nothing is changed) with at least one
core per local rank.
"""

from __future__ import annotations

import os
import socket

import torch.distributed as dist


def core_share(cpus: list[int], local_rank: int, local_world_size: int) -> list[int]:
    """Local rank ``local_rank``'s contiguous share of ``cpus``: every core goes to one rank,
    shares differ in size by at most one (needs at least one core per rank)."""
    cpus = sorted(cpus)
    start = local_rank * len(cpus) // local_world_size
    stop = (local_rank + 1) * len(cpus) // local_world_size
    return cpus[start:stop]


def pin_local_rank(local_rank: int, local_world_size: int) -> list[int] | None:
    """Pin every thread of this process to its share of the host's cores; returns the cores,
    or None where it left the affinity alone. A collective: every rank must call it, after
    the process group exists (so its threads exist and are pinned too)."""
    if dist.get_world_size() == 1 or not hasattr(os, "sched_setaffinity"):  # Linux only
        return None
    cpus = sorted(os.sched_getaffinity(0))
    mine = (socket.gethostname(), tuple(cpus))
    everyone: list[tuple[str, tuple[int, ...]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    same_host = [entry for entry in everyone if entry is not None and entry[0] == mine[0]]
    if (
        local_world_size <= 1
        or len(same_host) != local_world_size
        or any(entry[1] != mine[1] for entry in same_host)
        or len(cpus) < local_world_size
    ):
        return None
    share = core_share(cpus, local_rank, local_world_size)
    # Threads started later (batch prefetch, W&B) inherit the affinity of the thread that
    # starts them; the ones already running (gloo's) are set one by one.
    for thread_id in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(thread_id), share)
        except (ProcessLookupError, PermissionError):  # a thread that just ended
            continue
    return share
