"""One rank's error stops every rank within seconds, and the job's output names it.

A bad Parquet row on rank 1's row group is met by rank 1 alone, mid-run, while rank 0 waits
for it in the step's collectives (train/rank_failures.py). Under torchrun and under srun,
rank 1 prints its line and rank 0 stops naming it, instead of a gloo "Connection closed by
peer" traceback. Where the waiting rank never hears of the loss by itself (an nccl collective
waits until its timeout), the watching thread ends it: shown with two plain processes and no
launcher that could kill the waiting one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from tests.helpers import REPO, free_port, run_train
from tests.test_criteo import write_parquet

# Row 5 of row group 5: rank 1's third row group (ranks take every other one), about 20
# steps into a 2-rank run.
NAN_ROW = 5005
RANK_1_LINE = "part-0.parquet row group 5, row 5: dense feature I3 is nan"


def assert_rank_1_named_by_both(output: str) -> None:
    assert f"hashrec: error: {RANK_1_LINE}" in output, output[-3000:]  # rank 1, its own line
    assert f"hashrec: error: rank 1 failed: {RANK_1_LINE}" in output, output[-3000:]  # rank 0
    assert "Connection closed by peer" not in output, output[-3000:]
    assert "Error executing job" not in output, output[-3000:]  # an exception left Hydra's main


def test_bad_row_on_one_rank_stops_both_under_torchrun(tmp_path):
    overrides = write_parquet(tmp_path, nan_at=NAN_ROW)
    result = run_train(
        [*overrides, "trainer.steps=40", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path,
        timeout=300, launcher=[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"],
    )
    assert result.returncode != 0
    assert "step      10/40" in result.stdout, result.stdout[-2000:]  # failed mid-run
    assert_rank_1_named_by_both(result.stderr)


def two_plain_ranks(script: str) -> list[subprocess.Popen]:
    """``script`` as ranks 0 and 1 of a gloo job, started without a launcher (nothing ends
    one rank when the other fails)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    return [
        subprocess.Popen([sys.executable, "-c", script], env={**env, "RANK": str(rank)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]


# Two plain processes: rank 1 fails and exits; rank 0 sleeps as a rank blocked in an nccl
# collective would (the GIL released, no error of its own to come).
WAITING_RANK = """
import os, sys, time
import torch.distributed as dist
from train.rank_failures import watch_rank_failures
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
channel = watch_rank_failures(rank, 2)
dist.barrier()
if rank == 1:
    channel.explain(ValueError("row 7 of part-3.parquet: label is 2"))
    print("rank 1 published", flush=True)
    os._exit(2)
time.sleep(120)
print("rank 0 slept through it", flush=True)
"""


def test_a_rank_stuck_waiting_is_ended_naming_the_failed_rank(tmp_path):
    ranks = two_plain_ranks(WAITING_RANK)
    _, rank_1_err = ranks[1].communicate(timeout=60)
    assert ranks[1].returncode == 2, rank_1_err
    published = time.monotonic()
    try:
        rank_0_out, rank_0_err = ranks[0].communicate(timeout=30)
    finally:
        ranks[0].kill()
    waited = time.monotonic() - published
    assert ranks[0].returncode == 1, rank_0_out + rank_0_err
    assert rank_0_err.strip().splitlines()[-1] == (
        "hashrec: error: rank 1 failed: ValueError: row 7 of part-3.parquet: label is 2"
    )
    # One poll (1 s) and the grace the main thread gets to fail by itself (3 s), plus start-up
    # slack on a loaded machine; the sleep it ended was 120 s.
    assert waited < 15, waited


# Rank 1 dies without a word (as if killed) while rank 0 waits in a gloo all_reduce.
SILENT_DEATH = """
import os, torch
import torch.distributed as dist
from train.rank_failures import watch_rank_failures
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
channel = watch_rank_failures(rank, 2)
dist.barrier()
if rank == 1:
    os._exit(9)
try:
    dist.all_reduce(torch.ones(1))
except Exception as error:
    print(channel.explain(error))
"""


def test_a_rank_that_dies_silently_is_reported_as_lost_in_one_line(tmp_path):
    ranks = two_plain_ranks(SILENT_DEATH)
    outputs = [rank.communicate(timeout=60) for rank in ranks]
    explained = outputs[0][0].strip()
    # gloo says "closed" or "reset" depending on where the read was.
    assert re.fullmatch(
        r"another rank ended without a message \(killed, out of memory or crashed: see its "
        r"log\); rank 0 lost it in a collective \(RuntimeError: Connection (closed|reset) by peer\)",
        explained,
    ), outputs[0]
