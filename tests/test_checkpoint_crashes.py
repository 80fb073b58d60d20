"""A save cut short at each of its points: the next resume=auto start recovers, nothing newer
is lost. The crash is real: train/checkpoint.py's test-only fault hook (HASHREC_CHECKPOINT_FAULT)
makes the job exit with os._exit at the named point, as a killed process would."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY, run_train
from train.checkpoint import FAULT_ENV, FAULT_EXIT_CODE, FAULT_RANK_ENV

BASE = [*TINY, "trainer.eval_every=0", "logger.log_every=1"]
CLEAN = re.compile(r"step_\d{8}")


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory) -> Path:
    """A run directory with one checkpoint, step 4."""
    run_dir = tmp_path_factory.mktemp("first") / "run"
    result = run_train([*BASE, "trainer.steps=4", f"hydra.run.dir={run_dir}"], cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


# (crash point, the crashed resume's steps, the newest complete step it must leave). Steps=4
# resumes at the last step, whose final save writes step 4 again: the same-step replacement.
CASES = [
    ("after_shards", 8, 4),
    ("after_meta", 8, 8),
    ("between_renames", 4, 4),
    ("after_renames", 4, 4),
    ("while_pruning", 8, 8),
]


@pytest.mark.parametrize("point, steps, newest", CASES, ids=[case[0] for case in CASES])
def test_a_save_cut_short_is_recovered_by_the_next_start(tmp_path, four_steps, point, steps, newest):
    run_dir = tmp_path / "run"
    shutil.copytree(four_steps, run_dir)
    crashed = run_train(
        [*BASE, f"trainer.steps={steps}", "checkpoint.every_steps=4", "checkpoint.keep=1",
         "trainer.resume=auto", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env={FAULT_ENV: f"{point}@{steps}"},
    )
    assert crashed.returncode == FAULT_EXIT_CODE, crashed.stderr[-2000:]
    restarted = run_train(
        [*BASE, "trainer.steps=12", "checkpoint.keep=1", "trainer.resume=auto",
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
    )
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{newest:08d}'} at step {newest}" in restarted.stdout
    left = sorted(path.name for path in (run_dir / "checkpoints").glob("step_*"))
    assert left == ["step_00000012"], left  # keep=1, and no leftovers of the crash


def test_one_rank_dying_mid_save_is_recovered_under_torchrun(tmp_path):
    """Rank 1 dies once its shard of step 8 is written (rank 0's too). torchrun ends rank 0
    (its report names rank 1 as the root cause), or rank 0 says in one line that it lost a
    rank, whichever comes first; never a traceback. The restart resumes from step 4, the
    newest complete save."""
    run_dir = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    args = [*BASE, "checkpoint.every_steps=4", "trainer.resume=auto", f"hydra.run.dir={run_dir}"]
    crashed = run_train([*args, "trainer.steps=8"], cwd=tmp_path, launcher=torchrun,
                        env={FAULT_ENV: "after_shards@8", FAULT_RANK_ENV: "1"})
    assert crashed.returncode != 0
    assert "exitcode  : 86" in crashed.stderr, crashed.stderr[-3000:]  # rank 1's fault exit
    assert "Error executing job" not in crashed.stderr, crashed.stderr[-3000:]
    restarted = run_train([*args, "trainer.steps=12"], cwd=tmp_path, launcher=torchrun)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000004'} at step 4" in restarted.stdout
    assert not list((run_dir / "checkpoints").glob("*.partial"))
