"""The job as users launch it: ``python -m train`` and ``torchrun -m train``, in subprocesses."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from tests.helpers import TINY, run_train

SUMMARY_KEYS = {
    "world_size", "steps", "samples", "samples_per_sec", "train_loss", "eval_auc",
    "eval_bayes_auc", "eval_ne", "state_digest", "peak_rss_bytes", "embedding_bytes",
    "embedding_bytes_per_rank", "sharding", "hashing", "wandb_dir",
}
QUICK = [*TINY, "trainer.steps=30", "trainer.eval_every=15", "logger.log_every=10"]


def only_summary(root: Path) -> dict:
    paths = list(root.glob("outputs/**/summary.json"))
    assert len(paths) == 1, paths
    return json.loads(paths[0].read_text())


def check_summary(summary: dict, world_size: int) -> None:
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["world_size"] == world_size
    assert summary["steps"] == 30
    assert summary["samples"] == 30 * 16 * world_size
    assert summary["samples_per_sec"] > 0
    assert 0.0 < summary["eval_auc"] <= 1.0
    assert 0.5 < summary["eval_bayes_auc"] <= 1.0
    assert summary["peak_rss_bytes"] > 0
    assert len(summary["embedding_bytes_per_rank"]) == world_size
    assert sum(summary["embedding_bytes_per_rank"]) == summary["embedding_bytes"]
    assert len(summary["state_digest"]) == 16
    assert len(summary["evals"]) == 2


def test_python_m_train_single_process(tmp_path):
    result = run_train(QUICK, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = only_summary(tmp_path)
    check_summary(summary, 1)
    assert "sharding plan" in result.stdout and "eval  step" in result.stdout
    assert "Bayes-optimal eval AUC" in result.stdout


def test_torchrun_two_ranks_row_wise(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    result = run_train(
        [*QUICK, "sharding=row_wise"],
        cwd=tmp_path,
        launcher=[torchrun, "--standalone", "--nproc_per_node", "2"],
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = only_summary(tmp_path)
    check_summary(summary, 2)
    assert {entry["type"] for entry in summary["sharding"].values()} == {"row_wise"}
    assert all(entry["ranks"] == [0, 1] for entry in summary["sharding"].values())
    # Both ranks resolved the same run directory; rank 0 prints, rank 1 stays quiet.
    assert len(list(tmp_path.glob("outputs/**/.hydra"))) == 1
    assert result.stdout.count("sharding plan") == 1


def test_same_seed_same_state_digest(tmp_path):
    digests = []
    for name in ("a", "b"):
        run_dir = tmp_path / name
        run_dir.mkdir()
        result = run_train([*QUICK, "trainer.steps=12", "trainer.eval_every=0"], cwd=run_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        digests.append(json.loads(next(run_dir.glob("outputs/**/summary.json")).read_text())["state_digest"])
    assert digests[0] == digests[1]
    other = tmp_path / "c"
    other.mkdir()
    result = run_train([*QUICK, "trainer.steps=12", "trainer.eval_every=0", "trainer.seed=1"], cwd=other)
    assert json.loads(next(other.glob("outputs/**/summary.json")).read_text())["state_digest"] != digests[0]


def test_plan_only_prints_plan_and_does_not_train(tmp_path):
    result = run_train([*TINY, "plan_only=true", "sharding=mixed", "sharding.mixed_row_threshold=40"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sharding plan" in result.stdout
    assert "row_wise" in result.stdout and "table_wise" in result.stdout
    assert "step " not in result.stdout


def test_bf16_dense_path_trains_and_matches_fp32_quality(tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        run_dir = tmp_path / precision
        run_dir.mkdir()
        result = run_train([*QUICK, f"trainer.precision={precision}"], cwd=run_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[precision] = only_summary(run_dir)
    assert runs["bf16"]["precision"] == "bf16" and runs["fp32"]["precision"] == "fp32"
    # Same data and init; bf16 rounding moves the loss a little, not the outcome.
    assert abs(runs["bf16"]["train_loss"] - runs["fp32"]["train_loss"]) < 0.05


# The default job after 300 steps (307,200 samples) ends this close to the planted data's
# Bayes AUC. Measured gaps (Bayes - eval AUC, 8,192 eval samples, AUC noise sd ~0.005):
# seeds 0, 1, 2: 0.042, 0.034, 0.042. Broken models over the same budget: embeddings barely
# trained (optim.embedding_lr=1e-6) 0.128, dense layers barely trained (optim.dense_lr=1e-6)
# 0.110. A margin of 0.07 leaves both sides about 5 noise sd away.
LEARNING_BUDGET = ["trainer.steps=300", "trainer.eval_every=300", "logger.mode=disabled"]
BAYES_AUC_MARGIN = 0.07


def _bayes_gap(tmp_path: Path, overrides: list[str]) -> float:
    result = run_train([*LEARNING_BUDGET, *overrides, f"hydra.run.dir={tmp_path}/run"],
                       cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    return summary["eval_bayes_auc"] - summary["eval_auc"]


def test_default_model_learns_the_planted_signal(tmp_path):
    gap = _bayes_gap(tmp_path, [])
    assert gap < BAYES_AUC_MARGIN, f"eval AUC {gap:.4f} below the Bayes AUC after 300 steps"


def test_a_model_whose_embeddings_do_not_learn_misses_the_margin(tmp_path):
    """The margin above is tight enough to catch a broken model."""
    assert _bayes_gap(tmp_path, ["optim.embedding_lr=0.000001"]) > BAYES_AUC_MARGIN
