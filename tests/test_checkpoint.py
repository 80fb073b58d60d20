"""Checkpoints: exact resume, resharding, pre-emption and crash recovery, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.helpers import REPO, TINY, compose_config, run_ranks, run_train
from train.build import build_sharded_job, feature_groups
from train.checkpoint import choose_checkpoint, load_checkpoint, save_checkpoint
from train.data import planted_data
from train.distributed import DistributedContext
from train.state_digest import state_digest

BASE = [*TINY, "logger.mode=disabled", "trainer.eval_every=0", "logger.log_every=1"]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def losses_by_step(run_output: str) -> dict[int, str]:
    """step -> printed loss, from the plain progress lines (log_every=1)."""
    found = {}
    for line in run_output.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] == "step" and parts[2] == "loss":
            found[int(parts[1].split("/")[0])] = parts[3]
    return found


def test_resumed_run_equals_uninterrupted(tmp_path):
    first = run_train([*BASE, "trainer.steps=12", f"hydra.run.dir={tmp_path}/a"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = run_train(
        [*BASE, "trainer.steps=20", "trainer.resume=auto", f"hydra.run.dir={tmp_path}/a"], cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "at step 12" in resumed.stdout
    straight = run_train([*BASE, "trainer.steps=20", f"hydra.run.dir={tmp_path}/b"], cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]
    after_resume = {s: l for s, l in losses_by_step(straight.stdout).items() if s > 12}
    assert after_resume and losses_by_step(resumed.stdout) == after_resume
    assert summary(tmp_path / "a")["state_digest"] == summary(tmp_path / "b")["state_digest"]
    # Only the newest `checkpoint.keep` (2) complete checkpoints remain.
    kept = sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("step_*"))
    assert kept == ["step_00000012", "step_00000020"]


def test_fresh_run_in_a_used_run_dir_sets_the_old_checkpoints_aside(tmp_path):
    """Without trainer.resume, a second run in the same directory trains from scratch and the
    first run's checkpoints are moved aside, named in one line, not replaced or mixed in."""
    for _ in range(2):
        result = run_train([*BASE, "trainer.steps=4", f"hydra.run.dir={tmp_path}/a"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
    aside = [p for p in (tmp_path / "a").iterdir() if p.name.startswith("checkpoints.previous-")]
    assert len(aside) == 1
    assert f"the earlier run's checkpoints are set aside in {aside[0]}" in result.stdout
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("step_*")) == ["step_00000004"]
    assert (aside[0] / "step_00000004" / "meta.json").exists()
    assert choose_checkpoint("auto", tmp_path / "a") is not None


def test_a_shorter_fresh_run_after_a_longer_one_keeps_and_resumes_its_own(tmp_path):
    """An earlier, longer run left step 12 in the directory: a fresh 4-step run used to prune
    its own checkpoints as soon as they were written (keeping the old higher steps), and
    resume=auto then took the old run's step 12."""
    run_dir = tmp_path / "a"
    longer = run_train([*BASE, "trainer.steps=12", "checkpoint.every_steps=4",
                        f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert longer.returncode == 0, longer.stderr[-2000:]
    shorter = run_train([*BASE, "trainer.steps=4", "checkpoint.every_steps=2",
                         f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert shorter.returncode == 0, shorter.stderr[-2000:]
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000004"]
    run_id = (root / "run_id").read_text().strip()
    assert json.loads((root / "step_00000004" / "meta.json").read_text())["run_id"] == run_id
    resumed = run_train([*BASE, "trainer.steps=6", "trainer.resume=auto",
                         f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {root / 'step_00000004'} at step 4" in resumed.stdout
    assert (root / "run_id").read_text().strip() == run_id  # a resume carries the run over


def _fake_checkpoint(root: Path, step: int, run_id: str) -> Path:
    path = root / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"step": step, "files": {}, "run_id": run_id}))
    return path


def test_another_runs_checkpoint_is_neither_resumed_nor_pruned(tmp_path, capsys):
    from train.checkpoint import _prune

    root = tmp_path / "checkpoints"
    foreign = _fake_checkpoint(root, 12, "other")
    _fake_checkpoint(root, 2, "ours")
    _fake_checkpoint(root, 4, "ours")
    (root / "run_id").write_text("ours\n")
    info = choose_checkpoint("auto", tmp_path)
    assert info is not None and info.step == 4
    assert f"skipping checkpoint {foreign}, written by another run" in capsys.readouterr().out
    _prune(root, keep=1, step=4)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000012"]


def _job(rank: int, world_size: int, sharding: str):
    config = compose_config([*BASE, f"sharding={sharding}"])
    groups = feature_groups(config.features)
    context = DistributedContext(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")
    return config, groups, build_sharded_job(config, groups, context)


def _train_steps(job, data, rank: int, steps: range) -> None:
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    pipeline = TrainPipelineSparseDist(job.model, job.optimizer, torch.device("cpu"), pipeline_postproc=True)
    batches = iter([data.batch("train", rank, step)[0] for step in steps])
    for _ in steps:
        pipeline.progress(batches)


def _write_row_wise(rank: int, world_size: int, run_dir: str) -> None:
    config, groups, job = _job(rank, world_size, "row_wise")
    _train_steps(job, planted_data(config, groups), rank, range(3))
    digest = state_digest(job.model, job.optimizer, rank)
    save_checkpoint(Path(run_dir), 3, job.model, job.optimizer, keep=2)
    if rank == 0:
        (Path(run_dir) / "digest").write_text(digest)


def _read_table_wise(rank: int, world_size: int, run_dir: str) -> None:
    config, groups, job = _job(rank, world_size, "table_wise")
    info = choose_checkpoint("auto", Path(run_dir))
    load_checkpoint(info, job.model, job.optimizer)
    (Path(run_dir) / "loaded_digest").write_text(state_digest(job.model, job.optimizer, rank))
    _train_steps(job, planted_data(config, groups), rank, range(3, 6))  # and training goes on


def test_two_rank_row_wise_checkpoint_loads_into_one_rank_table_wise(tmp_path):
    run_ranks(_write_row_wise, 2, str(tmp_path))
    run_ranks(_read_table_wise, 1, str(tmp_path))
    assert (tmp_path / "loaded_digest").read_text() == (tmp_path / "digest").read_text()


def _torchrun(nproc: int, args: list[str], cwd: Path, max_restarts: int = 0) -> list[str]:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    return [torchrun, "--standalone", f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}",
            "-m", "train", *args]


def test_sigkill_of_one_rank_restarts_and_finishes_like_uninterrupted(tmp_path):
    args = [*BASE, "trainer.steps=60", "checkpoint.every_steps=10", "trainer.resume=auto",
            "logger.log_every=10", "sharding=row_wise"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    faulty = subprocess.Popen(
        _torchrun(2, [*args, f"hydra.run.dir={tmp_path}/faulty"], tmp_path, max_restarts=1),
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    checkpoint = tmp_path / "faulty" / "checkpoints" / "step_00000020"
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and faulty.poll() is None:
        time.sleep(0.05)
    assert checkpoint.exists(), "no checkpoint at step 20"
    victims = [
        child for child in psutil.Process(faulty.pid).children(recursive=True)
        if child.environ().get("RANK") == "1"
    ]
    assert victims
    victims[0].send_signal(signal.SIGKILL)
    output, _ = faulty.communicate(timeout=600)
    assert faulty.returncode == 0, output[-3000:]
    assert "resumed from" in output
    straight = subprocess.run(
        _torchrun(2, [*args, f"hydra.run.dir={tmp_path}/straight"], tmp_path),
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert summary(tmp_path / "faulty")["state_digest"] == summary(tmp_path / "straight")["state_digest"]


def test_sigterm_saves_a_checkpoint_then_resume_finishes(tmp_path):
    args = [*BASE, "trainer.steps=100000", "logger.log_every=5", f"hydra.run.dir={tmp_path}/run"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "train", *args], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    for line in process.stdout:  # wait until training is under way
        if line.startswith("step"):
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    assert "stopped by signal at step" in stderr
    step = int(stderr.split("stopped by signal at step ")[1].split(";")[0])
    assert (tmp_path / "run" / "checkpoints" / f"step_{step:08d}" / "meta.json").exists()
    assert not (tmp_path / "run" / "summary.json").exists()
    resumed = run_train([*BASE, f"trainer.steps={step + 5}", "trainer.resume=auto",
                         f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {step}" in resumed.stdout


def _two_checkpoints(tmp_path: Path) -> Path:
    result = run_train([*BASE, "trainer.steps=8", "checkpoint.every_steps=4",
                        f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    return tmp_path / "run" / "checkpoints"


def test_damaged_latest_checkpoint_is_named_and_the_previous_one_used(tmp_path):
    root = _two_checkpoints(tmp_path)
    damaged = next((root / "step_00000008").glob("*.distcp"))
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # truncated copy
    (root / "step_00000012.partial").mkdir()  # a crash in the middle of a write
    result = run_train([*BASE, "trainer.steps=10", "trainer.resume=auto",
                        f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"skipping damaged checkpoint {root / 'step_00000008'}" in result.stdout
    assert "at step 4" in result.stdout
    assert not (root / "step_00000012.partial").exists()
    explicit = run_train([*BASE, "trainer.steps=10", f"trainer.resume={root / 'step_00000008'}",
                          f"hydra.run.dir={tmp_path}/other"], cwd=tmp_path)
    assert explicit.returncode == 2
    assert f"checkpoint {root / 'step_00000008'} cannot be used: file {damaged.name} has" in explicit.stderr


def test_resume_with_an_incompatible_model_names_the_table(tmp_path):
    root = _two_checkpoints(tmp_path)
    result = run_train([*BASE, "trainer.steps=10", f"trainer.resume={root / 'step_00000008'}",
                        "features.groups.user.features.user_id.num_embeddings=65",
                        f"hydra.run.dir={tmp_path}/other"], cwd=tmp_path)
    assert result.returncode == 2
    assert "table user_id is 64 x 8, the model's is 65 x 8" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_full_disk_while_checkpointing_fails_cleanly(tmp_path, small_disk):
    run_dir = small_disk / "run"
    # Leave only a few KiB: the config files fit, the checkpoint does not.
    (small_disk / "filler").write_bytes(b"\0" * (256 * 1024 - 48 * 1024))
    result = run_train([*BASE, "trainer.steps=4", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "cannot write checkpoint" in result.stderr and "No space left on device" in result.stderr
    assert "Traceback" not in result.stderr
    checkpoints = run_dir / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.glob("step_*"))
    assert not (run_dir / "summary.json").exists()


def test_resume_at_the_last_step_finishes_the_job(tmp_path):
    """A job killed after its final checkpoint but before summary.json (in the final eval, in
    W&B's finish) is finished by its restart: evaluated, summarised, exit 0. It used to fail
    with "leaves nothing to train", so a requeued Slurm job failed for ever."""
    run_dir = tmp_path / "a"
    first = run_train([*BASE, "trainer.steps=12", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    finished = summary(run_dir)
    (run_dir / "summary.json").unlink()
    again = run_train([*BASE, "trainer.steps=12", "trainer.resume=auto", f"hydra.run.dir={run_dir}"],
                      cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "at step 12: training is done, finishing the job" in again.stdout
    redone = summary(run_dir)
    assert redone["state_digest"] == finished["state_digest"]
    assert redone["eval_auc"] == finished["eval_auc"] and redone["steps"] == 12


def test_a_stop_signal_at_the_last_step_lets_the_job_end(tmp_path):
    """The stop vote at the last step is skipped: the job goes on to its final eval and
    summary instead of saving and exiting 143 with nothing to resume."""
    from train.checkpoint_policy import CheckpointPolicy

    config = compose_config(BASE)
    policy = CheckpointPolicy(tmp_path, None, None, config.checkpoint, total_steps=10,
                              say=lambda _: None)
    policy.signal_received = signal.SIGUSR2
    policy._save_checked = lambda step: None  # no model here: only the decision is tested
    assert policy.after_step(10) is False
    assert policy.after_step(5) is True


def test_a_second_job_in_a_used_run_dir_refuses_until_the_first_is_dead(tmp_path):
    run_dir = tmp_path / "run"
    args = [*BASE, "logger.log_every=5", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(
        [sys.executable, "-m", "train", *args, "trainer.steps=100000"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        for line in first.stdout:  # wait until training is under way
            if line.startswith("step"):
                break
        first_overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
        assert "trainer.steps=100000" in first_overrides
        second = run_train([*args, "trainer.steps=2"], cwd=tmp_path)
        assert second.returncode == 2, second.stderr[-2000:]
        error_lines = [line for line in second.stderr.splitlines() if line.startswith("hashrec: error")]
        assert len(error_lines) == 1 and "Traceback" not in second.stderr
        assert f"run directory {run_dir} is in use by the job on host {socket.gethostname()}, " \
               f"pid {first.pid}, started " in error_lines[0]
        assert not (run_dir / "summary.json").exists()
        # The refused job wrote nothing there (Hydra's .hydra files included).
        assert (run_dir / ".hydra" / "overrides.yaml").read_text() == first_overrides
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    restarted = run_train([*args, "trainer.steps=2"], cwd=tmp_path)
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert (run_dir / "summary.json").exists()


def _try_the_lock(rank: int, world_size: int, run_dir: str) -> None:
    from train.collectives import on_rank_zero
    from train.run_lock import RunDirInUse, take_run_lock

    try:
        on_rank_zero(take_run_lock, Path(run_dir))
        outcome = "taken"
    except RunDirInUse as error:
        outcome = str(error)
    (Path(run_dir) / f"outcome_{rank}").write_text(outcome)


def test_every_rank_learns_that_the_run_dir_is_in_use(tmp_path):
    from train.run_lock import release_run_lock, take_run_lock

    take_run_lock(tmp_path)  # this process is the running job
    try:
        run_ranks(_try_the_lock, 2, str(tmp_path))
    finally:
        release_run_lock()
    outcomes = [(tmp_path / f"outcome_{rank}").read_text() for rank in range(2)]
    assert outcomes[0] == outcomes[1] and f"pid {os.getpid()}, started" in outcomes[0]


def test_resume_under_another_hashing_names_the_feature(tmp_path):
    """hash and modulo give tables of the same shapes: only the mapping tells them apart."""
    run_dir = tmp_path / "a"
    first = run_train([*BASE, "trainer.steps=4", "hashing=default", f"hydra.run.dir={run_dir}"],
                      cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    result = run_train([*BASE, "trainer.steps=8", "trainer.resume=auto", "hashing=modulo",
                        f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert (f"checkpoint {run_dir / 'checkpoints' / 'step_00000004'} maps the IDs of feature "
            f"ad_id otherwise than this job's hashing") in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unusable_checkpoints_folder_is_one_line(tmp_path):
    """`checkpoints` is a file: every rank used to fail with a NotADirectoryError traceback."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("not a folder")
    result = run_train([*BASE, "trainer.steps=2", "trainer.resume=auto", f"hydra.run.dir={run_dir}"],
                       cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"hashrec: error: cannot prepare the checkpoints folder of {run_dir}" in result.stderr
    assert "Traceback" not in result.stderr
