"""Real data: Criteo preprocessing round-trips, training on the real sample, Parquet with
string IDs, and bad rows reported with file and line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from modules.criteo import CriteoColumns
from modules.criteo_preprocess import preprocess
from tests.helpers import REPO, run_train
from train.compose import compose_config

# Shipped in the repository with its provenance and terms (data/criteo_sample/README.md).
SAMPLE = REPO / "data" / "criteo_sample"


def test_sample_config_reads_the_sample_in_the_repository():
    config = compose_config(["experiment=criteo_sample"])
    assert Path(config.data.train_path).resolve() == (SAMPLE / "train.tsv").resolve()
    assert Path(config.data.eval_path).resolve() == (SAMPLE / "dev.tsv").resolve()
    lines = {name: len((SAMPLE / name).read_text().splitlines())
             for name in ("train.tsv", "dev.tsv", "test.tsv")}
    assert lines == {"train.tsv": 7200, "dev.tsv": 409, "test.tsv": 391}


def raw_rows(path: Path) -> list[list[str]]:
    return [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()]


def test_preprocessing_round_trips_every_row(tmp_path):
    source = SAMPLE / "train.tsv"
    # Small tasks and shards, two workers: exercises byte-range splitting and shard joins.
    manifest = preprocess([source], tmp_path / "train", workers=2, rows_per_shard=1000,
                          task_bytes=300_000, progress=False)
    rows = raw_rows(source)
    assert manifest.rows == len(rows) == 7200 and manifest.skipped_rows == 0
    columns = CriteoColumns(tmp_path / "train")
    block = columns.rows(0, columns.num_rows)
    for index, fields in enumerate(rows):
        assert block.labels[index] == int(fields[0])
        for column, text in enumerate(fields[1:14]):
            expected = math.log1p(max(int(text), 0)) if text else 0.0
            assert block.dense[index, column] == pytest.approx(expected, rel=1e-6), (index, column)
        for column, text in enumerate(fields[14:]):
            assert block.categorical[index, column] == (int(text, 16) if text else -1), (index, column)


def test_preprocessing_resumes_and_reuses_finished_tasks(tmp_path):
    out = tmp_path / "dev"
    preprocess([SAMPLE / "dev.tsv"], out, progress=False)
    marker = next(out.glob("*.done.json"))
    shard = next(out.glob("*.labels.npy"))
    before = shard.stat().st_mtime_ns
    (out / "manifest.json").unlink()  # as if interrupted after the task finished
    manifest = preprocess([SAMPLE / "dev.tsv"], out, progress=False)
    assert manifest.rows == 409 and marker.exists() and shard.stat().st_mtime_ns == before


def summary_of(root: Path) -> dict:
    return json.loads(next(root.glob("outputs/**/summary.json")).read_text())


def test_training_on_the_real_sample_beats_chance(tmp_path):
    result = run_train(["experiment=criteo_sample", "logger.mode=disabled"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summary_of(tmp_path)
    assert summary["eval_auc"] > 0.65, summary["eval_auc"]
    assert summary["eval_bayes_auc"] is None
    assert summary["evals"][-1]["num_samples"] == 409


def write_parquet(
    root: Path,
    nan_at: int | None = None,
    row_groups: tuple[int, int] = (1000, 100),
    nan_rows: dict[str, list[int]] | None = None,
) -> list[str]:
    """The sample as Parquet with string categorical IDs; returns the train overrides.

    Row groups of ``row_groups`` rows (train, eval); dense feature I3 is NaN in train row
    ``nan_at`` and in the rows ``nan_rows`` lists per split ("train", "eval")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    nan_rows = {"train": [], "eval": [], **(nan_rows or {})}
    if nan_at is not None:
        nan_rows["train"] = [*nan_rows["train"], nan_at]
    for split, name, row_group in zip(("train", "eval"), ("train.tsv", "dev.tsv"), row_groups):
        rows = raw_rows(SAMPLE / name)
        table = {"label": pa.array([int(r[0]) for r in rows], pa.int64())}
        for i in range(13):
            # Dense columns arrive as the user prepared them (here: DLRM's log transform).
            values = [math.log1p(max(int(r[1 + i]), 0)) if r[1 + i] else None for r in rows]
            if i == 2:
                for row in nan_rows[split]:
                    values[row] = float("nan")
            table[f"I{i + 1}"] = pa.array(values)
        for i in range(26):  # hex strings kept as strings: hashed to int64 IDs by the loader
            table[f"C{i + 1}"] = pa.array([r[14 + i] or None for r in rows], pa.string())
        (root / split).mkdir()
        pq.write_table(pa.table(table), root / split / "part-0.parquet", row_group_size=row_group)
    dense = ",".join(f"I{i}" for i in range(1, 14))
    categorical = ",".join(f"C{i}" for i in range(1, 27))
    return ["features=criteo", "data=parquet", f"data.train_path={root / 'train'}",
            f"data.eval_path={root / 'eval'}", f"data.dense_columns=[{dense}]",
            f"data.categorical_columns=[{categorical}]", "trainer.batch_size=128",
            "trainer.eval_every=0", "optim.embedding_lr=0.02", "optim.dense_lr=0.02",
            "logger.mode=disabled", "data.dense_null=zero"]  # Criteo's missing counts: 0


def test_parquet_with_string_ids_trains(tmp_path):
    result = run_train([*write_parquet(tmp_path), "trainer.steps=56"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summary_of(tmp_path)
    assert summary["eval_auc"] > 0.65
    assert summary["evals"][-1]["num_samples"] == 409  # every eval row once


def test_nan_dense_value_fails_or_is_skipped_and_counted(tmp_path):
    overrides = write_parquet(tmp_path, nan_at=1005)  # row 5 of the second row group
    failed = run_train([*overrides, "trainer.steps=20"], cwd=tmp_path)
    assert failed.returncode == 2
    assert "part-0.parquet row group 1, row 5: dense feature I3 is nan" in failed.stderr
    assert "Traceback" not in failed.stderr
    skipped = run_train([*overrides, "trainer.steps=20", "data.on_bad_row=skip"], cwd=tmp_path)
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert summary_of(tmp_path)["skipped_rows"] == 1


BAD_ROWS = {
    "field count": ("1\t2\t3\n", "expected 40 tab-separated fields, got 3"),
    "non-hex": (None, "categorical feature C3 is not hex: 'xyz'"),
    "non-numeric integer": (None, "integer feature I2 is not an integer: 'abc'"),
}


def corrupt(tmp_path: Path, kind: str) -> Path:
    lines = (SAMPLE / "train.tsv").read_text().splitlines(keepends=True)[:300]
    fields = lines[41].rstrip("\n").split("\t")
    if kind == "field count":
        lines[41] = BAD_ROWS[kind][0]
    elif kind == "non-hex":
        fields[16] = "xyz"
        lines[41] = "\t".join(fields) + "\n"
    else:
        fields[2] = "abc"
        lines[41] = "\t".join(fields) + "\n"
    path = tmp_path / "bad.tsv"
    path.write_text("".join(lines))
    return path


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_row_names_file_and_line(tmp_path, kind):
    bad = corrupt(tmp_path, kind)
    result = run_train(
        ["experiment=criteo_sample", f"data.train_path={bad}", "logger.mode=disabled"], cwd=tmp_path
    )
    assert result.returncode == 2
    assert f"bad.tsv:42: {BAD_ROWS[kind][1]}" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("outputs/**/summary.json"))
    assert not list(tmp_path.glob("data_cache/*/manifest.json"))


def test_skip_mode_counts_bad_rows(tmp_path):
    bad = corrupt(tmp_path, "non-hex")
    result = run_train(
        ["experiment=criteo_sample", f"data.train_path={bad}", "data.on_bad_row=skip",
         "trainer.steps=4", "logger.mode=disabled"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary_of(tmp_path)["skipped_rows"] == 1


def test_missing_path_fails_before_training(tmp_path):
    result = run_train(
        ["experiment=criteo_sample", "data.eval_path=/nonexistent/dev.tsv", "logger.mode=disabled"],
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "data.eval_path: path does not exist: /nonexistent/dev.tsv" in result.stderr
    assert "step " not in result.stdout
