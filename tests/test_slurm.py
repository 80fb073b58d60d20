"""sbatch for real: the CPU sbatch script with 2 tasks on a one-node Slurm on localhost.

The pre-emption tests (``pytest -k preempt``) send the signal Slurm sends before a time limit
themselves, once the job has trained a few steps, rather than waiting for a real time limit:
Slurm may send a ``--signal=...@T`` up to a minute early, and a job's start-up time varies
with the machine's load, so a time-limited test would be slow and could see its signal land
before training or after it.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY, free_port
from tests.slurm_cluster import LocalSlurm, ensure_slurm_installed
from tests.test_criteo import write_parquet
from tests.test_rank_failures import NAN_ROW, assert_rank_1_named_by_both


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = ensure_slurm_installed()
    if reason:
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), free_port(), free_port())
    cluster.start()
    yield cluster
    cluster.stop()


def sbatch_env(slurm) -> dict[str, str]:
    return {
        **slurm.env,
        "HASHREC_PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
        "HASHREC_ENV_FILE": str(REPO / "slurm" / "env.sh"),
    }


def test_cpu_sbatch_two_tasks_trains_and_writes_summary(slurm, tmp_path):
    env = sbatch_env(slurm)
    overrides = [*TINY, "trainer.steps=20", "trainer.eval_every=10", "sharding=row_wise",
                 f"hydra.run.dir={tmp_path}/outputs/slurm-${{oc.env:SLURM_JOB_ID}}"]
    result = subprocess.run(
        ["sbatch", "--wait", "--parsable", f"--chdir={REPO}", f"--output={tmp_path}/job-%j.out",
         str(REPO / "slurm" / "train_cpu.sbatch"), *overrides],
        env=env, capture_output=True, text=True, timeout=600, check=False,
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


def test_bad_row_on_one_srun_task_stops_both_naming_it(slurm, tmp_path):
    """tests/test_rank_failures.py's bad row on rank 1, under srun: the job fails, both
    tasks' output names rank 1's row, and no rank waits for the dead one."""
    overrides = write_parquet(tmp_path, nan_at=NAN_ROW)
    started = time.monotonic()
    result = subprocess.run(
        ["sbatch", "--wait", "--parsable", f"--chdir={REPO}", f"--output={tmp_path}/job-%j.out",
         str(REPO / "slurm" / "train_cpu.sbatch"), *overrides, "trainer.steps=40",
         f"hydra.run.dir={tmp_path}/outputs/slurm-${{oc.env:SLURM_JOB_ID}}"],
        env=sbatch_env(slurm), capture_output=True, text=True, timeout=300, check=False,
    )
    log = read(next(tmp_path.glob("job-*.out")))
    assert result.returncode != 0, log[-3000:]
    assert "step      10/40" in log, log[-3000:]  # it failed mid-run, not at start
    assert_rank_1_named_by_both(log)
    assert time.monotonic() - started < 240


def test_submitit_sweep_submits_one_job_per_point(slurm, tmp_path):
    sweep_dir = tmp_path / "multirun"
    result = subprocess.run(
        [sys.executable, "-m", "train", "-m", "hydra/launcher=slurm_cpu", "trainer.seed=0,1",
         *TINY, "trainer.steps=10", "trainer.eval_every=0", "logger.mode=disabled",
         f"hydra.sweep.dir={sweep_dir}"],
        env={**slurm.env, "PYTHONPATH": str(REPO)}, cwd=tmp_path,
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads((sweep_dir / str(i) / "summary.json").read_text()) for i in (0, 1)]
    assert [s["world_size"] for s in summaries] == [2, 2]  # tasks_per_node=2 in slurm_cpu
    assert summaries[0]["state_digest"] != summaries[1]["state_digest"]  # different seeds
    # The submitting process writes the sweep's table once both jobs have ended.
    with open(sweep_dir / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["job_num"], r["status"], r["trainer.seed"]) for r in rows] == [
        ("0", "completed", "0"), ("1", "completed", "1")]
    assert [r["state_digest"] for r in rows] == [s["state_digest"] for s in summaries]


# Pre-emption. 300 steps of the tiny model: the signal goes out once step 50 is logged, and at
# the 12-50 steps/s this machine manages under load the ranks stop well before step 300.
PREEMPT_STEPS = 300
PREEMPT = [*TINY, f"trainer.steps={PREEMPT_STEPS}", "trainer.eval_every=0", "logger.log_every=10",
           "sharding=row_wise", "checkpoint.every_steps=100"]
SIGNAL_AFTER = re.compile(rf"^step\s+50/{PREEMPT_STEPS}\b", re.MULTILINE)
RESUMED = re.compile(r"^resumed from \S+ at step (\d+)$", re.MULTILINE)
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def job_info(slurm, job_id: str) -> dict[str, str]:
    """JobState, Restarts, ExitCode, ... of a job Slurm still remembers (MinJobAge)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=slurm.env,
                         capture_output=True, text=True, timeout=30, check=False).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def at(log: str, text: str) -> int:
    """Where ``text`` first appears in the log (which must have it)."""
    assert text in log, f"no {text!r} in the log:\n{log[-3000:]}"
    return log.index(text)


def wait_for_log_line(slurm, job_id: str, log: Path, pattern: re.Pattern, timeout: float) -> None:
    deadline = time.time() + timeout
    while not pattern.search(read(log)):
        state = job_info(slurm, job_id).get("JobState")
        tail = read(log)[-3000:]
        assert state not in ENDED, f"job {job_id} ended ({state}) before {pattern.pattern}:\n{tail}"
        assert time.time() < deadline, f"no {pattern.pattern} after {timeout}s:\n{tail}"
        time.sleep(0.2)


def wait_for_end(slurm, job_id: str, log: Path, timeout: float) -> dict[str, str]:
    deadline = time.time() + timeout
    while (info := job_info(slurm, job_id)).get("JobState") not in ENDED:
        assert time.time() < deadline, f"job {job_id} {info.get('JobState')}:\n{read(log)[-3000:]}"
        time.sleep(0.5)
    return info


def submit(slurm, out_dir: Path, script: str = "train_cpu.sbatch", *options: str,
           env: dict[str, str] | None = None) -> str:
    """An sbatch script of slurm/ with PREEMPT; its log is out_dir/job-<id>.out and its run
    directory out_dir/outputs/slurm-<id> (keyed by the job id, as by default)."""
    result = subprocess.run(
        ["sbatch", "--parsable", *options, f"--chdir={REPO}", f"--output={out_dir}/job-%j.out",
         str(REPO / "slurm" / script), *PREEMPT,
         f"hydra.run.dir={out_dir}/outputs/slurm-${{oc.env:SLURM_JOB_ID}}"],
        env={**sbatch_env(slurm), **(env or {})}, capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def resumed_step(log: str) -> int:
    """The step the requeued run resumed from: the one the ranks saved when they stopped,
    strictly inside the run (else the signal missed training)."""
    resumed = [int(step) for step in RESUMED.findall(log)]
    assert len(resumed) == 1, log[-3000:]
    step = resumed[0]
    assert 0 < step < PREEMPT_STEPS, f"resumed at step {step}: the signal missed training"
    return step


@pytest.fixture(scope="module")
def uninterrupted_digest(slurm, tmp_path_factory) -> str:
    """state_digest of PREEMPT trained straight through by the same sbatch script."""
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    job_id = submit(slurm, out_dir)
    log = out_dir / f"job-{job_id}.out"
    info = wait_for_end(slurm, job_id, log, timeout=180)
    assert info["JobState"] == "COMPLETED", read(log)[-3000:]
    summary = json.loads((out_dir / "outputs" / f"slurm-{job_id}" / "summary.json").read_text())
    return summary["state_digest"]


def preempt_sbatch_job(slurm, out_dir: Path, job_id: str, uninterrupted_digest: str) -> None:
    """Signal the job as Slurm does before its time limit, once it has trained 50 steps; it
    must save, stop, requeue itself, resume and end like the uninterrupted run."""
    log_path = out_dir / f"job-{job_id}.out"
    wait_for_log_line(slurm, job_id, log_path, SIGNAL_AFTER, timeout=120)
    # What --signal=B:USR2@T does T seconds before the time limit: USR2 to the batch shell only.
    subprocess.run(["scancel", "--signal=USR2", "--batch", job_id], env=slurm.env, timeout=30,
                   check=True)
    info = wait_for_end(slurm, job_id, log_path, timeout=180)
    log = read(log_path)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert info["Restarts"] == "1", f"requeued {info['Restarts']} times:\n{log[-3000:]}"
    step = resumed_step(log)
    # The ranks saved that step and stopped; only then was the job requeued (requeueing
    # first kills them after KillWait, mid-save), and the requeued job started from it.
    # (Rank 1's "stopped" line on stderr may come before rank 0's checkpoint line on stdout:
    # both are ordered against the requeue, which the batch shell prints after srun ended.)
    stopped = at(log, f"stopped by signal at step {step};")
    requeued = at(log, "requeueing job")
    assert at(log, f"checkpoint: step {step} ->") < requeued, log[-3000:]
    assert stopped < requeued, f"requeued before the ranks had stopped:\n{log[-3000:]}"
    assert requeued < at(log, "starts (restart 1)"), log[-3000:]
    summary = json.loads((out_dir / "outputs" / f"slurm-{job_id}" / "summary.json").read_text())
    assert summary["steps"] == PREEMPT_STEPS
    assert summary["state_digest"] == uninterrupted_digest


def test_preempt_cpu_sbatch_saves_then_requeues_and_resumes_like_uninterrupted(
    slurm, tmp_path, uninterrupted_digest
):
    preempt_sbatch_job(slurm, tmp_path, submit(slurm, tmp_path), uninterrupted_digest)


def test_preempt_gpu_sbatch_torchrun_hands_the_signal_to_its_ranks(
    slurm, tmp_path, uninterrupted_digest
):
    """slurm/train.sbatch's launch on one node without GPUs: one srun task whose torchrun
    runs the 2 ranks. torchrun must stay in charge: pass SIGUSR2 on to its ranks and wait for
    them (--shutdown-timeout). Without SIGUSR2 in its --signals-to-handle it dies of the
    signal; here srun's own signal still reaches the orphaned ranks, which save, so only
    torchrun's log line tells."""
    job_id = submit(
        slurm, tmp_path, "train.sbatch", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2",
        env={"HASHREC_NPROC_PER_NODE": "2", "RDZV_PORT": str(free_port())},
    )
    preempt_sbatch_job(slurm, tmp_path, job_id, uninterrupted_digest)
    log = read(tmp_path / f"job-{job_id}.out")
    assert "closing signal SIGUSR2" in log, log[-3000:]  # torch 2.13's elastic agent says so


def test_preempt_submitit_sweep_point_is_requeued_and_resumes_like_uninterrupted(
    slurm, tmp_path, uninterrupted_digest
):
    sweep_dir = tmp_path / "multirun"
    with open(tmp_path / "launcher.out", "w") as launcher_out:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "train", "-m", "hydra/launcher=slurm_cpu", *PREEMPT,
             f"hydra.sweep.dir={sweep_dir}"],
            env={**slurm.env, "PYTHONPATH": str(REPO)}, cwd=tmp_path,
            stdout=launcher_out, stderr=subprocess.STDOUT, text=True,
        )
    try:
        deadline = time.time() + 60
        while not (logs := list(sweep_dir.glob(".submitit/*/*_0_log.out"))):
            assert launcher.poll() is None, read(tmp_path / "launcher.out")[-3000:]
            assert time.time() < deadline, "the sweep job did not start"
            time.sleep(0.2)
        log_path = logs[0]
        job_id = log_path.parent.name  # submitit's folder for the job: its id
        wait_for_log_line(slurm, job_id, log_path, SIGNAL_AFTER, timeout=120)
        # What submitit's --signal=USR2@<signal_delay_s> does: USR2 to every task.
        subprocess.run(["scancel", "--signal=USR2", job_id], env=slurm.env, timeout=30, check=True)
        info = wait_for_end(slurm, job_id, log_path, timeout=180)
        # submitit's client learns that the job ended from its tasks' result files, so a job
        # that failed without writing them (not requeued) would leave it waiting (no sacct
        # here): wait for the launcher only once Slurm says the job completed.
        assert info["JobState"] == "COMPLETED", read(log_path)[-3000:]
        launcher.wait(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    log = read(log_path)
    assert launcher.returncode == 0, read(tmp_path / "launcher.out")[-3000:] + log[-3000:]
    assert info["Restarts"] == "1", f"requeued {info['Restarts']} times:\n{log[-3000:]}"
    step = resumed_step(log)
    # The ranks saved that step before submitit's handler got the signal and requeued.
    handed_on = at(log, f"checkpoint of step {step} saved; handing SIGUSR2 on to "
                        "SignalHandler.checkpoint_and_try_requeue")
    assert at(log, f"checkpoint: step {step} ->") < handed_on, log[-3000:]
    assert handed_on < at(log, "Requeued job"), log[-3000:]
    summary = json.loads((sweep_dir / "0" / "summary.json").read_text())
    assert summary["steps"] == PREEMPT_STEPS
    assert summary["state_digest"] == uninterrupted_digest
