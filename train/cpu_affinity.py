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

GPU ranks are pinned the same way, but to the CPUs near their GPU where the node says which
those are (``/sys/bus/pci/devices/<GPU's PCI address>/local_cpulist``): the ranks whose GPUs
share a NUMA node split that node's CPUs. Where the node does not say, they split all the
CPUs like CPU ranks.

Shares are whole physical cores (hyperthread siblings, per sysfs ``thread_siblings_list``, go
to the same rank), and a pinned rank runs one intra-op (OpenMP) thread per core of its share,
unless trainer.threads or OMP_NUM_THREADS chose the count (train/threads.py).
Otherwise every rank of ``torchrun --nproc_per_node 8`` in a 64-CPU Slurm task would run 64
threads (OMP_NUM_THREADS from the task's CPU count) or 1 (torchrun's default for 2+ ranks).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Hashable, Iterable, Mapping

import torch
import torch.distributed as dist


def core_share(
    cpus: list[int],
    local_rank: int,
    local_world_size: int,
    core_of: Mapping[int, Hashable] | None = None,
) -> list[int]:
    """Local rank ``local_rank``'s contiguous share of ``cpus``, whole physical cores at a time:
    CPUs with the same ``core_of`` value (hyperthread siblings, such as 0 and 112 on a
    112-core node) go to the same rank, so no two ranks share a core. Every CPU goes to one
    rank; shares differ by at most one core. With fewer cores than ranks (or no ``core_of``)
    CPUs are split one by one (needs at least one CPU per rank)."""
    cpus = sorted(cpus)
    cores: dict[Hashable, list[int]] = {}
    for cpu in cpus:  # in the order of each core's first CPU
        cores.setdefault(core_of.get(cpu, cpu) if core_of else cpu, []).append(cpu)
    groups = list(cores.values())
    if len(groups) < local_world_size:
        groups = [[cpu] for cpu in cpus]
    start = local_rank * len(groups) // local_world_size
    stop = (local_rank + 1) * len(groups) // local_world_size
    return sorted(cpu for group in groups[start:stop] for cpu in group)


def num_cores(cpus: list[int], core_of: Mapping[int, Hashable] | None = None) -> int:
    """Physical cores among ``cpus`` (each CPU its own core without ``core_of``)."""
    return len({core_of.get(cpu, cpu) if core_of else cpu for cpu in cpus})


def physical_cores(cpus: Iterable[int]) -> dict[int, str]:
    """CPU -> its core's sibling list from sysfs (the same text for hyperthread siblings);
    CPUs the node says nothing about are left out."""
    core_of = {}
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                core_of[cpu] = f.read().strip()
        except OSError:
            continue
    return core_of


def parse_cpulist(text: str) -> list[int]:
    """A Linux CPU list (``0-3,8,10-11``, as in sysfs ``local_cpulist``) -> sorted CPU ids."""
    cpus: set[int] = set()
    for item in text.strip().split(","):
        if not item:
            continue
        low, _, high = item.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return sorted(cpus)


def numa_share(
    local_cpulist: str,
    allowed: list[int],
    position: int,
    num_sharing: int,
    core_of: Mapping[int, Hashable] | None = None,
) -> list[int] | None:
    """A GPU rank's share of the CPUs near its GPU.

    ``local_cpulist``: the GPU's sysfs ``local_cpulist`` text (empty where the node has none);
    ``allowed``: the CPUs this process may use; ``num_sharing`` ranks have GPUs with this same
    list and this rank is number ``position`` among them; ``core_of`` as for core_share.
    Returns None where the node does not say, or where the allowed CPUs near the GPU are
    fewer than the ranks sharing them.
    """
    near = sorted(set(parse_cpulist(local_cpulist)) & set(allowed)) if local_cpulist else []
    if len(near) < num_sharing:
        return None
    return core_share(near, position, num_sharing, core_of)


def gpu_pci_address(domain: int, bus: int, device: int) -> str:
    """The sysfs name of a GPU's PCI function 0: ``0000:3b:00.0``."""
    return f"{domain:04x}:{bus:02x}:{device:02x}.0"


def gpu_local_cpulist(device: torch.device) -> str:
    """The node's list of CPUs near this GPU, or "" where the node (or torch) does not say."""
    properties = torch.cuda.get_device_properties(device)
    try:
        address = gpu_pci_address(
            properties.pci_domain_id, properties.pci_bus_id, properties.pci_device_id
        )
        with open(f"/sys/bus/pci/devices/{address}/local_cpulist") as cpulist_file:
            return cpulist_file.read().strip()
    except (AttributeError, OSError):
        return ""


def rank_share(
    everyone: list[tuple[str, tuple[int, ...], str]],
    rank: int,
    local_rank: int,
    local_world_size: int,
    core_of: Mapping[int, Hashable] | None = None,
) -> list[int] | None:
    """This rank's cores from what every rank reported: (host name, the CPUs it may use, its
    GPU's local_cpulist or "" for a CPU rank); ``core_of`` as for core_share, for this host.
    None where pinning would take cores away:
    the local ranks see different CPU sets (the launcher already split them), a host has
    other than ``local_world_size`` ranks, or there are fewer cores than local ranks."""
    host, cpus, _ = everyone[rank]
    same_host = [entry for entry in everyone if entry[0] == host]
    if (
        local_world_size <= 1
        or len(same_host) != local_world_size
        or any(entry[1] != cpus for entry in same_host)
        or len(cpus) < local_world_size
    ):
        return None
    # GPU ranks: the ranks whose GPUs have the same near CPUs split those, when every rank on
    # the host can have a share of its own; otherwise (a node that does not say, too few
    # allowed CPUs near some GPU) all split all the CPUs, so that no two shares overlap.
    host_ranks = [r for r, entry in enumerate(everyone) if entry[0] == host]
    near_shares = {}
    for other in host_ranks:
        near_ranks = [r for r in host_ranks if everyone[r][2] == everyone[other][2]]
        near_shares[other] = numa_share(
            everyone[other][2], list(cpus), near_ranks.index(other), len(near_ranks), core_of
        )
    if all(share is not None for share in near_shares.values()):
        return near_shares[rank]
    return core_share(list(cpus), local_rank, local_world_size, core_of)


def pin_local_rank(
    local_rank: int,
    local_world_size: int,
    device: torch.device | None = None,
    one_thread_per_core: bool = True,
) -> list[int] | None:
    """Pin every thread of this process to its share of the host's cores (near its GPU for a
    CUDA ``device``) and, with ``one_thread_per_core``, run that many intra-op threads (else
    the count set before stays); returns the cores, or None where it left the affinity alone.
    A collective: every rank must call it, after the process group exists (so its threads
    exist and are pinned too)."""
    if dist.get_world_size() == 1 or not hasattr(os, "sched_setaffinity"):  # Linux only
        return None
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    cpulist = gpu_local_cpulist(device) if device is not None and device.type == "cuda" else ""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (socket.gethostname(), cpus, cpulist))
    core_of = physical_cores(cpus)
    share = rank_share(everyone, dist.get_rank(), local_rank, local_world_size, core_of)
    if share is None:
        return None
    # Threads started later (batch prefetch, W&B) inherit the affinity of the thread that
    # starts them; the ones already running (gloo's) are set one by one.
    for thread_id in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(thread_id), share)
        except (ProcessLookupError, PermissionError):  # a thread that just ended
            continue
    # One intra-op thread per physical core, as torch's own default does for a whole machine.
    if one_thread_per_core:
        torch.set_num_threads(num_cores(share, core_of))
    return share
