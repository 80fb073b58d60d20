"""A sweep writes one results table when it ends (train/sweep_results.py), and the trade-off
plot reads it."""

from __future__ import annotations

import csv
import importlib.util
import json
import pickle
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY, run_train
from tests.wandb_records import find_run_files, read_records, read_run
from train.sweep_results import SweepResults, expected_points

# Two points of the tiny job whose tables differ: the ratio sets every hashed table's rows.
RATIOS = ["20000", "40000"]
SWEEP = [*TINY, "trainer.steps=4", "trainer.eval_every=0", "logger.progress_bar=false"]


def read_table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def load_plot_tradeoff():
    path = REPO / "scripts" / "plot_tradeoff.py"
    spec = importlib.util.spec_from_file_location("plot_tradeoff", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_point_sweep_writes_one_row_per_point_with_its_summary(tmp_path):
    sweep_dir = tmp_path / "multirun"
    result = run_train(
        ["-m", f"hashing.compression_ratio={','.join(RATIOS)}", *SWEEP,
         f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"sweep results: {sweep_dir / 'results.csv'} (2 points: 2 completed)" in result.stdout
    rows = read_table(sweep_dir / "results.csv")
    assert [row["job_num"] for row in rows] == ["0", "1"]
    for row, ratio in zip(rows, RATIOS):
        summary = json.loads((sweep_dir / row["dir"] / "summary.json").read_text())
        assert row["status"] == "completed"
        assert row["hashing.compression_ratio"] == ratio
        assert row["overrides"].split()[0] == f"hashing.compression_ratio={ratio}"
        assert row["trainer.steps"] == "4"
        for key in ("eval_auc", "eval_ne", "train_loss", "embedding_bytes", "steps",
                    "peak_rss_bytes", "state_digest"):
            assert row[key] == str(summary[key]), key
        assert float(row["embedding_bytes_hashed"]) == sum(
            entry["bytes_hashed"] for entry in summary["hashing"].values())
        assert float(row["collision_rate/user_id"]) == (
            summary["hashing"]["user_id"]["measured_collision_rate"])
        assert not (sweep_dir / row["dir"] / "profile").exists()  # trainer.profile is off
    assert rows[0]["embedding_bytes"] != rows[1]["embedding_bytes"]
    # The trade-off plot reads the table: one point per row, the method the default hash.
    plot_tradeoff = load_plot_tradeoff()
    points = plot_tradeoff.load_points([sweep_dir])
    assert [(p["method"], p["ratio"]) for p in points] == [("hash", 20000.0), ("hash", 40000.0)]
    assert [p["eval_auc"] for p in points] == [float(row["eval_auc"]) for row in rows]
    # Without the full tables' point there is no reference to compare with.
    with pytest.raises(SystemExit, match="hashing=full"):
        plot_tradeoff.summarise(points)


def test_a_failed_point_ends_the_sweep_and_still_has_its_row(tmp_path):
    """Hydra skips on_multirun_end when a point fails: the table is written on the way out."""
    sweep_dir = tmp_path / "multirun"
    others = [override for override in SWEEP if not override.startswith("trainer.steps=")]
    result = run_train(["-m", "trainer.steps=0,4", *others, f"hydra.sweep.dir={sweep_dir}"],
                       cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "trainer.steps must be > 0" in result.stderr
    rows = read_table(sweep_dir / "results.csv")
    assert [(row["job_num"], row["status"], row["trainer.steps"]) for row in rows] == [
        ("0", "failed", "0"), ("1", "not_run", "4")]
    assert "(2 points: 1 failed, 1 not run)" in result.stdout


def write_point(sweep_dir: Path, number: int, overrides: list[str], summary: dict | None):
    folder = sweep_dir / str(number)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {number}\n")
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))


def test_table_goes_to_an_offline_wandb_run_of_job_type_sweep(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    sweep_dir = tmp_path / "multirun"
    points = expected_points(["optim=sgd,adam", "trainer.steps=3"])
    assert points == [["optim=sgd", "trainer.steps=3"], ["optim=adam", "trainer.steps=3"]]
    write_point(sweep_dir, 0, points[0], {"eval_auc": 0.61, "eval_ne": 0.97, "steps": 3})
    callback = SweepResults(wandb_mode="offline", project="hashrec-test")
    pickle.dumps(callback)  # the submitit launcher pickles callbacks into each point's job
    callback.sweep_dir, callback.points = sweep_dir, points
    callback.write()
    import wandb

    wandb.teardown()  # W&B's service writes the run file; python -m train tears it down on exit
    rows = read_table(sweep_dir / "results.csv")
    assert [(row["optim"], row["status"], row["eval_auc"]) for row in rows] == [
        ("sgd", "completed", "0.61"), ("adam", "not_run", "")]
    [run_file] = find_run_files(sweep_dir / "wandb")
    run_record = next(r.run for r in read_records(run_file) if r.WhichOneof("record_type") == "run")
    assert run_record.job_type == "sweep"
    assert "sweep/results/_type" in read_run(run_file).keys()  # a logged table
    [table_file] = (run_file.parent / "files" / "media" / "table").glob("**/*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"][:4] == ["job_num", "status", "dir", "overrides"]
    assert [row[1] for row in table["data"]] == ["completed", "not_run"]


def test_plot_tradeoff_refuses_a_folder_without_a_table(tmp_path):
    with pytest.raises(SystemExit, match="results.csv"):
        load_plot_tradeoff().load_points([tmp_path])


def test_plot_tradeoff_averages_seeds_and_measures_compression_in_bytes(tmp_path):
    """Marks are per (method, target) over seeds; compression is full bytes / actual bytes."""
    header = ["job_num", "status", "dir", "overrides", "hashing", "hashing.compression_ratio",
              "hashing.budget_bytes", "trainer.seed", "samples", "steps", "eval_auc",
              "eval_bayes_auc", "embedding_bytes", "embedding_bytes_hashed"]
    rows = [
        ["0", "completed", "0", "", "full", "", "", "0", "40", "4", "0.75", "0.8", "0", "1000"],
        ["1", "completed", "1", "", "full", "", "", "1", "40", "4", "0.76", "0.8", "0", "1000"],
        ["2", "completed", "2", "", "", "100", "", "0", "40", "4", "0.70", "0.8", "0", "8"],
        ["3", "completed", "3", "", "", "100", "", "1", "40", "4", "0.72", "0.8", "0", "8"],
        ["4", "completed", "4", "", "", "", "10", "0", "40", "4", "0.745", "0.8", "0", "10"],
        ["5", "failed", "5", "", "", "", "10", "1", "", "", "", "", "", ""],
    ]
    with open(tmp_path / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    plot_tradeoff = load_plot_tradeoff()
    marks = {(m["method"], m["target"]): m
             for m in plot_tradeoff.summarise(plot_tradeoff.load_points([tmp_path]))}
    assert set(marks) == {("full table", 1.0), ("hash", 100.0), ("budget", 100)}
    hashed = marks[("hash", 100.0)]
    assert (hashed["auc"], hashed["auc_min"], hashed["auc_max"]) == pytest.approx((0.71, 0.70, 0.72))
    # Against the same seed's full tables: 0.70 - 0.75 and 0.72 - 0.76.
    assert (hashed["delta"], hashed["delta_min"], hashed["delta_max"]) == pytest.approx(
        (-0.045, -0.05, -0.04))
    assert hashed["compression"] == 125.0  # 1000 bytes / 8, not the nominal 100x
    assert marks[("budget", 100)]["seeds"] == [0]  # the failed seed is left out
    table = plot_tradeoff.markdown(list(marks.values()))
    assert "| hash | 100x | 125x | 0.000 MiB | 0,1 | 0.7100 | -0.0450 (-0.0500 .. -0.0400) | - |" in table
    # The budget's one seed (0) against seed 0's full tables, not the mean of both seeds.
    assert "| budget | 100x | 100x | 0.000 MiB | 0 | 0.7450 | -0.0050 (-0.0050 .. -0.0050) | - |" in table
