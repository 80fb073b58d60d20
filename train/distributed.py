"""Who am I, how many are we, and which device: torchrun, plain srun, or a lone process.

Reads rank and world size from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK) or, when
launched by ``srun`` without torchrun, from Slurm's (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID); a lone ``python -m train`` is rank 0 of 1. One process group either way:
nccl with one GPU per local rank when CUDA is present, gloo on CPU.

Before the group starts, the venv is checked against the node (train/install_check.py): a
node with GPUs never falls back to gloo silently.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from train.install_check import install_problem, seen_on_this_node, use_cuda


class LaunchError(Exception):
    """This process cannot join a job here (wrong install for the node, an unreadable Slurm
    node list); its message is one line naming what and where."""


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


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    """``01-03,7`` -> ``["01", "02", "03", "7"]``: a range keeps its first number's width."""
    numbers = []
    for item in ranges.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if match is None or (match[2] is not None and int(match[2]) < int(match[1])):
            raise ValueError(f"node list {nodelist!r}: bad range {item!r} in [{ranges}]")
        low, high = match[1], match[2] or match[1]
        numbers += [f"{n:0{len(low)}d}" for n in range(int(low), int(high) + 1)]
    return numbers


def expand_nodelist(nodelist: str) -> list[str]:
    """The host names of a Slurm node list, in Slurm's order (what ``scontrol show hostnames``
    prints): ``node[01-02],gpu7`` -> node01, node02, gpu7; ``rack[1-2]-n[1-2]`` -> rack1-n1,
    rack1-n2, rack2-n1, rack2-n2. Names are separated by commas outside brackets (or
    spaces); ValueError on a list Slurm would not write."""
    hosts: list[str] = []
    for name in re.findall(r"(?:[^,\s\[]|\[[^\]]*\])+", nodelist):
        # Literal text and bracket groups alternate: "rack", "1-2", "-n", "1-2", "".
        pieces = re.split(r"\[([^\]]*)\]", name)
        if any(c in piece for piece in pieces[::2] for c in "[]"):
            raise ValueError(f"node list {nodelist!r}: unbalanced brackets in {name!r}")
        choices = [
            [piece] if i % 2 == 0 else _expand_ranges(piece, nodelist)
            for i, piece in enumerate(pieces)
        ]
        hosts += ["".join(parts) for parts in itertools.product(*choices)]
    # Whatever the regex skipped (a stray "]" or "[") makes the list unreadable.
    if re.sub(r"(?:[^,\s\[]|\[[^\]]*\])+|[,\s]", "", nodelist):
        raise ValueError(f"node list {nodelist!r}: unbalanced brackets")
    return hosts


def _slurm_master_address() -> str:
    """First host of the job's node list (``scontrol show hostnames``, or parsed here where
    scontrol is missing)."""
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
        if hosts:
            return hosts[0]
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        return expand_nodelist(nodelist)[0]
    except (ValueError, IndexError) as error:
        raise LaunchError(f"SLURM_JOB_NODELIST: {error}") from None


def local_device_index(local_rank: int, device_count: int) -> int:
    """The GPU of a local rank among the ``device_count`` this process sees: its own under
    torchrun (every rank sees all of the node's GPUs), and 0 under ``srun
    --gpus-per-task=1``, where each task sees just its own GPU."""
    return local_rank % device_count


def _restart_store(launch: LaunchEnv, restart: str, timeout: timedelta) -> dist.Store:
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
        timeout=timeout,
    )
    return dist.PrefixStore(f"hashrec/restart_{restart}", store)


def init_distributed(timeout_s: float) -> DistributedContext:
    """Check the install, start the process group for whatever launched us, pick the device.

    ``timeout_s`` bounds the rendezvous and every collective (trainer.dist_timeout_s): long
    enough for rank 0's one-off work while the others wait, short enough that a dead rank
    ends the job. Raises LaunchError when this venv does not fit the node.
    """
    launch = detect_launch()
    facts = seen_on_this_node()
    problem = install_problem(facts)
    if problem:
        raise LaunchError(problem)
    if launch.launcher == "single":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    elif launch.launcher == "slurm":
        os.environ.setdefault("MASTER_ADDR", _slurm_master_address())
        # Every task derives the same port from the job id.
        os.environ.setdefault(
            "MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000)
        )
    if use_cuda(facts):
        device = torch.device(
            "cuda", local_device_index(launch.local_rank, torch.cuda.device_count())
        )
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if launch.launcher == "torchrun" and restart != "0":
            rendezvous = {"store": _restart_store(launch, restart, timeout)}
        else:
            rendezvous = {"init_method": "env://"}
        dist.init_process_group(
            backend=backend,
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timeout,
            # nccl: form the communicator now on this rank's GPU, so a broken NCCL set-up
            # fails here rather than at the first collective, and barriers know the device.
            device_id=device if backend == "nccl" else None,
            **rendezvous,
        )
    return DistributedContext(
        rank=launch.rank,
        world_size=launch.world_size,
        local_rank=launch.local_rank,
        local_world_size=launch.local_world_size,
        device=device,
        backend=backend,
    )


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
