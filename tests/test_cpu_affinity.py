"""Each CPU rank on a host gets its own cores, unless the launcher already split them."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import run_ranks
from train.cpu_affinity import core_share, pin_local_rank

pytestmark = pytest.mark.skipif(
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
    share = pin_local_rank(rank, world_size)
    threads = {
        int(tid): sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")
    }
    torch.save({"before": before, "share": share, "threads": threads}, f"{out_path}.{rank}")


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
