"""What the machine and process look like: memory now and at peak, library versions.

Host memory comes from ``/proc/self/status`` (VmRSS = resident now, VmHWM = the peak), with
``resource.getrusage`` as the fallback where /proc is missing. Torch has no CPU allocator
statistics; on CUDA the caching allocator reports allocated, reserved and peak bytes.
"""

from __future__ import annotations

import platform
import resource
from importlib import metadata

import torch
from torch import nn

from train.tables import table_name_of, tensor_blocks


def _proc_status_bytes(field: str) -> int | None:
    """A ``VmXXX:  1234 kB`` line of /proc/self/status in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Resident set size of this process now."""
    value = _proc_status_bytes("VmRSS")
    if value is not None:
        return value
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    value = _proc_status_bytes("VmHWM")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cuda_memory_bytes(device: torch.device) -> dict[str, int]:
    """allocated / reserved / peak bytes of the CUDA caching allocator; {} off CUDA."""
    if device.type != "cuda":
        return {}
    return {
        "cuda_allocated_bytes": torch.cuda.memory_allocated(device),
        "cuda_reserved_bytes": torch.cuda.memory_reserved(device),
        "cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
    }


def _nbytes(value: object) -> int:
    total = 0
    for block in tensor_blocks("", value):  # type: ignore[arg-type]
        total += block.tensor.numel() * block.tensor.element_size()
    return total


def measured_embedding_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes this rank really holds for embedding tables: its local shards of every table
    (whole replicas for data-parallel tables) plus their optimizer state. The planner's
    figure for the same thing is ``embedding_bytes_per_rank``; the two should agree."""
    total = 0
    for key, value in model.state_dict().items():
        if table_name_of(key) is not None:
            total += _nbytes(value)
    for param_key, param_state in optimizer.state_dict()["state"].items():
        if table_name_of(str(param_key)) is None or not isinstance(param_state, dict):
            continue
        for value in param_state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                total += _nbytes(value)
    return total


def _version(*distributions: str) -> str | None:
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def system_facts(world_size: int, device: torch.device, backend: str) -> dict[str, object]:
    """Facts that explain a run's numbers: scale, device, library versions. Deliberately no
    environment variables or host names (they can leak secrets)."""
    facts: dict[str, object] = {
        "world_size": world_size,
        "device": device.type,
        "backend": backend,
        "torch": torch.__version__,
        "torchrec": _version("torchrec"),
        "fbgemm_gpu": _version("fbgemm-gpu", "fbgemm-gpu-cpu", "fbgemm_gpu", "fbgemm_gpu_cpu"),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        facts["cuda"] = torch.version.cuda
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts
