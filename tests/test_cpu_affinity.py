"""Each CPU rank on a host gets its own cores, unless the launcher already split them."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import run_ranks
from train.cpu_affinity import (
    core_share,
    gpu_pci_address,
    num_cores,
    numa_share,
    parse_cpulist,
    physical_cores,
    pin_local_rank,
    rank_share,
)

needs_two_cores = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux and at least 2 usable cores",
)


def test_core_share_gives_every_core_to_one_rank():
    assert [core_share([1, 0], rank, 2) for rank in range(2)] == [[0], [1]]
    shares = [core_share(list(range(8)), rank, 3) for rank in range(3)]
    assert shares == [[0, 1], [2, 3, 4], [5, 6, 7]]


def pin_worker(rank: int, world_size: int, out_path: str, split_first: bool) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if split_first:  # as `srun --cpu-bind` leaves tasks: different sets per rank
        os.sched_setaffinity(0, core_share(cpus, rank, world_size))
    before = sorted(os.sched_getaffinity(0))
    # As OMP_NUM_THREADS set to a whole Slurm task's CPUs would start every rank.
    torch.set_num_threads(2 * len(before))
    share = pin_local_rank(rank, world_size)
    threads = {
        int(tid): sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")
    }
    torch.save(
        {"before": before, "share": share, "threads": threads,
         "num_threads": torch.get_num_threads()},
        f"{out_path}.{rank}",
    )


@needs_two_cores
@pytest.mark.parametrize("split_first", [False, True])
def test_ranks_pinned_to_own_cores(tmp_path, split_first):
    out_path = str(tmp_path / "affinity")
    run_ranks(pin_worker, 2, out_path, split_first)
    results = [torch.load(f"{out_path}.{rank}") for rank in range(2)]
    if split_first:  # already split by the launcher: left alone
        assert all(result["share"] is None for result in results)
        return
    shares = [result["share"] for result in results]
    assert shares == [core_share(results[0]["before"], rank, 2) for rank in range(2)]
    assert not set(shares[0]) & set(shares[1])
    for result in results:  # every thread, gloo's included
        assert all(cpus == result["share"] for cpus in result["threads"].values())
        # One intra-op thread per core of its share (this machine: no hyperthreads).
        assert result["num_threads"] == num_cores(result["share"], physical_cores(result["share"]))


def test_parse_cpulist_reads_sysfs_lists():
    assert parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpulist("5") == [5]
    assert parse_cpulist("") == []


def test_gpu_pci_address_is_the_sysfs_name():
    assert gpu_pci_address(0, 0x3B, 0) == "0000:3b:00.0"
    assert gpu_pci_address(1, 0xDC, 0x1F) == "0001:dc:1f.0"


def test_core_share_keeps_hyperthread_siblings_together():
    # 4 cores with siblings 0/4, 1/5, 2/6, 3/7 (Linux numbers the second threads last).
    core_of = {cpu: cpu % 4 for cpu in range(8)}
    shares = [core_share(list(range(8)), rank, 2, core_of) for rank in range(2)]
    assert shares == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert num_cores(shares[0], core_of) == 2 and num_cores(shares[0]) == 4
    # Fewer cores than ranks: CPUs are split one by one.
    core_of = {0: "0,1", 1: "0,1"}
    assert [core_share([0, 1], rank, 2, core_of) for rank in range(2)] == [[0], [1]]


def test_physical_cores_reads_this_machine():
    cpus = sorted(os.sched_getaffinity(0))
    core_of = physical_cores(cpus)
    assert set(core_of) == set(cpus)
    assert all(cpu in parse_cpulist(core_of[cpu]) for cpu in cpus)


def test_numa_share_splits_the_cores_near_the_gpu():
    # Two GPUs on a NUMA node with cores 0-7 and their hyperthreads 32-39 (siblings c, c+32);
    # the task may use 0-63. Each rank gets 4 whole cores.
    near, core_of = "0-7,32-39", {cpu: cpu % 32 for cpu in range(64)}
    shares = [numa_share(near, list(range(64)), position, 2, core_of) for position in range(2)]
    assert shares == [[0, 1, 2, 3, 32, 33, 34, 35], [4, 5, 6, 7, 36, 37, 38, 39]]
    # Only the allowed CPUs near the GPU count (a Slurm task given CPUs 4-7 and 36-39).
    assert numa_share(near, [4, 5, 6, 7, 36, 37, 38, 39, 40], 1, 2) == [36, 37, 38, 39]
    assert numa_share(near, [4, 5, 6, 7, 36, 37, 38, 39, 40], 1, 2, core_of) == [6, 7, 38, 39]
    # The node does not say, or too few allowed CPUs near the GPU for one each.
    assert numa_share("", list(range(8)), 0, 1) is None
    assert numa_share("0-7", [8, 9, 10], 0, 1) is None
    assert numa_share("0-1", [0, 1], 0, 3) is None


def host_report(cpulists: list[str], cpus=tuple(range(16)), host="node1"):
    return [(host, cpus, cpulist) for cpulist in cpulists]


def test_rank_share_for_gpu_ranks_follows_their_numa_node():
    # 4 GPUs: 0 and 1 near CPUs 0-7, 2 and 3 near CPUs 8-15 (a two-socket node).
    everyone = host_report(["0-7", "0-7", "8-15", "8-15"])
    shares = [rank_share(everyone, rank, rank, 4) for rank in range(4)]
    assert shares == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    # GPUs listed out of NUMA order: each rank still lands near its own GPU.
    everyone = host_report(["8-15", "0-7", "8-15", "0-7"])
    shares = [rank_share(everyone, rank, rank, 4) for rank in range(4)]
    assert shares == [[8, 9, 10, 11], [0, 1, 2, 3], [12, 13, 14, 15], [4, 5, 6, 7]]


def test_rank_share_for_gpu_ranks_without_numa_information_splits_all_cpus():
    everyone = host_report(["", "", "", ""])
    shares = [rank_share(everyone, rank, rank, 4) for rank in range(4)]
    assert shares == [core_share(list(range(16)), rank, 4) for rank in range(4)]
    # One GPU's node has no allowed CPU near it: no NUMA shares (they would overlap the
    # fallback's), every rank splits all CPUs.
    everyone = host_report(["0-7", "0-7", "16-23", "16-23"])
    shares = [rank_share(everyone, rank, rank, 4) for rank in range(4)]
    assert shares == [core_share(list(range(16)), rank, 4) for rank in range(4)]


def test_rank_share_on_a_two_socket_node_with_hyperthreads():
    # 8 GPUs, 2 sockets of 56 cores, CPU c and c+112 siblings; GPUs 0-3 near socket 0
    # (0-55,112-167), GPUs 4-7 near socket 1: 14 whole cores per rank, near its GPU.
    core_of = {cpu: cpu % 112 for cpu in range(224)}
    everyone = host_report(["0-55,112-167"] * 4 + ["56-111,168-223"] * 4, cpus=tuple(range(224)))
    shares = [rank_share(everyone, rank, rank, 8, core_of) for rank in range(8)]
    assert shares[0] == [*range(14), *range(112, 126)]
    assert shares[5] == [*range(70, 84), *range(182, 196)]
    assert sorted(cpu for share in shares for cpu in share) == list(range(224))
    assert all(num_cores(share, core_of) == 14 for share in shares)


def test_rank_share_leaves_launcher_bound_or_odd_layouts_alone():
    # srun --cpu-bind gave each task its own CPUs: not ours to change.
    everyone = [("node1", (0, 1), "0-7"), ("node1", (2, 3), "0-7")]
    assert rank_share(everyone, 0, 0, 2) is None
    # Two nodes of two ranks each: each rank is placed on its own node only.
    everyone = host_report(["", ""], host="a") + host_report(["", ""], host="b")
    assert rank_share(everyone, 3, 1, 2) == core_share(list(range(16)), 1, 2)
    # A lone rank on a host, or fewer cores than ranks.
    assert rank_share(host_report([""]), 0, 0, 1) is None
    assert rank_share(host_report(["", "", ""], cpus=(0, 1)), 0, 0, 3) is None
