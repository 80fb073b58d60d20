"""data config -> a data source (modules/data_sources/), preprocessing raw Criteo files once.

Raw Criteo inputs (``.tsv``, ``.txt``, ``.gz`` files) are preprocessed on rank 0 into
``data.cache_dir`` under a key of (path, size, mtime, on_bad_row), while the other ranks wait;
a later run with the same input reuses the shards. Preprocessed directories (from
scripts/preprocess_criteo.py) are read directly.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from modules.criteo_preprocess import preprocess
from modules.data_sources import CriteoSource, DataSource, ParquetSource, PlantedSource
from modules.features import FeatureGroupSpec
from modules.metrics import auc
from modules.synthetic import PlantedClickData, PlantedSignal
from train.collectives import (
    first_error,
    gather_concat_on_rank_zero,
    on_rank_zero,
    reduce_over_ranks,
)
from train.config import Config, spec_values
from train.distributed import DistributedContext

RAW_SUFFIXES = (".tsv", ".txt", ".gz", ".csv")


def planted_data(config: Config, groups: list[FeatureGroupSpec]) -> PlantedClickData:
    return PlantedClickData(
        groups=groups,
        num_dense_features=config.features.num_dense_features,
        batch_size=config.trainer.batch_size,
        seed=config.trainer.seed,
        signal=PlantedSignal(**spec_values(config.data.planted, PlantedSignal)),
    )


def bayes_auc(data: PlantedClickData, rank: int, num_batches: int) -> float:
    """AUC of the true click probabilities on the eval labels: the best any model can do
    (a collective: every rank calls it)."""
    probabilities, labels = [], []
    for step in range(num_batches):
        batch, probability = data.batch("eval", rank, step)
        probabilities.append(probability)
        labels.append(batch.labels)
    # Rank 0 alone holds every rank's eval samples and sorts them; the others get the figure.
    samples = gather_concat_on_rank_zero(
        torch.stack([torch.cat(probabilities).double(), torch.cat(labels).double()], dim=1)
    )
    return on_rank_zero(lambda: auc(samples[:, 0], samples[:, 1]))


def existing_path(text: str, key: str) -> Path:
    """The path, or a one-line error naming the config key and the path."""
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{key}: path does not exist: {path}")
    return path


def _cache_key(path: Path, on_bad_row: str) -> str:
    stat = path.stat()
    text = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{on_bad_row}"
    return f"{path.name.replace('.', '_')}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"


def criteo_split_dir(path: Path, config: Config) -> Path:
    """A preprocessed split directory for ``path``, preprocessing a raw file on rank 0."""
    if path.is_dir() or not path.name.endswith(RAW_SUFFIXES):
        return path
    out_dir = Path(config.data.cache_dir) / _cache_key(path, config.data.on_bad_row)

    def preprocess_once() -> None:
        if not (out_dir / "manifest.json").exists():
            preprocess([path], out_dir, workers=1,
                       skip_bad_rows=config.data.on_bad_row == "skip", progress=False)

    # Rank 0 preprocesses while the others wait (on a long-timeout group: this can take far
    # longer than a collective's timeout); a bad row or an I/O error reaches every rank.
    on_rank_zero(preprocess_once)
    return out_dir


def build_data_source(
    config: Config, groups: list[FeatureGroupSpec], context: DistributedContext,
    statistics: dict | None = None,
) -> tuple[DataSource, float | None]:
    """The job's data source and, for planted data, the Bayes-optimal eval AUC.
    ``statistics``: Parquet data's, measured once (train/parquet_features.py), or None."""
    data = config.data
    if data.source == "synthetic":
        planted = planted_data(config, groups)
        return (
            PlantedSource(planted, data.eval_batches),
            bayes_auc(planted, context.rank, data.eval_batches),
        )
    train_path = existing_path(data.train_path, "data.train_path")
    eval_path = existing_path(data.eval_path, "data.eval_path")
    if data.source == "criteo":
        source: DataSource = CriteoSource(
            criteo_split_dir(train_path, config),
            criteo_split_dir(eval_path, config),
            groups,
            config.trainer.batch_size,
            config.features.num_dense_features,
        )
    else:
        if len(data.dense_columns) != config.features.num_dense_features:
            raise ValueError(
                f"data.dense_columns lists {len(data.dense_columns)} column(s) but the model "
                f"takes features.num_dense_features={config.features.num_dense_features} "
                f"(features={config.features.name})"
            )
        parquet = ParquetSource(
            train_path, eval_path, groups, config.trainer.batch_size,
            data.label_column, list(data.dense_columns), list(data.categorical_columns),
            skip_bad_rows=data.on_bad_row == "skip",
            dense_null=data.dense_null,
            dense_transform=data.dense_transform,
            statistics=statistics,
            shuffle_rows=data.shuffle_rows,
            seed=config.trainer.seed,
        )
        # Before training: the first row group of every file, read and checked (labels,
        # IDs, dense values) by rank 0; a bad one stops every rank naming file and row.
        on_rank_zero(parquet.check_first_row_groups)
        parquet.num_eval_batches = agreed_eval_batches(parquet, context)
        source = parquet
    return source, None


def agreed_eval_batches(source: ParquetSource, context: DistributedContext) -> int:
    """The eval batches every rank runs: the largest count over ranks of the batches a rank
    needs to score each of its eval rows once (a collective: every rank must call it).

    Each eval batch is a collective (sharded lookups), so all ranks must run the same count;
    a rank with fewer rows pads its last batches with rows the metrics leave out. With
    data.on_bad_row=skip the Parquet metadata's row counts overstate what survives, and not
    by the same amount on every rank: each rank counts its own rows (their dense columns,
    read once) and the ranks agree on the largest.
    """
    error = None
    try:
        local = source.num_local_eval_batches(context.rank, context.world_size)
    except (ValueError, OSError) as caught:  # one rank's unreadable file reaches every rank
        local, error = 0, str(caught)
    error = first_error(error)
    if error is not None:
        raise ValueError(error)
    count = reduce_over_ranks(local, context.device, "max")
    if count == 0:
        raise ValueError(
            f"{source.eval_groups[0][0].parent}: no eval rows"
            + (" after dropping bad rows" if source.skip_bad_rows else "")
        )
    return count
