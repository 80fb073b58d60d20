"""data=parquet in one command: the columns, their statistics and the feature set they imply.

Without a feature YAML (``features=from_data``, data=parquet's default) every categorical
column is a feature whose ID space is the number of distinct IDs measured in the data and
whose rows follow from the hashing config (``hashing.compression_ratio``; below 1 gives
hashed features more rows than IDs, for fewer collisions). ``data.feature_groups`` groups
columns into collections. Empty column lists are read off the first train file's schema.

The statistics (distinct IDs, dense means and standard deviations) are measured once, by
rank 0, and saved in the run directory (``data_statistics.json``); a resumed run reuses them,
so its feature set and dense normalisation are the ones it was trained with.
"""

from __future__ import annotations

import json
from pathlib import Path

from modules.data_sources.parquet import list_row_groups, parquet_files
from modules.data_sources.parquet_statistics import measure_statistics
from train.collectives import on_rank_zero
from train.config import Config, FeatureConfig, FeatureGroupConfig, FeaturesConfig

STATISTICS_FILE = "data_statistics.json"
DERIVED = "from_data"
DEFAULT_GROUP = "categorical"


def derives_features(config: Config) -> bool:
    return config.data.source == "parquet" and config.features.name == DERIVED


def needs_statistics(config: Config) -> bool:
    data = config.data
    return data.source == "parquet" and (
        derives_features(config) or data.dense_null == "mean" or data.dense_transform != "none"
    )


def fill_columns_from_schema(config: Config) -> None:
    """With neither data.dense_columns nor data.categorical_columns set, take every column
    of the first train file but the label: floating-point columns dense, the rest (integer
    or string IDs, lists of them) categorical."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = config.data
    if data.dense_columns or data.categorical_columns:
        return
    first = parquet_files(Path(data.train_path).expanduser())[0]
    schema = pq.read_schema(first)
    if data.label_column not in schema.names:
        raise ValueError(f"{first}: no label column {data.label_column} (has {schema.names})")
    for field in schema:
        if field.name == data.label_column:
            continue
        floating = pa.types.is_floating(field.type) or pa.types.is_boolean(field.type)
        (data.dense_columns if floating else data.categorical_columns).append(field.name)


def fill_columns_from_statistics(config: Config, statistics: dict) -> None:
    """As ``fill_columns_from_schema`` did for the run, from its saved statistics (which
    hold every dense and categorical column it read, in order): a run's columns without its
    train files (export)."""
    data = config.data
    if data.dense_columns or data.categorical_columns:
        return
    data.dense_columns.extend(statistics.get("dense", {}))
    data.categorical_columns.extend(statistics.get("categorical", {}))


def _load_or_measure(config: Config, run_dir: Path) -> dict:
    saved = run_dir / STATISTICS_FILE
    if config.trainer.resume != "none" and saved.exists():
        return json.loads(saved.read_text())
    data = config.data
    groups, _ = list_row_groups(
        Path(data.train_path).expanduser(), data.label_column, list(data.dense_columns),
        list(data.categorical_columns),
    )
    return measure_statistics(
        groups, list(data.dense_columns), list(data.categorical_columns), data.statistics_rows
    )


def data_statistics(config: Config, run_dir: Path) -> dict:
    """Measured by rank 0 (or read back on resume); every rank gets them (a collective)."""
    return on_rank_zero(_load_or_measure, config, run_dir)


def save_statistics(run_dir: Path, statistics: dict) -> None:
    """Rank 0, once it holds the run directory."""
    (run_dir / STATISTICS_FILE).write_text(json.dumps(statistics, indent=1) + "\n")


def derived_features(config: Config, statistics: dict) -> FeaturesConfig:
    """The feature set the data's columns imply: one feature per categorical column, an
    ID space of its distinct IDs, grouped by data.feature_groups."""
    data = config.data
    columns = list(data.categorical_columns)
    if not columns:
        raise ValueError(
            "data=parquet needs at least one categorical column (data.categorical_columns)"
        )
    grouped = {name: list(group) for name, group in data.feature_groups.items()}
    for name, group in grouped.items():
        unknown = [column for column in group if column not in columns]
        if unknown:
            raise ValueError(
                f"data.feature_groups.{name}: {unknown} are not categorical columns ({columns})"
            )
    listed = {column for group in grouped.values() for column in group}
    rest = [column for column in columns if column not in listed]
    if rest:
        grouped.setdefault(DEFAULT_GROUP, []).extend(rest)
    groups = {}
    for name, group in grouped.items():
        features = {}
        for column in group:
            measured = statistics["categorical"][column]
            id_space = max(int(measured["distinct"]), 1)
            features[column] = FeatureConfig(
                id_space=id_space,
                num_embeddings=id_space,
                ids_per_sample=max(1, round(measured["ids_per_row"])) if measured["list"] else 1,
            )
        groups[name] = FeatureGroupConfig(features=features)
    return FeaturesConfig(
        name=DERIVED,
        embedding_dim=config.features.embedding_dim,
        num_dense_features=len(data.dense_columns),
        groups=groups,
    )


def describe(statistics: dict, features: FeaturesConfig) -> str:
    """One line per feature for the console: the measured ID space and its source."""
    sampled = statistics["rows_measured"] < statistics["rows_total"]
    lines = [
        f"features from the data ({statistics['rows_measured']:,} of "
        f"{statistics['rows_total']:,} train rows measured"
        + ("; distinct counts of a sample are lower bounds)" if sampled else ")")
    ]
    for group_name, group in features.groups.items():
        for name, feature in group.features.items():
            kind = "list" if statistics["categorical"][name]["list"] else "one ID per row"
            lines.append(f"  {group_name}/{name}: {feature.id_space:,} distinct IDs ({kind})")
    return "\n".join(lines)
