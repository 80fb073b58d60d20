"""How much memory TorchRec's planner may give each rank: one rule for a job and its dry run.

Left unset, TorchRec's ``Topology`` assumes 32 GiB of device memory and 128 GiB of host memory
per rank, whatever the machine: a plan made that way can overfill an 8 GiB GPU, or leave most
of an 80 GiB one unused. hashrec sets both caps on every plan, by one rule:

- device (HBM) per rank: the GPU's own memory (one GPU per rank); 0 on CPU, where TorchRec
  places everything in host memory;
- host (DDR) per rank: the host's memory (or the cgroup limit a scheduler set, e.g. Slurm's
  ``--mem``) shared evenly by the ranks on that host;
- ``sharding.hbm_cap_bytes`` / ``sharding.ddr_cap_bytes`` in the config win over both.

A real job reads the memory from its own device and host; ``plan_only`` with
``plan_topology.*`` applies the same rule to the memory the target cluster declares.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from train.sharding import format_bytes

# cgroup v2 and v1 files holding a memory limit (Slurm's task/cgroup plugin, containers).
_CGROUP_LIMIT_FILES = (
    Path("/sys/fs/cgroup/memory.max"),
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
)


@dataclass(frozen=True)
class MemoryCaps:
    """The planner's caps per rank, and where each came from (printed with the plan)."""

    device_bytes: int
    host_bytes: int
    device_source: str
    host_source: str

    def describe(self) -> str:
        return (
            f"planner memory per rank: device {format_bytes(self.device_bytes)} "
            f"({self.device_source}), host {format_bytes(self.host_bytes)} ({self.host_source})"
        )


def memory_caps(
    compute_device: str,
    device_memory_bytes: int | None,
    host_memory_bytes: int,
    local_world_size: int,
    hbm_cap_bytes: int | None = None,
    ddr_cap_bytes: int | None = None,
) -> MemoryCaps:
    """The caps per rank (see the module docstring for the rule).

    Args:
        compute_device: ``cuda`` or ``cpu``.
        device_memory_bytes: one GPU's memory (ignored on CPU).
        host_memory_bytes: one host's memory, shared by its ``local_world_size`` ranks.
        hbm_cap_bytes, ddr_cap_bytes: the config's explicit caps per rank, or None.
    """
    if hbm_cap_bytes is not None:
        device_bytes, device_source = hbm_cap_bytes, "sharding.hbm_cap_bytes"
    elif compute_device == "cpu":
        device_bytes, device_source = 0, "no device memory on cpu"
    elif device_memory_bytes is None:
        raise ValueError("planning for cuda needs the GPU's memory size")
    else:
        device_bytes, device_source = device_memory_bytes, "the GPU's memory"
    if ddr_cap_bytes is not None:
        host_bytes, host_source = ddr_cap_bytes, "sharding.ddr_cap_bytes"
    else:
        local_world_size = max(1, local_world_size)
        host_bytes = host_memory_bytes // local_world_size
        host_source = (
            f"host memory {format_bytes(host_memory_bytes)} / {local_world_size} "
            f"local rank{'s' if local_world_size > 1 else ''}"
        )
    return MemoryCaps(device_bytes, host_bytes, device_source, host_source)


def parse_cgroup_limit(text: str) -> int | None:
    """A cgroup memory limit file's value in bytes; None for "max" (no limit) or junk."""
    text = text.strip()
    if not text.isdigit():
        return None
    limit = int(text)
    # cgroup v1 writes "no limit" as a huge page-aligned number (about 2^63).
    return limit if limit < (1 << 60) else None


def host_memory_bytes() -> int:
    """This host's memory, or the cgroup limit the process runs under when that is smaller."""
    total = psutil.virtual_memory().total
    for path in _CGROUP_LIMIT_FILES:
        try:
            limit = parse_cgroup_limit(path.read_text())
        except OSError:
            continue
        if limit is not None:
            total = min(total, limit)
    return total


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of the GPU ``device`` (None on CPU)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory)


def local_memory_caps(
    device: torch.device,
    local_world_size: int,
    hbm_cap_bytes: int | None,
    ddr_cap_bytes: int | None,
) -> MemoryCaps:
    """The caps for ranks on this machine, from its own device and host memory."""
    return memory_caps(
        device.type,
        device_memory_bytes(device),
        host_memory_bytes(),
        local_world_size,
        hbm_cap_bytes,
        ddr_cap_bytes,
    )
