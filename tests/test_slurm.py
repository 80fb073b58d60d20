"""sbatch for real: the CPU sbatch script with 2 tasks on a one-node Slurm on localhost."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, TINY, free_port
from tests.slurm_cluster import LocalSlurm, ensure_slurm_installed


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = ensure_slurm_installed()
    if reason:
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), free_port(), free_port())
    cluster.start()
    yield cluster
    cluster.stop()


def test_cpu_sbatch_two_tasks_trains_and_writes_summary(slurm, tmp_path):
    env = {
        **slurm.env,
        "HASHREC_PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
        "HASHREC_ENV_FILE": str(REPO / "slurm" / "env.sh"),
    }
    overrides = [*TINY, "trainer.steps=20", "trainer.eval_every=10", "sharding=row_wise",
                 "logger.mode=disabled", f"hydra.run.dir={tmp_path}/outputs/slurm-${{oc.env:SLURM_JOB_ID}}"]
    result = subprocess.run(
        ["sbatch", "--wait", "--parsable", f"--chdir={REPO}", f"--output={tmp_path}/job-%j.out",
         str(REPO / "slurm" / "train_cpu.sbatch"), *overrides],
        env=env, capture_output=True, text=True, timeout=600,
    )
    log_files = list(tmp_path.glob("job-*.out"))
    log = log_files[0].read_text() if log_files else ""
    assert result.returncode == 0, result.stderr + log[-3000:]
    job_id = result.stdout.strip().split(";")[0]
    summary_path = tmp_path / "outputs" / f"slurm-{job_id}" / "summary.json"
    assert summary_path.exists(), log[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["world_size"] == 2
    assert summary["steps"] == 20
    assert "sharding plan" in log and "eval  step" in log


def test_submitit_sweep_submits_one_job_per_point(slurm, tmp_path):
    sweep_dir = tmp_path / "multirun"
    result = subprocess.run(
        [sys.executable, "-m", "train", "-m", "hydra/launcher=slurm_cpu", "trainer.seed=0,1",
         *TINY, "trainer.steps=10", "trainer.eval_every=0", "logger.mode=disabled",
         f"hydra.sweep.dir={sweep_dir}"],
        env={**slurm.env, "PYTHONPATH": str(REPO)}, cwd=tmp_path,
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads((sweep_dir / str(i) / "summary.json").read_text()) for i in (0, 1)]
    assert [s["world_size"] for s in summaries] == [2, 2]  # tasks_per_node=2 in slurm_cpu
    assert summaries[0]["state_digest"] != summaries[1]["state_digest"]  # different seeds
