"""The collectives of train/collectives.py on 2 real gloo ranks: rank 0 works alone and every
rank learns the result or the error; gathers, reductions and the first error agree on every
rank."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import TINY, run_ranks, run_train
from train.collectives import (
    RankZeroError,
    barrier,
    first_error,
    gather_concat,
    gather_concat_on_rank_zero,
    gather_stack,
    global_mean,
    on_rank_zero,
    reduce_over_ranks,
)


class NeedsTwoArguments(Exception):
    def __init__(self, first: str, second: str) -> None:
        super().__init__(f"{first} and {second}")


def _pid_and_errors(rank: int, world_size: int) -> None:
    # The result is rank 0's own: every rank sees rank 0's process id.
    pids = on_rank_zero(lambda: [os.getpid(), rank])
    assert pids[1] == 0
    assert (pids[0] == os.getpid()) == (rank == 0)

    def fails() -> None:
        raise ValueError("data.train_path: row 7 has 39 fields, expected 40")

    with pytest.raises(ValueError, match=r"^data.train_path: row 7 has 39 fields, expected 40$"):
        on_rank_zero(fails)

    def fails_oddly() -> None:
        raise NeedsTwoArguments("a", "b")

    expected = NeedsTwoArguments if rank == 0 else RankZeroError
    with pytest.raises(expected, match="a and b"):
        on_rank_zero(fails_oddly)
    # The group still works after errors: the next collective runs normally.
    assert on_rank_zero(lambda: "done") == "done"

    # Gathers, in rank order, on every rank.
    mine = torch.tensor([[rank, 10 + rank]])
    assert gather_concat(mine).tolist() == [[0, 10], [1, 11]]
    assert gather_stack(mine[0]).tolist() == [[0, 10], [1, 11]]
    on_zero = gather_concat_on_rank_zero(mine)
    assert (on_zero.tolist() if rank == 0 else on_zero) == ([[0, 10], [1, 11]] if rank == 0 else None)
    cpu = torch.device("cpu")
    assert reduce_over_ranks(rank + 3, cpu) == 7
    assert reduce_over_ranks(rank + 3, cpu, "max") == 4
    assert reduce_over_ranks(rank + 3, cpu, "min") == 3
    assert global_mean(float(rank), cpu) == 0.5
    # The lowest rank's error, on every rank; None when no rank has one.
    assert first_error(None) is None
    assert first_error("disk full" if rank == 1 else None) == "disk full"
    barrier()


def test_every_rank_gets_rank_zeros_result_or_its_error():
    run_ranks(_pid_and_errors, 2)


def test_a_plan_that_does_not_fit_stops_both_ranks_with_one_line(tmp_path):
    """TorchRec's collective_plan raises on rank 0 only; the other rank used to be left in the
    plan's broadcast, and the job ended in a traceback."""
    result = run_train(
        [*TINY, "sharding=table_wise", "sharding.ddr_cap_bytes=1000", "trainer.steps=5"],
        cwd=tmp_path, timeout=240,
        launcher=[os.path.join(os.path.dirname(os.sys.executable), "torchrun"), "--standalone",
                  "--nproc_per_node", "2"],
    )
    assert result.returncode != 0
    # Both ranks say it (counted as occurrences: the two ranks share one stderr pipe).
    line = "hashrec: error: plan does not fit: the tables do not fit on 2 x cpu ranks"
    assert result.stderr.count(line) == 2, result.stderr[-3000:]
    # torchrun's own report of a failed worker is its one traceback; none from the ranks.
    assert result.stderr.count("Traceback") == 1 and "ChildFailedError" in result.stderr
