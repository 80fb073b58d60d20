"""train -> export -> predict for a Parquet model trained by the one-command form
(``data=parquet``, features derived from the columns): the export rebuilds the derived
features from the run's data_statistics.json and carries the column rules (list columns, no
dense columns, dense_null, dense_transform with its statistics), so predict on the eval
Parquet scores every row as the training model did and its AUC is the run's eval AUC.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

from modules.data_sources import ParquetSource
from modules.data_sources.parquet import PADDING_LABEL
from modules.metrics import auc
from modules.serving.predict import predict
from modules.serving.schema import load_exported
from tests.test_export import composed
from tests.test_parquet_inputs import csv_to_parquet, movielens_like, write

STEPS = 6
ONE_COMMAND = ["data=parquet", f"trainer.steps={STEPS}", f"trainer.eval_every={STEPS}",
               "trainer.batch_size=64", "trainer.precision=fp32", "logger.mode=disabled",
               "data.prefetch_batches=0", "features.embedding_dim=8"]


def train_in_process(overrides: list[str], run_dir: Path) -> dict:
    """``python -m train overrides`` in this process (the composed config kept in
    .hydra/config.yaml, as the job writes it); the summary."""
    from train.run import run

    cfg = composed(overrides)
    saved_environment = dict(os.environ)
    try:
        return run(cfg, run_dir, {"config.yaml": OmegaConf.to_yaml(cfg)})
    finally:  # run() leaves MASTER_ADDR / MASTER_PORT set for its one-process group
        os.environ.clear()
        os.environ.update(saved_environment)


def training_scores(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(click probabilities, labels) of the eval rows as the trained model scores them, fed by
    the training reader (ParquetSource) with the run's saved statistics."""
    from train.export import _groups, find_checkpoint, gather, load_run_config, run_statistics

    config, _ = load_run_config(run_dir)
    groups = _groups(config, run_dir)
    model, _, _ = gather(config, groups, find_checkpoint(run_dir)[1])
    data = config.data
    source = ParquetSource(
        Path(data.train_path), Path(data.eval_path), groups, config.trainer.batch_size,
        data.label_column, list(data.dense_columns), list(data.categorical_columns),
        dense_null=data.dense_null, dense_transform=data.dense_transform,
        statistics=run_statistics(config, run_dir),
    )
    scores, labels = [], []
    with torch.no_grad():
        for batch in source.eval_batches(0, 1):
            real = batch.labels != PADDING_LABEL
            scores.append(torch.sigmoid(model.eval()(batch))[real])
            labels.append(batch.labels[real])
    return torch.cat(scores), torch.cat(labels).double()


def check_export_and_predict(root: Path, run_dir: Path, summary: dict, eval_path: Path) -> dict:
    from train.export import export

    export(run_dir, root / "model.pt")
    _, schema = load_exported(str(root / "model.pt"))
    result = predict(root / "model.pt", eval_path, root / "scores.parquet", batch_size=50)
    table = pq.read_table(root / "scores.parquet")
    eval_rows = pq.read_table(eval_path)
    assert table.num_rows == eval_rows.num_rows == summary["evals"][-1]["num_samples"]
    assert table.column("label").to_pylist() == eval_rows.column("label").to_pylist()
    reference, labels = training_scores(run_dir)
    scores = torch.tensor(table.column("score").to_numpy())
    assert (scores - reference).abs().max() < 1e-5
    assert result.metrics["auc"] == pytest.approx(summary["eval_auc"], abs=1e-9)
    assert auc(reference, labels) == pytest.approx(summary["eval_auc"], abs=1e-9)
    return schema


def test_the_readme_example_exports_and_predicts_its_eval_scores(tmp_path):
    """The README's one command (a list column, no dense column) -> export -> predict."""
    train = csv_to_parquet(tmp_path / "train", movielens_like(600, seed=0))
    eval_ = csv_to_parquet(tmp_path / "eval", movielens_like(230, seed=1))
    summary = train_in_process(
        [*ONE_COMMAND, f"data.train_path={train}", f"data.eval_path={eval_}"], tmp_path / "run")
    schema = check_export_and_predict(tmp_path, tmp_path / "run", summary, eval_)
    assert [f["name"] for f in schema["features"]] == ["user_id", "item_id", "genres"]
    assert schema["dense_columns"] == [] and schema["parquet"]["list_columns"] == ["genres"]
    statistics = json.loads((tmp_path / "run" / "data_statistics.json").read_text())
    genres = next(f for f in schema["features"] if f["name"] == "genres")
    assert genres["id_space"] == statistics["categorical"]["genres"]["distinct"]


def test_standardized_dense_with_mean_filled_nulls_predicts_its_eval_scores(tmp_path):
    """A dense column (with nulls) under dense_transform=standardize and dense_null=mean:
    predict fills and standardises with the run's saved statistics."""

    def with_null_prices(table: pa.Table) -> pa.Table:
        prices = table.column("price").to_pylist()
        prices = [None if row % 7 == 0 else p for row, p in enumerate(prices)]
        index = table.schema.get_field_index("price")
        return table.set_column(index, "price", pa.array(prices, pa.float64()))

    train = write(tmp_path / "train.parquet", with_null_prices(movielens_like(600, seed=0)))
    eval_ = write(tmp_path / "eval.parquet", with_null_prices(movielens_like(230, seed=1)))
    summary = train_in_process(
        [*ONE_COMMAND, f"data.train_path={train}", f"data.eval_path={eval_}",
         "data.categorical_columns=[user_id,item_id,genres]", "data.dense_columns=[price]",
         "data.dense_null=mean", "data.dense_transform=standardize"], tmp_path / "run")
    schema = check_export_and_predict(tmp_path, tmp_path / "run", summary, eval_)
    statistics = json.loads((tmp_path / "run" / "data_statistics.json").read_text())
    assert schema["dense_transform"] == "standardize" and schema["parquet"]["dense_null"] == "mean"
    assert schema["parquet"]["dense_statistics"]["price"]["mean"] == statistics["dense"]["price"]["mean"]
    assert abs(statistics["dense"]["price"]["mean"]) > 1  # standardising moves the inputs


def test_a_negative_id_in_the_scoring_input_is_named(tmp_path):
    from modules.serving.readers import Skipped, parquet_blocks
    from modules.tabular import BadRowError

    table = movielens_like(20)
    items = table.column("item_id").to_numpy().copy()
    items[13] = -5
    path = write(tmp_path / "t.parquet",
                 table.set_column(table.schema.get_field_index("item_id"), "item_id",
                                  pa.array(items)))
    with pytest.raises(BadRowError, match=r"row 13: categorical item_id has ID -5"):
        list(parquet_blocks([path], ["user_id", "item_id", "genres"], [], "label", 8, False,
                            Skipped(), {"list_columns": ["genres"]}))
    assert np.all(items[:13] >= 0)


def test_a_null_or_non_click_label_in_the_scoring_input_is_named(tmp_path):
    """Labels follow training's rule (0 or 1, never null): a null is not read as 0."""
    from modules.serving.readers import Skipped, parquet_blocks
    from modules.tabular import BadRowError

    table = movielens_like(20)
    index = table.schema.get_field_index("label")
    labels = table.column("label").to_pylist()
    for value, message in ((None, r"row 11: label label is null"),
                           (4, r"row 11: label label is 4, not 0 or 1")):
        changed = [*labels[:11], value, *labels[12:]]
        path = write(tmp_path / "t.parquet",
                     table.set_column(index, "label", pa.array(changed, pa.int64())))
        with pytest.raises(BadRowError, match=message):
            list(parquet_blocks([path], ["user_id", "item_id", "genres"], [], "label", 8,
                                False, Skipped(), {"list_columns": ["genres"]}))
