"""Rank 0 works alone, every rank learns the result or the error: on 2 real gloo ranks."""

from __future__ import annotations

import os

import pytest

from tests.helpers import TINY, run_ranks, run_train
from train.collectives import RankZeroError, on_rank_zero


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
    errors = [line for line in result.stderr.splitlines() if line.startswith("hashrec: error:")]
    assert len(errors) == 2, result.stderr[-3000:]
    assert all("plan does not fit: the tables do not fit on 2 x cpu ranks" in e for e in errors)
    # torchrun's own report of a failed worker is its one traceback; none from the ranks.
    assert result.stderr.count("Traceback") == 1 and "ChildFailedError" in result.stderr
