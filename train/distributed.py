"""Who am I, how many are we, and which device: torchrun, plain srun, or a lone process.

Reads rank and world size from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK) or, when
launched by ``srun`` without torchrun, from Slurm's (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID); a lone ``python -m train`` is rank 0 of 1. One process group either way:
nccl with one GPU per local rank when CUDA is present, gloo on CPU.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str  # torchrun | slurm | single


def detect_launch() -> LaunchEnv:
    """Rank layout from the environment, without starting anything."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=int(env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or 1),
            launcher="slurm",
        )
    return LaunchEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, launcher="single")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _slurm_master_address() -> str:
    """First host of the job's node list (``scontrol show hostnames``)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    if not nodelist:
        return "127.0.0.1"
    try:
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        return hosts[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0]


def _restart_store(launch: LaunchEnv, restart: str) -> dist.Store:
    """The torchrun agent's store, under a prefix of its own for this restart.

    After ``torchrun --max-restarts`` restarts the workers, the agent's store still holds the
    previous attempt's keys, and gloo's full-mesh connect reads the dead ranks' addresses from
    them ("Connection refused"). A prefix per restart gives each attempt a clean key space.
    """
    uses_agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        world_size=launch.world_size,
        is_master=not uses_agent_store and launch.rank == 0,
    )
    return dist.PrefixStore(f"hashrec/restart_{restart}", store)


def init_distributed() -> DistributedContext:
    """Start the process group for whatever launched us and pick the device."""
    launch = detect_launch()
    if launch.launcher == "single":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    elif launch.launcher == "slurm":
        os.environ.setdefault("MASTER_ADDR", _slurm_master_address())
        # Every task derives the same port from the job id.
        os.environ.setdefault(
            "MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000)
        )
    if torch.cuda.is_available():
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if launch.launcher == "torchrun" and restart != "0":
            dist.init_process_group(
                backend=backend,
                store=_restart_store(launch, restart),
                rank=launch.rank,
                world_size=launch.world_size,
            )
        else:
            dist.init_process_group(
                backend=backend,
                init_method="env://",
                rank=launch.rank,
                world_size=launch.world_size,
            )
    return DistributedContext(
        rank=launch.rank,
        world_size=launch.world_size,
        local_rank=launch.local_rank,
        local_world_size=launch.local_world_size,
        device=device,
        backend=backend,
    )


def collective_device() -> torch.device:
    """Where a tensor handed to a collective must live: the current GPU under nccl (which
    rejects CPU tensors), the CPU under gloo or without a process group."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
